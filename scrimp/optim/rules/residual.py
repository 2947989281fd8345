"""The built-in state-free residual rules (FRUGAL's state-free part; Fira/APOLLO's scaled residual).

FRUGAL (Zmushko et al., 2025, arXiv:2411.07837) updates the part of the gradient outside the
subspace, ``res = G - back(R)``, without state: by signSGD (Bernstein et al., 2018) or SGD. The
"scaled" rule multiplies the residual by the norm ratio ``||N|| / ||R||`` of the inner direction to
the projected gradient, the idea of Fira (Chen et al., 2024, arXiv:2410.01623) and APOLLO (Zhu et
al., 2024): the residual inherits the adaptive step size the inner rule chose in the subspace.
Clean-room, per-matrix norms. A new rule is one more class like these, in any module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from .base import ResidualRule
from .registry import register_residual


@register_residual
class SignSGD(ResidualRule):
    """``sign(res)``: FRUGAL's default state-free rule."""

    name = "sign_sgd"

    def update(self, res: Tensor, R: Tensor | None = None, N: Tensor | None = None) -> Tensor:
        return torch.sign(res)


@register_residual
class PlainSGD(ResidualRule):
    """``res`` itself: FRUGAL's SGD state-free rule."""

    name = "sgd"

    def update(self, res: Tensor, R: Tensor | None = None, N: Tensor | None = None) -> Tensor:
        return res


@register_residual
class NormScaled(ResidualRule):
    """``res * ||N|| / ||R||``; a parameter without a subspace has no ratio to borrow and takes SGD."""

    name = "scaled"
    needs_direction = True

    def update(self, res: Tensor, R: Tensor | None = None, N: Tensor | None = None) -> Tensor:
        if R is None or N is None:
            raise ValueError("residual rule 'scaled' needs the projected gradient R and the direction N")
        return res * F.norm_ratio(N, R)

    def alone(self, G: Tensor) -> Tensor:
        return G
