"""Kernel 1: projection GEMM R = X @ P with the Adam moment update and the normalized step in its epilogue.

Both GaLore sides are written in one "right" form: side="right" is X = G (m, n), P (n, r), R (m, r);
side="left" passes the transposed views X = G^T (n, m), P (m, r), so R^T = G^T P is (n, r) and the
moments (r, n) are read through their transposed strides. No copy is made for either side.

The epilogue follows the Adam update of Kingma & Ba (2015) as galore-torch (Zhao et al., 2024,
"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection") and Hugging Face's AdamW
write it: N = exp_avg / (sqrt(exp_avg_sq) + eps) * sqrt(1 - beta2^t) / (1 - beta1^t). Unlike the
deleted torchao GaLore kernels, betas, eps and the bias correction are runtime arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scrimp.optim.kernels import configs


@triton.jit
def _project_adam_kernel(
    x_ptr, p_ptr, m_in_ptr, v_in_ptr, m_out_ptr, v_out_ptr, n_out_ptr, r_out_ptr,
    M, K, RANK,
    stride_xm, stride_xk, stride_pk, stride_pr,
    stride_mm, stride_mr, stride_vm, stride_vr, stride_nm, stride_nr,
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, bias_correction,
    WRITE_R: tl.constexpr, DOT_PRECISION: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # 1-D grid with the rank block varying fastest: the programs that share a row block of X run
    # together, so X is re-read from L2 rather than from memory when the rank spans several blocks.
    pid = tl.program_id(0)
    num_r_blocks = tl.cdiv(RANK, BLOCK_R)
    pid_m = pid // num_r_blocks
    pid_r = pid % num_r_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < RANK
    rows64 = rows.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xm + ks[None, :].to(tl.int64) * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )
        p = tl.load(
            p_ptr + ks[:, None].to(tl.int64) * stride_pk + ranks[None, :] * stride_pr,
            mask=k_ok[:, None] & rank_ok[None, :], other=0.0,
        )
        if LOW_PRECISION_DOT:
            # Both operands bf16 (or both fp16): their products are exact in fp32, so the native
            # 16-bit dot with fp32 accumulation equals the upcast one. Compiled GPU runs only: the
            # interpreter computes 16-bit tl.dot wrongly, so the launcher never sets this there.
            acc = tl.dot(x, p, acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(x.to(tl.float32), p.to(tl.float32), acc, input_precision=DOT_PRECISION)

    mask = row_ok[:, None] & rank_ok[None, :]
    m_offsets = rows64[:, None] * stride_mm + ranks[None, :] * stride_mr
    v_offsets = rows64[:, None] * stride_vm + ranks[None, :] * stride_vr
    exp_avg = tl.load(m_in_ptr + m_offsets, mask=mask, other=0.0)
    exp_avg_sq = tl.load(v_in_ptr + v_offsets, mask=mask, other=0.0)
    exp_avg = exp_avg * beta1 + acc * one_minus_beta1
    exp_avg_sq = exp_avg_sq * beta2 + (acc * acc) * one_minus_beta2
    normalized = tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) + eps) * bias_correction
    tl.store(m_out_ptr + m_offsets, exp_avg, mask=mask)
    tl.store(v_out_ptr + v_offsets, exp_avg_sq, mask=mask)
    n_offsets = rows64[:, None] * stride_nm + ranks[None, :] * stride_nr
    tl.store(n_out_ptr + n_offsets, normalized, mask=mask)
    if WRITE_R:
        # R (the projected gradient) feeds FRUGAL's residual G - P R in kernel 2; same layout as N.
        tl.store(r_out_ptr + n_offsets, acc, mask=mask)


_project_adam_tuned = triton.autotune(
    configs=configs.PROJECTION_CONFIGS,
    key=["M", "K", "RANK", "WRITE_R", "DOT_PRECISION", "LOW_PRECISION_DOT"],
    prune_configs_by={"early_config_prune": configs.prune_rank_blocks},
    # Benchmarking a config runs the kernel, which updates the moments in place: restore them.
    restore_value=["m_out_ptr", "v_out_ptr"],
)(_project_adam_kernel)


def launch_project_adam(
    x: torch.Tensor,
    p: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_out: torch.Tensor,
    exp_avg_sq_out: torch.Tensor,
    normalized_out: torch.Tensor,
    projected_out: torch.Tensor | None,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction: float,
    dot_precision: str,
    low_precision_dot: bool,
    interpret: bool,
    config: triton.Config | None = None,
) -> None:
    """Launch kernel 1 on the right-form views: x (M, K), p (K, r), moments and outputs (M, r).

    ``exp_avg_out``/``exp_avg_sq_out`` may alias the inputs (in place) or be separate buffers with the
    same strides; ``projected_out`` (R) is written only when given. The Adam constants that lose
    precision in fp32 (1 - beta) are formed here in float64 and passed as runtime scalars.
    """
    M, K = x.shape
    rank = p.shape[1]
    for name, out, src in (("exp_avg_out", exp_avg_out, exp_avg), ("exp_avg_sq_out", exp_avg_sq_out, exp_avg_sq)):
        if out.stride() != src.stride():
            raise ValueError(f"{name} must have the same strides as its input, got {out.stride()} vs {src.stride()}")
    if projected_out is not None and projected_out.stride() != normalized_out.stride():
        raise ValueError("projected_out must have the same strides as normalized_out")
    write_r = projected_out is not None
    args = (
        x, p, exp_avg, exp_avg_sq, exp_avg_out, exp_avg_sq_out, normalized_out,
        projected_out if write_r else normalized_out,
        M, K, rank,
        x.stride(0), x.stride(1), p.stride(0), p.stride(1),
        exp_avg.stride(0), exp_avg.stride(1), exp_avg_sq.stride(0), exp_avg_sq.stride(1),
        normalized_out.stride(0), normalized_out.stride(1),
        float(beta1), float(beta2), float(1.0 - beta1), float(1.0 - beta2), float(eps), float(bias_correction),
    )
    flags = {"WRITE_R": write_r, "DOT_PRECISION": dot_precision, "LOW_PRECISION_DOT": low_precision_dot}
    if config is None and interpret:
        config = triton.Config(configs.INTERPRETER_PROJECTION_META)
    if config is not None:
        # A pinned configuration: the interpreter's fixed one, or one a test or benchmark names.
        meta = config.kwargs
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(rank, meta["BLOCK_R"]),)
        _project_adam_kernel[grid](*args, **flags, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(rank, meta["BLOCK_R"]),)

        _project_adam_tuned[grid](*args, **flags)
