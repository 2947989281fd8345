"""Fused update kernels for projected optimizers (GaLore, FRUGAL), with the plain-torch path as reference.

``projected_adam_step`` performs one GaLore/FRUGAL Adam step on a 2-D weight: project the gradient
(R = P^T G or G P), update the Adam moments on R, back-project the normalized step, apply decoupled
weight decay and FRUGAL's state-free residual rule on G - P P^T G ("sign_sgd", "sgd", or "scaled",
the Fira/APOLLO-style norm-ratio rule of ``scrimp.optim.functional.residual_update``). Backends:

- ``"triton"``: two fused Triton kernels (``projection.py``: projection GEMM + Adam epilogue;
  ``back_projection.py``: back-projection GEMM + weight-update epilogue), on CUDA, or on the CPU in
  Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were imported;
- ``"torch"``: ``scrimp.optim.functional.projected_adam_step_torch``, the reference the kernels equal;
- ``"auto"`` (default): Triton for CUDA tensors when Triton imports, the torch path otherwise.

Example::

    from scrimp.optim.kernels import projected_adam_step
    projected_adam_step(W, G, P, exp_avg, exp_avg_sq, step=1, lr=1e-3, beta1=0.9, beta2=0.999,
                        eps=1e-8, weight_decay=0.0, scale=0.25, side="left", residual="sign_sgd")

Follows GaLore (Zhao et al., 2024, arXiv:2403.03507; github.com/jiaweizzhao/GaLore) and FRUGAL
(Zmushko et al., 2024, arXiv:2411.07837); the fused-kernel idea after torchao's former GaLore kernels
(pytorch/ao, removed in PRs #2397/#2417), rewritten with bias correction, weight decay and runtime
hyper-parameters.
"""

from __future__ import annotations

import importlib.util

import torch

from scrimp.optim.kernels.checks import check_step_arguments

__all__ = ["projected_adam_step", "resolve_backend", "triton_available"]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is optional: ``pip install scrimp[kernels]``)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, W: torch.Tensor) -> str:
    """Map ``backend`` ("auto", "torch", "triton") to the one that will run for weight ``W``."""
    if backend == "auto":
        return "triton" if (W.device.type == "cuda" and triton_available()) else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install 'scrimp[kernels]'); it is not installed")
    return backend


def projected_adam_step(
    W: torch.Tensor,
    G: torch.Tensor,
    P: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    side: str,
    residual: str | None = None,
    residual_lr_scale: float = 1.0,
    backend: str = "auto",
) -> None:
    """One projected Adam step in place on W, exp_avg and exp_avg_sq (GaLore; FRUGAL with ``residual``).

    side="left": P is (m, r) and the moments are (r, n); side="right": P is (n, r) and the moments are
    (m, r). ``residual`` is None, "sign_sgd", "sgd" or "scaled" (FRUGAL's update on G - P P^T G, at
    learning rate ``lr * residual_lr_scale``). ``step`` is the Adam step count including this update. W may be fp32,
    bf16 or fp16 (updated in fp32, stored in its dtype); the moments are fp32. Bad arguments raise
    one ValueError/TypeError before anything is written. See the module docstring for ``backend``.
    """
    check_step_arguments(
        W, G, P, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, scale=scale, side=side, residual=residual,
        residual_lr_scale=residual_lr_scale, backend=backend,
    )
    hyper = dict(
        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
        side=side, residual=residual, residual_lr_scale=residual_lr_scale,
    )
    if resolve_backend(backend, W) == "triton":
        from scrimp.optim.kernels.fused import projected_adam_step_triton

        projected_adam_step_triton(W, G, P, exp_avg, exp_avg_sq, **hyper)
    else:
        from scrimp.optim.functional import projected_adam_step_torch

        projected_adam_step_torch(W, G, P, exp_avg, exp_avg_sq, **hyper)
