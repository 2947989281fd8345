"""Float64 reference of one projected Adam step and random test problems for the kernel tests.

Written from the formulas in /tmp/interfaces.md (GaLore: Zhao et al., 2024; FRUGAL: Zmushko et
al., 2024; Adam as galore-torch/HF), independently of scrimp.optim.functional and of the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Problem:
    """One weight with its gradient, projector and Adam moments (all tensors are fresh random draws)."""

    W: torch.Tensor
    G: torch.Tensor
    P: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


def random_problem(m, n, rank, side, *, w_dtype=torch.float32, p_dtype=None, device="cpu", generator=None,
                   orthonormal=True):
    """Random W, G (in ``w_dtype``), P (orthonormal columns, as SVD projectors, or Gaussian) and positive moments."""
    gen = generator

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    p_rows = m if side == "left" else n
    P = torch.linalg.qr(randn(p_rows, rank))[0] if orthonormal else randn(p_rows, rank) / math.sqrt(p_rows)
    low = (rank, n) if side == "left" else (m, rank)
    exp_avg = 0.1 * randn(*low)
    exp_avg_sq = 0.01 + torch.rand(*low, generator=gen, dtype=torch.float64)
    return Problem(
        W=randn(m, n).to(device=device, dtype=w_dtype),
        G=randn(m, n).to(device=device, dtype=w_dtype),
        P=P.to(device=device, dtype=p_dtype or w_dtype),
        exp_avg=exp_avg.to(device=device, dtype=torch.float32),
        exp_avg_sq=exp_avg_sq.to(device=device, dtype=torch.float32),
    )


def fresh_gradient(problem: Problem, generator=None) -> torch.Tensor:
    """A new random gradient like ``problem.G`` (each step of a multi-step test sees fresh data)."""
    g = torch.randn(problem.G.shape, generator=generator, dtype=torch.float64)
    return g.to(device=problem.G.device, dtype=problem.G.dtype)


def reference_step(W, G, P, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, scale, side,
                   residual=None, residual_lr_scale=1.0):
    """One step in float64 on copies; returns dict W, exp_avg, exp_avg_sq, N, R, residual (the full-size G - PP^T G)."""
    W, G, P, m, v = (t.detach().to(device="cpu", dtype=torch.float64) for t in (W, G, P, exp_avg, exp_avg_sq))
    R = P.T @ G if side == "left" else G @ P
    m = beta1 * m + (1.0 - beta1) * R
    v = beta2 * v + (1.0 - beta2) * R * R
    N = m / (v.sqrt() + eps) * (math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step))
    U = P @ N if side == "left" else N @ P.T
    W = W * (1.0 - lr * weight_decay) - lr * scale * U
    res = G - (P @ R if side == "left" else R @ P.T)
    if residual == "sign_sgd":
        W = W - lr * residual_lr_scale * torch.sign(res)
    elif residual == "sgd":
        W = W - lr * residual_lr_scale * res
    elif residual == "scaled":
        r_norm = R.norm()
        ratio = N.norm() / r_norm if r_norm > 0 else 0.0
        W = W - lr * residual_lr_scale * ratio * res
    elif residual is not None:
        raise ValueError(f"unknown residual {residual!r}")
    return {"W": W, "exp_avg": m, "exp_avg_sq": v, "N": N, "R": R, "residual": res}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN anywhere in ``actual`` gives NaN, which fails any <)."""
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    return float((actual - expected).norm() / expected.norm())
