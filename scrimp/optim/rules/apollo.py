"""APOLLO's parts: a seeded Gaussian projection, gradient scaling factors, and Fira's norm-growth limiter.

APOLLO (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025, arXiv:2412.05270;
reference implementation ``apollo-torch`` on PyPI, github.com/zhuhanqing/APOLLO) runs Adam on a random
projection R of the gradient G only to learn *how much* to scale G, not in which direction to move:

    R = P^T G (left) or G P (right)        P Gaussian with variance 1/r, redrawn every update_proj_gap steps
    N = Adam(R)                             the direction Adam would take in the auxiliary space
    s = ||N||_c / (||R||_c + 1e-8)          per channel c of the unprojected side (APOLLO), or one number
                                            over the whole matrix (APOLLO-Mini, rank 1)
    U = limit(G * s)                        Fira's norm-growth limiter (Chen et al., arXiv:2410.01623)
    W <- W - lr * sqrt(scale) * U

The composition in ``scrimp.optim.subspace`` is: projector ``gaussian`` (``apollo_projection``), inner
rule ``adam``, output rule ``apollo`` (``ApolloScaling``), no residual. This module holds the math of
the projector and of the output rule, one pure function per piece; written from the paper and from
reading apollo-torch 1.0.3, not copied from it. Details that follow apollo-torch on purpose:

- The projection is drawn with torch's own generator on the gradient's device (``apollo_projection``),
  seeded with the parameter's 1-based position among all the optimizer's parameters, and the seed
  moves on at each refresh through ``next_apollo_seed``. The same parameter order on the same kind of
  device therefore gives apollo-torch's matrices exactly; like apollo-torch's, they differ between a
  CPU and a GPU (torch's generators do).
- A channel is a row of G when the right side is projected, a column when the left side is: the
  factors have the length of the side that is not projected. (apollo-torch picks the reduced axis
  from the shape, which agrees with ours for ``proj_type="std"``, its only working choice.)
- The limiter sees ``G * s`` *before* Adam's bias correction sqrt(1 - b2^t) / (1 - b1^t), which
  apollo-torch folds into the step size afterwards; ``ApolloScaling`` divides the correction out of the
  engine's bias-corrected N, limits, and multiplies it back, so its state equals apollo-torch's.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from scrimp.checks import is_real

from ..functional import bias_correction
from .base import OutputRule, StepHyper
from .registry import register_output

APOLLO_MODES = ("channel", "tensor")
SCALING_EPS = 1e-8  # apollo-torch's guard in ||R|| + eps and in the limiter's previous norm
FIRA_GAMMA = 1.01  # the largest per-step growth of the update's norm (Fira, Sec. 3.3; APOLLO keeps it)
_SEED_DRAWS = 15  # apollo-torch's next seed is the last of 15 int64 draws seeded with the current one
_SEED_CHECKPOINT = 256  # links of the cached seed chain computed per recursion


def next_apollo_seed(seed: int) -> int:
    """The seed of the next refresh after ``seed``: the last of 15 uniform int64 draws of a CPU generator
    seeded with it (apollo-torch's ``next_seed``)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.randint(0, torch.iinfo(torch.int64).max, (_SEED_DRAWS,), generator=generator)
    return int(draws[-1])


@lru_cache(maxsize=1 << 14)
def _chained_seed(base_seed: int, refresh: int) -> int:
    return base_seed if refresh == 0 else next_apollo_seed(_chained_seed(base_seed, refresh - 1))


def apollo_seed(base_seed: int, refresh: int) -> int:
    """The seed of the ``refresh``-th projection (0 = the first) of a parameter whose first seed is ``base_seed``.

    The projection is regenerated at every step, so the chain is cached: a step looks up one value and a
    refresh adds one link (a CPU draw of 15 numbers).
    """
    if refresh < 0:
        raise ValueError(f"refresh must be an integer >= 0, got {refresh!r}")
    for checkpoint in range(_SEED_CHECKPOINT, refresh, _SEED_CHECKPOINT):
        _chained_seed(base_seed, checkpoint)  # keeps the recursion short when a resumed run starts late
    return _chained_seed(base_seed, refresh)


def apollo_base_seed(position: int, seed: int = 0) -> int:
    """A parameter's first projection seed: its 1-based ``position`` among all of the optimizer's parameters,
    in param-group order (apollo-torch numbers them so), shifted by a user ``seed`` (0 gives apollo-torch's)."""
    return seed + position


def apollo_projection(dim: int, rank: int, side: str, seed: int, device: torch.device | str) -> Tensor:
    """APOLLO's (dim, rank) fp32 projection in the engine's layout: i.i.d. N(0, 1/rank) entries.

    R = P^T G for ``side="left"`` (dim = m), R = G P for ``"right"`` (dim = n). Not orthonormalized:
    APOLLO needs only norms preserved in expectation (Johnson-Lindenstrauss: E ||P^T x||^2 = ||x||^2),
    not a basis. Drawn as apollo-torch draws it, so the same seed gives the same matrix: (dim, rank)
    row-major on the left, (rank, dim) row-major transposed on the right, with torch's generator on
    ``device``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (dim, rank) if side == "left" else (rank, dim)
    draw = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) / math.sqrt(rank)
    return draw if side == "left" else draw.t()


def channel_axis(side: str) -> int:
    """The axis of R that the channel norms reduce: its projected (rank-sized) axis."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return 0 if side == "left" else 1


def channel_scaling(R: Tensor, N: Tensor, axis: int) -> Tensor:
    """Per-channel factors ``||N||_2 / (||R||_2 + 1e-8)`` reduced over ``axis``, kept as a broadcastable dim.

    APOLLO's Sec. 4: the ratio of the adapted to the raw gradient norm of each channel, measured in the
    auxiliary space, approximates the channel's element-wise Adam learning rate in the full space.
    """
    n_norm = torch.linalg.vector_norm(N, dim=axis, keepdim=True)
    return n_norm / (torch.linalg.vector_norm(R, dim=axis, keepdim=True) + SCALING_EPS)


def tensor_scaling(R: Tensor, N: Tensor) -> Tensor:
    """One factor ``||N||_F / (||R||_F + 1e-8)`` for the whole matrix (APOLLO-Mini), a 0-d tensor."""
    return torch.linalg.vector_norm(N) / (torch.linalg.vector_norm(R) + SCALING_EPS)


def limit_norm_growth(update: Tensor, previous_norm: Tensor | None, gamma: float) -> tuple[Tensor, Tensor]:
    """Fira's norm-growth limiter: shrink ``update`` so its norm grows at most ``gamma``-fold over the last one.

    Returns the limited update and its norm (a 0-d fp32 tensor, the next call's ``previous_norm``). With
    no previous norm (the first step) nothing is limited. Chen et al., "Fira", arXiv:2410.01623, Sec. 3.3:
    a sudden jump in the update's norm is cut back to ``gamma`` times the previous norm, which damps the
    loss spikes of scaled-gradient updates more gently than clipping to a fixed threshold.
    """
    norm = torch.linalg.vector_norm(update.float())
    if previous_norm is None:
        return update, norm
    # torch's loader casts state tensors to the parameter's dtype; the ratio is taken in fp32 anyway.
    ratio = norm / (previous_norm.to(device=norm.device, dtype=torch.float32) + SCALING_EPS)
    shrink = torch.clamp(ratio, min=gamma) / gamma
    return update / shrink, norm / shrink


def check_apollo_settings(apollo_mode: str, norm_growth_limit: float | None, *, mode_name: str = "apollo_mode") -> None:
    """One clear ValueError for a bad ``apollo_mode`` or ``norm_growth_limit``.

    ``mode_name`` is the name the caller's user gave the mode: the engine's ``apollo_mode``, or
    ``scale_type`` for apollo-torch's param groups (``scrimp.optim.apollo``).
    """
    if apollo_mode not in APOLLO_MODES:
        raise ValueError(f"{mode_name} must be one of {APOLLO_MODES} (channel: APOLLO, tensor: APOLLO-Mini), "
                         f"got {apollo_mode!r}")
    if norm_growth_limit is not None and not (is_real(norm_growth_limit) and math.isfinite(norm_growth_limit)
                                              and norm_growth_limit >= 1.0):
        raise ValueError(f"norm_growth_limit must be None (no limiter) or a finite number >= 1 (the most the "
                         f"update's norm may grow per step; Fira and APOLLO use {FIRA_GAMMA}), got {norm_growth_limit!r}")


@register_output
class ApolloScaling(OutputRule):
    """APOLLO's output rule: the raw gradient scaled by channel- or tensor-wise factors, then norm-limited.

    ``apollo_mode`` "channel" is APOLLO, "tensor" APOLLO-Mini; ``norm_growth_limit`` is Fira's gamma
    (None turns the limiter off, apollo-torch's ``disable_nl``). The limiter's previous norm lives in the
    parameter's state under ``limiter_norm`` (a 0-d fp32 tensor). ``full_update`` returns U with Adam's
    bias correction in it, so the engine's ``W <- W - lr * scale * U`` is apollo-torch's step when the
    group's ``scale`` is sqrt of apollo-torch's ``scale`` (``scrimp.optim.apollo`` translates it).
    """

    name: ClassVar[str] = "apollo"
    state_keys: ClassVar[tuple[str, ...]] = ("limiter_norm",)
    group_keys: ClassVar[dict[str, object]] = {"apollo_mode": "channel", "norm_growth_limit": FIRA_GAMMA}
    # limiter_norm is the last applied update's norm whatever gamma is, so a resume may change gamma.
    resumable_keys: ClassVar[tuple[str, ...]] = ("norm_growth_limit",)

    def __init__(self, apollo_mode: str = "channel", norm_growth_limit: float | None = FIRA_GAMMA):
        check_apollo_settings(apollo_mode, norm_growth_limit)
        self.apollo_mode = apollo_mode
        self.norm_growth_limit = norm_growth_limit

    def scaling(self, R: Tensor, N: Tensor, side: str) -> Tensor:
        """The factor s that multiplies G (broadcastable to G's shape)."""
        if self.apollo_mode == "tensor":
            return tensor_scaling(R, N)
        return channel_scaling(R, N, channel_axis(side))

    def full_update(self, G: Tensor, R: Tensor, N: Tensor, state: dict, hp: StepHyper) -> Tensor:
        correction = bias_correction(hp.step, hp.beta1, hp.beta2)
        # apollo-torch scales G by the factor of the uncorrected Adam direction and limits that.
        scaled = G.float() * (self.scaling(R.float(), N.float(), hp.side) / correction)
        if self.norm_growth_limit is not None:
            scaled, state["limiter_norm"] = limit_norm_growth(scaled, state.get("limiter_norm"),
                                                              self.norm_growth_limit)
        return scaled.mul_(correction)
