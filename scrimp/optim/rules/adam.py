"""Adam as an inner rule: the moments of the projected gradient and the bias-corrected direction.

The formula is galore-torch's / HuggingFace's (Kingma & Ba, 2015; Loshchilov & Hutter, 2019; Zhao et
al., 2024, arXiv:2403.03507), written once in ``functional.adam_direction_``. 8-bit Adam (GaLore's
``GaLoreAdamW8bit``) is this rule with the blockwise 8-bit moment store (``scrimp.optim.moments``).
"""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from .base import InnerRule, MomentSpec, StepHyper
from .registry import register_inner

ADAM_MOMENTS = (MomentSpec("exp_avg", signed=True), MomentSpec("exp_avg_sq", signed=False))


@register_inner
class AdamRule(InnerRule):
    """Adam on R: ``m, v`` updated in place, ``N = m / (sqrt(v) + eps) sqrt(1 - b2^t) / (1 - b1^t)``."""

    name = "adam"
    rotatable = True

    def moment_specs(self) -> tuple[MomentSpec, ...]:
        return ADAM_MOMENTS

    def direction(self, R: Tensor, moments: dict[str, Tensor], hp: StepHyper) -> Tensor:
        return F.adam_direction_(R, moments["exp_avg"], moments["exp_avg_sq"], step=hp.step, beta1=hp.beta1,
                                 beta2=hp.beta2, eps=hp.eps)

    def rotate(self, moments: dict[str, Tensor], overlap: Tensor, side: str) -> None:
        """m through the overlap, v through the squared overlap (``functional.rotate_moments_``)."""
        F.rotate_moments_by_overlap_(moments["exp_avg"], moments["exp_avg_sq"], overlap, side)
