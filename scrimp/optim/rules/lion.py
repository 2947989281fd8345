"""Lion as the state-full inner rule (Chen et al., 2023, "Symbolic Discovery of Optimization
Algorithms", arXiv:2302.06675), in the form FRUGAL runs it on the projected gradient
(``frugal/lion.py`` of Zmushko et al., 2025, arXiv:2411.07837; github.com/philipzmushko/FRUGAL):

    N = sign(b1 m + (1 - b1) R);   m <- b2 m + (1 - b2) R

with (b1, b2) the group's betas (Lion's defaults 0.9, 0.99), no bias correction and no eps. The
direction is computed from the old m before m moves, as in the paper's Algorithm 2. Weight decay is
the engine's decoupled ``W (1 - lr wd)``, which is Lion's own. Lion's steps have unit entries, so its
lr is typically 3-10x below AdamW's (the paper; FRUGAL's Lion defaults to lr 1e-4).

The single moment m is a linear average of projected gradients, so it crosses a refresh exactly by
the overlap of the bases (``rotate_coordinates_``), like Adam's first moment.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import InnerRule, MomentSpec, StepHyper
from .registry import register_inner
from .sgd import rotate_coordinates_


def lion_direction_(grad: Tensor, exp_avg: Tensor, *, beta1: float, beta2: float) -> Tensor:
    """Return Lion's direction ``sign(b1 m + (1 - b1) g)`` (a new tensor), then move ``m`` in place."""
    if grad.dtype != exp_avg.dtype:
        grad = grad.to(exp_avg.dtype)
    direction = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
    exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
    return direction


@register_inner
class LionRule(InnerRule):
    """Lion on R with the group's betas; one signed moment (``exp_avg``), which 8 bits may store."""

    name = "lion"
    rotatable = True
    group_keys: ClassVar[dict[str, object]] = {}

    def moment_specs(self) -> tuple[MomentSpec, ...]:
        return (MomentSpec("exp_avg", signed=True),)

    def direction(self, R: Tensor, moments: dict[str, Tensor], hp: StepHyper) -> Tensor:
        return lion_direction_(R, moments["exp_avg"], beta1=hp.beta1, beta2=hp.beta2)

    def rotate(self, moments: dict[str, Tensor], overlap: Tensor, side: str) -> None:
        rotate_coordinates_(moments["exp_avg"], overlap, side)
