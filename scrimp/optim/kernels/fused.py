"""The Triton backend of ``projected_adam_step``: kernel 1 then kernel 2, two launches per matrix.

Imported lazily (it needs Triton). Whether the kernels run compiled or in Triton's interpreter is
fixed when this module is first imported: Triton reads ``TRITON_INTERPRET`` when ``@triton.jit``
decorates a kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from scrimp.optim.functional import bias_correction, norm_ratio
from scrimp.optim.kernels import RATIO_RESIDUALS
from scrimp.optim.kernels.back_projection import launch_back_project_update
from scrimp.optim.kernels.projection import launch_project_adam
from scrimp.optim.rules.base import StepHyper


def _interpreter_on() -> bool:
    try:
        from triton import knobs  # Triton >= 3.4
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


# Captured at import, like the @triton.jit decorations above: this is the mode the kernels are in.
INTERPRETED = _interpreter_on()

# fp32 dots: "ieee" is exact fp32 FMA; "tf32x3" splits each operand into two TF32 parts and runs
# three tensor-core products (near-fp32 accuracy at tensor-core speed on sm_80+); "tf32" (~3e-4
# relative error) is never the default. The interpreter computes in numpy fp32 whatever is named.
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
DEFAULT_GPU_DOT_PRECISION = "tf32x3"


def check_triton_device(tensor: torch.Tensor) -> None:
    """Refuse a tensor the compiled or interpreted kernels cannot read, in one sentence."""
    if tensor.device.type == "cuda":
        if INTERPRETED:
            raise ValueError(
                "backend='triton' got CUDA tensors but Triton is in interpreter mode (TRITON_INTERPRET=1 was set "
                "when scrimp.optim.kernels.fused was imported); unset it to run the compiled kernels"
            )
        return
    if not INTERPRETED:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got {tensor.device}; use backend='torch' (or 'auto'), or set "
            "TRITON_INTERPRET=1 before scrimp.optim.kernels.fused is imported to run the kernels in Triton's interpreter"
        )


@triton.jit
def _runtime_bound_loop_probe(out_ptr, n):
    for i in range(0, n):
        tl.store(out_ptr + i, 1.0)


@functools.cache
def check_interpreter_runs_loops() -> None:
    """Refuse, in one sentence, an interpreter that cannot run a loop with a runtime bound, as both kernels do.

    Triton 3.6's interpreter turns a 1-element array into a Python int, which NumPy 2.4 and later
    reject; Triton 3.9 works. A tiny probe kernel finds out once per process, before any real work.
    """
    out = torch.zeros(2, device="cpu")
    try:
        _runtime_bound_loop_probe[(1,)](out, 2)
    except Exception as err:  # noqa: BLE001 - Triton wraps the NumPy TypeError in its InterpreterError
        if "0-dimensional arrays can be converted" not in repr(err):
            raise
        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter cannot run the kernels' loops under NumPy {np.__version__} "
            "(a Triton bug: it calls int() on a 1-element array); install Triton 3.9 or NumPy below 2.4 to use "
            "TRITON_INTERPRET=1, or use backend='torch'"
        ) from None


def right_form_views(W, G, P, exp_avg, exp_avg_sq, side):
    """Views that turn side="left" into the kernels' right form: transpose W, G and the moments, keep P."""
    if side == "left":
        return W.t(), G.t(), P, exp_avg.t(), exp_avg_sq.t()
    return W, G, P, exp_avg, exp_avg_sq


def projected_adam_step_triton(
    W: torch.Tensor,
    G: torch.Tensor,
    P: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hp: StepHyper | None = None,
    *,
    dot_precision: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    launch_configs: tuple[triton.Config | None, triton.Config | None] = (None, None),
    **kwargs,
) -> None:
    """One fused projected Adam step (GaLore, Zhao et al. 2024; FRUGAL residual, Zmushko et al. 2024).

    ``hp`` is a ``StepHyper`` (or its fields as keywords, as ``projected_adam_step``).
    Same math as ``scrimp.optim.functional.projected_adam_step_torch``; arguments are assumed checked
    by ``scrimp.optim.kernels.checks.check_step_arguments``. In place on W and the moments unless
    ``out = (W_out, exp_avg_out, exp_avg_sq_out)`` names separate buffers (same shapes and strides);
    ``workspace = (N, R)`` lends the (M, r) right-form fp32 intermediates (R only with a residual),
    which tests poison to prove every element is written. ``dot_precision`` defaults to "ieee" under
    the interpreter and "tf32x3" when compiled. ``launch_configs`` pins the (kernel 1, kernel 2)
    ``triton.Config``s; None means autotuned on CUDA, the fixed small one under the interpreter.
    """
    hp = StepHyper.of(hp, kwargs)
    check_triton_device(W)
    if INTERPRETED:
        check_interpreter_runs_loops()
    dot_precision = _dot_precision(dot_precision)
    W_out, exp_avg_out, exp_avg_sq_out = _out_buffers(W, exp_avg, exp_avg_sq, out)
    w, g, p, m, v = right_form_views(W, G, P, exp_avg, exp_avg_sq, hp.side)
    w_out, _, _, m_out, v_out = right_form_views(W_out, G, P, exp_avg_out, exp_avg_sq_out, hp.side)
    normalized, projected = _workspace(W, (w.shape[0], p.shape[1]), hp.residual is not None, workspace)
    # Triton launches on the current CUDA device, not the tensors' (torch ops guard this themselves):
    # without this, a weight on cuda:1 while cuda:0 is current would be read by the wrong device.
    with torch.cuda.device(W.device) if W.is_cuda else contextlib.nullcontext():
        low_precision_dot = (not INTERPRETED) and g.dtype == p.dtype and g.dtype in (torch.bfloat16, torch.float16)
        launch_project_adam(
            g, p, m, v, m_out, v_out, normalized, projected,
            beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, bias_correction=bias_correction(hp.step, hp.beta1, hp.beta2),
            dot_precision=dot_precision, low_precision_dot=low_precision_dot, interpret=INTERPRETED,
            config=launch_configs[0],
        )
        # The norm ratio of a "scaled" residual is one whole-matrix number, taken on the device between the kernels.
        ratio = norm_ratio(normalized, projected).reshape(1) if hp.residual in RATIO_RESIDUALS else None
        launch_back_project_update(
            w, w_out, g, p, normalized, projected,
            lr=hp.lr, weight_decay=hp.weight_decay, scale=hp.scale, residual=hp.residual,
            residual_lr_scale=hp.residual_lr_scale, residual_ratio=ratio,
            dot_precision=dot_precision, interpret=INTERPRETED, config=launch_configs[1],
        )


def _dot_precision(dot_precision: str | None) -> str:
    """The fp32 dot precision asked for, or the default: "ieee" under the interpreter, "tf32x3" compiled."""
    if dot_precision is None:
        return "ieee" if INTERPRETED else DEFAULT_GPU_DOT_PRECISION
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot_precision!r}")
    return dot_precision


def _out_buffers(W, exp_avg, exp_avg_sq, out):
    """(W_out, exp_avg_out, exp_avg_sq_out): the tensors themselves (in place), or ``out`` once it matches them."""
    if out is None:
        return W, exp_avg, exp_avg_sq
    for name, dst, src in zip(("W", "exp_avg", "exp_avg_sq"), out, (W, exp_avg, exp_avg_sq)):
        if dst.shape != src.shape or dst.dtype != src.dtype or dst.device != src.device:
            raise ValueError(f"out buffer for {name} must match it in shape, dtype and device")
    return out


def _workspace(W: torch.Tensor, shape: tuple[int, int], with_residual: bool, workspace):
    """The (M, r) fp32 right-form buffers (N, R) of the step: new ones, or the lent ``workspace`` once checked.

    R (kernel 1's projected gradient) is kept only for a residual rule, which kernel 2 recomputes from it.
    """
    if workspace is None:
        normalized = torch.empty(shape, dtype=torch.float32, device=W.device)
        return normalized, (torch.empty_like(normalized) if with_residual else None)
    normalized, projected = workspace
    for name, buf in (("N", normalized), ("R", projected)):
        if buf is not None and (tuple(buf.shape) != shape or buf.dtype != torch.float32 or buf.device != W.device):
            raise ValueError(f"workspace {name} must be float32 of shape {shape} on {W.device}")
    if with_residual and projected is None:
        raise ValueError("workspace R is required when a residual rule is on")
    return normalized, projected
