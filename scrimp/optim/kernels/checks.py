"""Argument checks shared by every backend of ``projected_adam_step``.

One clear sentence per bad input, raised before any tensor is touched, so that the Triton and the
torch backends refuse exactly the same calls.
"""

from __future__ import annotations

import math
import numbers

import torch

from scrimp.optim.functional import SIDES, residual_rule
from scrimp.optim.rules.base import StepHyper

BACKENDS = ("auto", "torch", "triton")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def low_rank_shape(weight_shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    """Shape of R = P^T G (side="left") or R = G P (side="right") for a (m, n) weight and a rank-r P."""
    m, n = weight_shape
    return (rank, n) if side == "left" else (m, rank)


def projector_shape(weight_shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    """Shape of P: (m, r) for side="left", (n, r) for side="right"."""
    m, n = weight_shape
    return (m, rank) if side == "left" else (n, rank)


def check_step_arguments(
    W: torch.Tensor,
    G: torch.Tensor,
    P: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hp: StepHyper,
    backend: str,
) -> None:
    """Validate one projected Adam step's arguments; raise ValueError/TypeError naming the first bad one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    side = hp.side
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if hp.residual is not None:
        residual_rule(hp.residual)  # one ValueError naming the registered rules
    _check_tensors(W, G, P, exp_avg, exp_avg_sq, side)
    _check_numbers(hp)


def _check_tensors(W, G, P, exp_avg, exp_avg_sq, side: str) -> None:
    """Types, dtypes, shapes, layout and device of the step's tensors."""
    for name, tensor in (("W", W), ("G", G), ("P", P), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if W.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"W must be float32, bfloat16 or float16, got {W.dtype}")
    for name, tensor in (("G", G), ("P", P)):
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    for name, tensor in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if tensor.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (Adam moments are kept in fp32), got {tensor.dtype}")
    if G.shape != W.shape:
        raise ValueError(f"G must have W's shape {tuple(W.shape)}, got {tuple(G.shape)}")
    rank = P.shape[1]
    expected_p = projector_shape(tuple(W.shape), rank, side)
    if tuple(P.shape) != expected_p:
        raise ValueError(
            f"P must have shape {expected_p} for side={side!r} and a {tuple(W.shape)} weight, got {tuple(P.shape)}"
        )
    expected_r = low_rank_shape(tuple(W.shape), rank, side)
    for name, tensor in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if tuple(tensor.shape) != expected_r:
            raise ValueError(f"{name} must have the low-rank shape {expected_r} for side={side!r}, got {tuple(tensor.shape)}")
    if W.requires_grad and torch.is_grad_enabled():
        raise ValueError("W requires grad: call projected_adam_step under torch.no_grad(), as optimizers step")
    if exp_avg.data_ptr() == exp_avg_sq.data_ptr() or any(st == 0 and n > 1 for t in (W, exp_avg, exp_avg_sq)
                                                                for st, n in zip(t.stride(), t.shape)):
        raise ValueError("W, exp_avg and exp_avg_sq must be separate tensors without broadcast (stride-0) dimensions")
    devices = {t.device for t in (W, G, P, exp_avg, exp_avg_sq)}
    if len(devices) != 1:
        raise ValueError(f"W, G, P, exp_avg and exp_avg_sq must be on one device, got {sorted(map(str, devices))}")


def _check_numbers(hp: StepHyper) -> None:
    """The numbers of ``hp``: step an int >= 1, betas in [0, 1), eps > 0, the rest finite and >= 0."""
    step = hp.step
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the step count after this update), got {step!r}")
    for name, value in (("beta1", hp.beta1), ("beta2", hp.beta2)):
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    eps = hp.eps
    if isinstance(eps, bool) or not (isinstance(eps, numbers.Real) and eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    for name in ("lr", "weight_decay", "scale", "residual_lr_scale"):
        value = getattr(hp, name)
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
