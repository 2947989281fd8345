"""Fused update kernels for projected optimizers (GaLore, FRUGAL), with the plain-torch path as reference.

``projected_adam_step`` performs one GaLore/FRUGAL Adam step on a 2-D weight: project the gradient
(R = P^T G or G P), update the Adam moments on R, back-project the normalized step, apply decoupled
weight decay and FRUGAL's state-free residual rule on G - P P^T G ("sign_sgd", "sgd", or "scaled",
the Fira/APOLLO-style norm-ratio rule of ``scrimp.optim.rules.residual``). Backends:

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
from typing import NamedTuple

import torch

from scrimp.optim.kernels.checks import check_step_arguments
from scrimp.optim.projection import DENSE
from scrimp.optim.rules.base import StepHyper

__all__ = ["FUSED", "FusedParts", "fused_step", "fuses", "projected_adam_step", "resolve_backend",
           "triton_available"]

# The residual rules kernel 2 computes in its epilogue, by code. "scaled" (Fira/APOLLO-style, see
# scrimp.optim.rules.residual) is "sgd" times the norm ratio ||N|| / ||R||, a whole-matrix scalar that
# fused.py computes on the device between the kernels.
RESIDUAL_CODES = {None: 0, "sgd": 1, "sign_sgd": 2, "scaled": 3}
RATIO_RESIDUALS = ("scaled",)  # the codes that multiply the residual by ||N|| / ||R|| (kernel 2's code 3)


class FusedParts(NamedTuple):
    """Which compositions of the engine's parts the kernels compute: each field lists the names allowed."""

    projectors: tuple[str, ...]
    inner: tuple[str, ...]
    stores: tuple[str, ...]
    outputs: tuple[str | None, ...]
    residuals: tuple[str | None, ...]


# Kernel 1 projects with a dense P and runs Adam on fp32 moments; kernel 2 back-projects (no output
# rule) with one of the residual rules above. Every other composition takes the torch path.
FUSED = FusedParts(projectors=DENSE, inner=("adam",), stores=("fp32",), outputs=(None,),
                   residuals=tuple(RESIDUAL_CODES))


def fuses(projector_kind: str, *, inner: str, store: str, output: str | None, residual: str | None) -> bool:
    """Whether the kernels compute a step composed of these parts (by name: projector kind, inner rule,
    moment store format, output rule, residual rule). The engine asks this and nothing else."""
    return (projector_kind in FUSED.projectors and inner in FUSED.inner and store in FUSED.stores
            and output in FUSED.outputs and residual in FUSED.residuals)


def fused_step(W: torch.Tensor, G: torch.Tensor, P: torch.Tensor, moments: dict[str, torch.Tensor], hp: StepHyper,
               backend: str = "auto") -> None:
    """The engine's call for a step that ``fuses`` accepts: Adam's fp32 moments by name (inner rule "adam")."""
    projected_adam_step(W, G, P, moments["exp_avg"], moments["exp_avg_sq"], hp=hp, backend=backend)


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
    hp: StepHyper | None = None,
    backend: str = "auto",
    **kwargs,
) -> None:
    """One projected Adam step in place on W, exp_avg and exp_avg_sq (GaLore; FRUGAL with ``residual``).

    ``hp`` is a ``StepHyper`` (or its fields as keywords: step, lr, beta1, beta2, eps, weight_decay,
    scale, side, residual, residual_lr_scale). side="left": P is (m, r) and the moments are (r, n);
    side="right": P is (n, r) and the moments are (m, r). ``residual`` is None or a registered rule
    (the Triton backend computes those of ``RESIDUAL_CODES``: FRUGAL's update on G - P P^T G, at
    learning rate ``lr * residual_lr_scale``). ``step`` is the Adam step count including this update.
    W may be fp32, bf16 or fp16 (updated in fp32, stored in its dtype); the moments are fp32. Bad
    arguments raise one ValueError/TypeError before anything is written. See the module docstring
    for ``backend``.
    """
    hp = StepHyper.of(hp, kwargs)
    check_step_arguments(W, G, P, exp_avg, exp_avg_sq, hp, backend)
    if resolve_backend(backend, W) == "triton":
        if hp.residual not in FUSED.residuals:
            raise ValueError(f"backend='triton' computes the residual rules {FUSED.residuals}, got "
                             f"{hp.residual!r}; use backend='torch'")
        from scrimp.optim.kernels.fused import projected_adam_step_triton

        projected_adam_step_triton(W, G, P, exp_avg, exp_avg_sq, hp)
    else:
        from scrimp.optim.functional import projected_adam_step_torch

        projected_adam_step_torch(W, G, P, exp_avg, exp_avg_sq, hp)
