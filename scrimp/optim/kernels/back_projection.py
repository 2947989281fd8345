"""Kernel 2: back-projection GEMM U = N @ P^T with the whole weight update in its epilogue.

Right form as in kernel 1 (side="left" passes transposed views): W, G are (M, K), P is (K, r),
N and R are (M, r). Per output tile of W:

    W <- W * (1 - lr * weight_decay)                   decoupled decay (Loshchilov & Hutter, 2019)
    W <- W - lr * scale * (N @ P^T)                    GaLore's back-projected Adam step (Zhao et al., 2024)
    W <- W - lr * residual_lr_scale * rule(G - R @ P^T)  FRUGAL's state-free residual (Zmushko et al., 2024)

The residual tile G - P P^T G is recomputed here from the small R = P^T G that kernel 1 wrote, with the
same P tile the update uses, so the full-size residual never exists in memory. W is read and written
once, in its own dtype, with all arithmetic in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scrimp.optim.kernels import RESIDUAL_CODES, configs  # noqa: F401  (RESIDUAL_CODES: declared with FUSED)


@triton.jit
def _round_to_bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even by bit arithmetic (interpreter only: its cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _back_project_update_kernel(
    w_in_ptr, w_out_ptr, g_ptr, p_ptr, n_ptr, r_ptr, residual_ratio_ptr,
    M, K, RANK,
    stride_wm, stride_wk, stride_gm, stride_gk, stride_pk, stride_pr, stride_nm, stride_nr,
    decay_factor, update_coef, residual_coef,
    RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MANUAL_BF16_ROUNDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Column block varies fastest: concurrent programs share one row block of N (and R) in L2.
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(K, BLOCK_N)
    pid_m = pid // num_n_blocks
    pid_n = pid % num_n_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < K
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    update = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    projected_back = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, RANK, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < RANK
        p_t = tl.load(
            p_ptr + ranks[:, None] * stride_pr + cols64[None, :] * stride_pk,
            mask=rank_ok[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)
        low_rank_offsets = rows64[:, None] * stride_nm + ranks[None, :] * stride_nr
        low_rank_mask = row_ok[:, None] & rank_ok[None, :]
        n = tl.load(n_ptr + low_rank_offsets, mask=low_rank_mask, other=0.0)
        update = tl.dot(n, p_t, update, input_precision=DOT_PRECISION)
        if RESIDUAL != 0:
            r = tl.load(r_ptr + low_rank_offsets, mask=low_rank_mask, other=0.0)
            projected_back = tl.dot(r, p_t, projected_back, input_precision=DOT_PRECISION)

    mask = row_ok[:, None] & col_ok[None, :]
    w_offsets = rows64[:, None] * stride_wm + cols64[None, :] * stride_wk
    w = tl.load(w_in_ptr + w_offsets, mask=mask, other=0.0).to(tl.float32)
    w = w * decay_factor
    w = w - update_coef * update
    if RESIDUAL != 0:
        g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols64[None, :] * stride_gk, mask=mask, other=0.0)
        residual = g.to(tl.float32) - projected_back
        if RESIDUAL == 2:
            residual = tl.where(residual > 0, 1.0, tl.where(residual < 0, -1.0, 0.0))
        if RESIDUAL == 3:
            residual = residual * tl.load(residual_ratio_ptr)
        w = w - residual_coef * residual
    if MANUAL_BF16_ROUNDING:
        # Triton's interpreter (3.9) truncates fp32 -> bf16 casts, compiled code rounds to nearest even.
        tl.store(w_out_ptr + w_offsets, _round_to_bf16_rtne(w), mask=mask)
    else:
        tl.store(w_out_ptr + w_offsets, w.to(w_out_ptr.dtype.element_ty), mask=mask)


_back_project_update_tuned = triton.autotune(
    configs=configs.BACK_PROJECTION_CONFIGS,
    key=["M", "K", "RANK", "RESIDUAL", "DOT_PRECISION", "MANUAL_BF16_ROUNDING"],
    prune_configs_by={"early_config_prune": configs.prune_rank_blocks},
    # Benchmarking a config writes W (in place in normal use): restore it after each trial.
    restore_value=["w_out_ptr"],
)(_back_project_update_kernel)


def launch_back_project_update(
    w: torch.Tensor,
    w_out: torch.Tensor,
    g: torch.Tensor,
    p: torch.Tensor,
    normalized: torch.Tensor,
    projected: torch.Tensor | None,
    *,
    lr: float,
    weight_decay: float,
    scale: float,
    residual: str | None,
    residual_lr_scale: float,
    residual_ratio: torch.Tensor | None = None,
    dot_precision: str,
    interpret: bool,
    config: triton.Config | None = None,
) -> None:
    """Launch kernel 2 on the right-form views: w, w_out, g (M, K), p (K, r), normalized/projected (M, r).

    ``w_out`` may alias ``w`` (in place) or be a separate buffer with the same strides and dtype;
    ``projected`` (R from kernel 1) is required when ``residual`` is not None, and ``residual_ratio``
    (a one-element fp32 device tensor, ||N|| / ||R||) when it is "scaled". ``config`` pins one launch
    configuration (default: the autotuner on CUDA, ``configs.INTERPRETER_BACK_PROJECTION_META`` interpreted).
    """
    M, K = w.shape
    rank = p.shape[1]
    if w_out.stride() != w.stride() or w_out.dtype != w.dtype:
        raise ValueError("w_out must have the same strides and dtype as w")
    code = RESIDUAL_CODES[residual]
    if code != 0 and (projected is None or projected.stride() != normalized.stride()):
        raise ValueError("projected (R = P^T G from kernel 1, laid out like normalized) is required for a residual rule")
    if code == 3 and (residual_ratio is None or residual_ratio.numel() != 1 or residual_ratio.dtype != torch.float32):
        raise ValueError("residual_ratio (a one-element float32 tensor) is required for residual='scaled'")
    args = (
        w, w_out, g, p, normalized, projected if code != 0 else normalized,
        residual_ratio if code == 3 else normalized,
        M, K, rank,
        w.stride(0), w.stride(1), g.stride(0), g.stride(1), p.stride(0), p.stride(1),
        normalized.stride(0), normalized.stride(1),
        float(1.0 - lr * weight_decay), float(lr * scale), float(lr * residual_lr_scale),
    )
    flags = {
        "RESIDUAL": code,
        "DOT_PRECISION": dot_precision,
        "MANUAL_BF16_ROUNDING": interpret and w.dtype == torch.bfloat16,
    }
    if config is None and interpret:
        config = triton.Config(configs.INTERPRETER_BACK_PROJECTION_META)
    if config is not None:
        # A pinned configuration: the interpreter's fixed one, or one a test or benchmark names.
        meta = config.kwargs
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
        _back_project_update_kernel[grid](*args, **flags, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

        _back_project_update_tuned[grid](*args, **flags)
