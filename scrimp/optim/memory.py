"""Exact optimizer-state bytes by category: moments, projectors, other.

    from scrimp.optim.memory import state_bytes
    state_bytes(opt)  # {'moments': ..., 'projectors': ..., 'other': ..., 'total': ...}

Counts every tensor reachable from ``optimizer.state`` (nested lists/dicts included), each
distinct tensor once. Moments are the state every registered inner rule declares
(``MomentSpec``s: Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``, Natural GaLore's
``grad_history``, ..., fp32 or as 8-bit codes and absmax, ``moments.stored_keys``), plus the keys
other libraries' optimizers use for theirs (torch's ``exp_avg``/``max_exp_avg_sq``/``momentum_buffer``,
bitsandbytes' ``state1``/``state2``/``absmax1``/``absmax2``). Keys starting with ``proj`` are
projectors; the rest (step tensors, accumulation buffers, quantization maps) is other.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .moments import stored_keys
from .rules.registry import declared_moment_specs

# The moment keys of optimizers outside scrimp (torch.optim, bitsandbytes), which declare no MomentSpecs.
FOREIGN_MOMENT_PREFIXES = ("exp_avg", "momentum", "state1", "state2", "absmax1", "absmax2", "max_exp_avg_sq")
PROJECTOR_PREFIXES = ("proj",)


def moment_keys() -> frozenset[str]:
    """Every state key under which a registered inner rule's state may be stored."""
    return frozenset(key for spec in declared_moment_specs() for key in stored_keys(spec))


def category(key: Any, moments: frozenset[str] | None = None) -> str:
    """The category of a state key (``moments``: the rules' moment keys, ``moment_keys()`` if not given)."""
    key = str(key)
    if key in (moment_keys() if moments is None else moments) or key.startswith(FOREIGN_MOMENT_PREFIXES):
        return "moments"
    if key.startswith(PROJECTOR_PREFIXES):
        return "projectors"
    return "other"


def _tensors(value: Any):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def state_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes of the tensors held in ``optimizer.state`` by category, plus ``total``."""
    totals = {"moments": 0, "projectors": 0, "other": 0}
    moments = moment_keys()
    seen: set[tuple[int, int, tuple]] = set()
    for per_param in optimizer.state.values():
        items = per_param.items() if isinstance(per_param, dict) else [("other", per_param)]
        for key, value in items:
            for t in _tensors(value):
                ident = (t.data_ptr(), t.element_size(), tuple(t.shape)) if t.numel() else (id(t), 0, ())
                if ident in seen:
                    continue
                seen.add(ident)
                totals[category(key, moments)] += t.numel() * t.element_size()
    totals["total"] = sum(totals.values())
    return totals
