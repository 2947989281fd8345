"""Launch configurations for the fused projected-update kernels.

On CUDA the kernels are autotuned over the lists below, written for H100/H200-class GPUs (sm_90).
Under ``TRITON_INTERPRET=1`` one small
fixed configuration is used, because the interpreter runs every program in Python and only
correctness matters there. The lists are starting points; benchmarks/kernels.py prints which one won.
"""

from __future__ import annotations

import triton

# Chosen from an sm_90 compile report (``benchmarks/kernels.py --compile-report``, ptxas from Triton
# 3.9, no GPU needed, 2026-11-25): tiles whose tf32x3 variant keeps within 255 registers without
# spilling (kernel 1), or spilling at most ~100 bytes with a residual (kernel 2, which holds two
# accumulators plus the W and G tiles). Larger tiles (128x128, 64x256) spilled 300-2000 bytes at any
# warp count and were dropped. Speed among these is for the autotuner on the GPU to decide.
# Added 2026-11-27 (same report and criterion): on a first H200 run kernel 2's autotuner mostly picked
# the last, narrowest-M tile of its list (32x128, BLOCK_R 16), i.e. a winner at the list's edge, so
# wider and thinner tiles were compiled: 32x256 BLOCK_R 16 (8 warps), 16x128 BLOCK_R 16 and 32,
# 16x256 BLOCK_R 16 (4 and 8 warps) pass. Rejected: 32x256 with 4 warps (the GaLore variant already
# spills 40-48 bytes at BLOCK_R 16, 304 at BLOCK_R 32), and 32x256 (8 warps), 16x256 and 32x128 at
# BLOCK_R 32 (160-184 bytes with a residual).

# Kernel 1 (projection GEMM + Adam epilogue): output tile BLOCK_M x BLOCK_R of the low-rank R,
# reduction over the long side in BLOCK_K chunks. Small BLOCK_M keeps enough programs in flight when
# the low-rank side is short (e.g. 4096 rows at rank 128 is only 64 tiles of 64 rows).
PROJECTION_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_R": br, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, br, bk, w, s in [
        (32, 32, 32, 4, 3),
        (32, 32, 64, 4, 3),
        (32, 64, 32, 4, 3),
        (64, 32, 32, 4, 3),
        (64, 64, 32, 8, 3),
        (64, 32, 64, 8, 3),
        (64, 64, 64, 8, 3),
        (128, 32, 32, 8, 3),
        (32, 128, 32, 8, 3),
        (16, 64, 64, 4, 3),
    ]
]

# Kernel 2 (back-projection GEMM + weight epilogue): output tile BLOCK_M x BLOCK_N of W, reduction
# over the rank in BLOCK_R chunks. Memory-bound at low rank: the W and G tiles dominate the bytes.
BACK_PROJECTION_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br}, num_warps=w, num_stages=s)
    for bm, bn, br, w, s in [
        (64, 64, 32, 4, 3),
        (64, 32, 32, 4, 3),
        (32, 64, 32, 4, 3),
        (64, 128, 32, 8, 3),
        (128, 64, 32, 8, 3),
        (64, 64, 16, 4, 4),
        (64, 128, 16, 8, 4),
        (32, 128, 16, 4, 4),
        # 2026-11-27: beyond the 32x128 edge (see above).
        (32, 256, 16, 8, 4),
        (16, 128, 16, 4, 4),
        (16, 256, 16, 4, 4),
        (16, 256, 16, 8, 4),
        (16, 128, 32, 4, 3),
    ]
]

# Under the interpreter: the smallest tiles tl.dot accepts (16) on the rank axis, 32 elsewhere, so
# that the small test shapes span several tiles and partial tiles on every axis.
INTERPRETER_PROJECTION_META = {"BLOCK_M": 32, "BLOCK_R": 16, "BLOCK_K": 32}
INTERPRETER_BACK_PROJECTION_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_R": 16}


def prune_rank_blocks(configs, named_args, **kwargs):
    """Drop configs whose rank block exceeds the rank padded to a power of two: they only add masked work."""
    rank = named_args["RANK"]
    padded = max(16, triton.next_power_of_2(rank))
    kept = [c for c in configs if c.kwargs["BLOCK_R"] <= padded]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_R"])]
