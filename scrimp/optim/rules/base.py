"""The interfaces of the engine's parts: inner rules, residual rules and the output (scaling) rule.

A projected step is ``G -> R (project) -> N = inner.direction(R) -> U (output: back-project, or
scale G as APOLLO does) -> W <- W (1 - lr wd) - lr scale U - lr residual_lr_scale residual(G - back(R))``.
Each part is a small object; ``scrimp.optim.subspace`` composes them and never branches on a part's
name. The per-step numbers every part may read live in one frozen ``StepHyper``, shared by the torch
path, the kernels' reference and the kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, ClassVar, NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class StepHyper:
    """The hyper-parameters of one parameter's step (``step`` counts this update, from 1).

    ``eps`` is already in the HF form (``functional.hf_eps``). ``side`` is the projected side of the
    weight ("left": R = P^T G; "right": R = G P). ``residual`` names a registered residual rule
    (None: no residual update).
    """

    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    scale: float = 1.0
    side: str = "left"
    residual: str | None = None
    residual_lr_scale: float = 1.0

    @classmethod
    def of(cls, hp: StepHyper | None, kwargs: Mapping[str, Any]) -> StepHyper:
        """``hp`` with the keyword arguments of an older call (``step=..., lr=...``) laid over it.

        The one place where keyword calls become a ``StepHyper``: an unknown keyword, or a required
        one missing when ``hp`` is None, raises one TypeError naming it.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown step hyper-parameter(s) {unknown}; StepHyper takes {sorted(names)}")
        if hp is not None:
            return replace(hp, **kwargs) if kwargs else hp
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in kwargs]
        if missing:
            raise TypeError(f"missing step hyper-parameter(s) {missing}: pass hp=StepHyper(...) or all of them")
        return cls(**kwargs)


class MomentSpec(NamedTuple):
    """One state tensor an inner rule keeps: its key, whether its values can be negative (which
    8-bit code map stores it), whether it may be stored in 8 bits at all, and ``history`` > 0 for a
    stack of that many R-shaped slices (shape ``(history, *R.shape)``)."""

    name: str
    signed: bool
    quantizable: bool = True
    history: int = 0


class InnerRule:
    """Maps the projected gradient ``R`` and the rule's state to the direction ``N`` (same shape as R).

    ``direction`` updates the tensors of ``moments`` (fp32, keyed by ``MomentSpec.name``, as
    ``moment_specs`` declares them) in place and returns N; it reads nothing else, so it can run on a
    copy of the state anywhere (the host, under offload). ``rotate`` carries the moments into a new
    basis at a refresh (``moment_policy="rotate"``); rules that cannot say so set ``rotatable = False``.
    """

    name: ClassVar[str]
    rotatable: ClassVar[bool] = False
    # Group keys the rule's constructor takes: names (defaults from the constructor) or {name: default}.
    group_keys: ClassVar[tuple[str, ...] | dict[str, Any]] = ()
    # The group keys a resumed run may change: every other key of ``group_keys`` is a fixed setting on
    # load (``SubspaceAdamW.check_state_dict``), since it may change what the saved state means. A key
    # belongs here only when the state holds the same thing whatever its value (say, a damping term
    # applied to a history of raw gradients at each step).
    resumable_keys: ClassVar[tuple[str, ...]] = ()

    def moment_specs(self) -> tuple[MomentSpec, ...]:
        raise NotImplementedError(f"{type(self).__name__} must declare its state (moment_specs)")

    def direction(self, R: Tensor, moments: dict[str, Tensor], hp: StepHyper) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement direction(R, moments, hp)")

    def rotate(self, moments: dict[str, Tensor], overlap: Tensor, side: str) -> None:
        raise NotImplementedError(f"inner rule {self.name!r} cannot rotate its state into a new basis")


class ResidualRule:
    """The state-free update of the part of G outside the subspace (FRUGAL's state-free rule).

    ``update(res, R, N)`` returns the direction for the residual ``res = G - back(R)``; rules with
    ``needs_direction = True`` read the low-rank gradient R and the inner direction N (the kernels
    then keep R). ``alone(G)`` is the update of a parameter with no active subspace.
    """

    name: ClassVar[str]
    needs_direction: ClassVar[bool] = False

    def update(self, res: Tensor, R: Tensor | None = None, N: Tensor | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement update(res, R, N)")

    def alone(self, G: Tensor) -> Tensor:
        return self.update(G)


class OutputRule:
    """How the inner direction N becomes the full-size update U of the weight.

    The default (``None`` in a group) is back-projection, ``U = back(N)``, which the engine does with
    the projector. Other rules (APOLLO's gradient scaling, ``U = G * s(R, N)``) implement
    ``full_update`` and may keep small state of their own under ``state_keys`` in the parameter's
    state (the norm-growth limiter's previous norm, say): 0-d tensors unless ``state_shapes`` says
    otherwise, which ``SubspaceAdamW.check_state_dict`` checks on load.

    ``needs_side_shaped_R``: the rule reads R laid out as ``P^T G`` (left side: (r, n)) or ``G P``
    (right: (m, r)), per channel of the side that is not projected, as APOLLO's channel factors do.
    The engine then refuses projectors that lay R out otherwise (``projection`` kinds'
    ``side_shaped_R``: fixed row/column windows, flat entries). A rule that reads R only as a whole
    sets it False.
    """

    name: ClassVar[str]
    state_keys: ClassVar[tuple[str, ...]] = ()
    group_keys: ClassVar[tuple[str, ...] | dict[str, Any]] = ()  # as InnerRule.group_keys
    resumable_keys: ClassVar[tuple[str, ...]] = ()  # as InnerRule.resumable_keys
    needs_side_shaped_R: ClassVar[bool] = True

    def full_update(self, G: Tensor, R: Tensor, N: Tensor, state: dict, hp: StepHyper) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement full_update(G, R, N, state, hp)")

    def state_shapes(self, weight_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The shape of each ``state_keys`` tensor for a weight of ``weight_shape`` (0-d by default)."""
        return {key: () for key in self.state_keys}
