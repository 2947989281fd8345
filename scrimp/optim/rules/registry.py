"""Name -> part registries. A part registers itself where it is defined, so adding one touches one file.

    from scrimp.optim.rules.registry import register_residual
    @register_residual
    class ClippedSign(ResidualRule):
        name = "clipped_sign"
        def update(self, res, R=None, N=None): return res.sign() * res.abs().clamp(max=1)

Group keys then name it (``residual="clipped_sign"``), and ``build()`` accepts it.
"""

from __future__ import annotations

from .base import InnerRule, MomentSpec, OutputRule, ResidualRule

INNER_RULES: dict[str, type[InnerRule]] = {}
RESIDUAL_RULES: dict[str, ResidualRule] = {}
OUTPUT_RULES: dict[str, type[OutputRule]] = {}


def _same_rule(registered: type, cls: type) -> bool:
    """Whether ``cls`` is the rule already registered: the same class object, or the same class defined
    again by a reloaded module (or a test file collected twice), which has the same module and name."""
    return registered is cls or (registered.__module__, registered.__qualname__) == (cls.__module__, cls.__qualname__)


def _register(table: dict, key: str, value, cls: type, kind: str):
    """``table[key] = value`` unless another rule already holds ``key``: a silent replacement would change
    every group that names it (a test's "adam" replacing the built-in Adam, say)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"every {kind} needs a non-empty string name, got {key!r}")
    if key in table:
        held = table[key]
        registered = held if isinstance(held, type) else type(held)
        if not _same_rule(registered, cls):
            raise ValueError(f"the {kind} name {key!r} is already registered to {registered.__module__}."
                             f"{registered.__qualname__}; give {cls.__qualname__} another name")
    table[key] = value
    return value


def register_inner(cls: type[InnerRule]) -> type[InnerRule]:
    """Class decorator: make an inner rule known by its ``name``."""
    _register(INNER_RULES, cls.name, cls, cls, "inner rule")
    return cls


def register_residual(cls: type[ResidualRule]) -> type[ResidualRule]:
    """Class decorator: make a (state-free, argument-free) residual rule known by its ``name``."""
    _register(RESIDUAL_RULES, cls.name, cls(), cls, "residual rule")
    return cls


def register_output(cls: type[OutputRule]) -> type[OutputRule]:
    """Class decorator: make an output rule known by its ``name``."""
    _register(OUTPUT_RULES, cls.name, cls, cls, "output rule")
    return cls


def declared_moment_specs() -> tuple[MomentSpec, ...]:
    """The state tensors every registered inner rule declares, built with its default settings.

    What ``scrimp.optim.memory`` counts as moments. A rule is built from its defaults alone, as the
    engine builds it for a group that sets none of its keys (``group_keys`` take defaults only).
    """
    return tuple(spec for cls in INNER_RULES.values() for spec in cls().moment_specs())
