"""state_bytes against the analytic count of each projector's state."""

import pytest
import torch

from scrimp.optim import FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, SubspaceAdamW
from scrimp.optim.memory import state_bytes

M, N, R = 24, 40, 5  # m <= n: std projects from the left, moments (r, n)
F32, I8 = 4, 1


def stepped(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return state_bytes(opt)


# projector kind -> (projector bytes, moment bytes) for one (M, N) weight at rank R
ANALYTIC = {
    "svd": (M * R * F32, 2 * R * N * F32),
    "gram": (M * R * F32, 2 * R * N * F32),
    "rsvd": (M * R * F32, 2 * R * N * F32),
    "random": (0, 2 * R * N * F32),  # only the seed is stored
    "randperm": (R * 4, 2 * R * N * F32),  # R random rows; their int32 indices kept until the next refresh
    "rows": (R * 4, 2 * R * N * F32),
    "columns": (R * 4, 2 * M * R * F32),
    "randk": (R * N * 4, 2 * R * N * F32),  # k = R * max(m, n) entries, int32 indices stored
}


@pytest.mark.parametrize("kind", list(ANALYTIC))
def test_state_bytes_equals_analytic_count(kind):
    W = torch.nn.Parameter(torch.randn(M, N))
    opt = SubspaceAdamW([{"params": [W], "rank": R}], projector=kind)
    got = stepped(opt, [W])
    proj, moments = ANALYTIC[kind]
    assert got == {"moments": moments, "projectors": proj, "other": 0, "total": proj + moments}


def test_state_bytes_for_blocks_full_and_empty_subspaces():
    ws = [torch.nn.Parameter(torch.randn(M, N)) for _ in range(4)]
    got = stepped(FrugalAdamW([{"params": ws, "density": 0.5}], proj_type="blocks"), ws)
    assert got["moments"] == 2 * (2 * M * N * F32) and got["projectors"] == 0  # two active blocks
    got = stepped(FrugalAdamW([{"params": ws, "density": 1.0}], proj_type="svd"), ws)
    assert got["moments"] == 4 * (2 * M * N * F32)
    assert stepped(FrugalAdamW([{"params": ws, "rank": 0}]), ws)["total"] == 0


def test_state_bytes_of_8bit_moments_and_plain_groups():
    W = torch.nn.Parameter(torch.randn(64, 256))
    b = torch.nn.Parameter(torch.randn(256))
    got = stepped(GaLoreAdamW8bit([{"params": [W], "rank": 32}, {"params": [b]}]), [W, b])
    blocks = (32 * 256) // 256
    moments_8bit = 2 * (32 * 256 * I8 + blocks * F32)
    assert got["moments"] == moments_8bit + 2 * 256 * F32  # the small bias keeps fp32 moments
    assert got["projectors"] == 64 * 32 * F32


def test_projected_state_is_below_adamw_and_counts_torch_optimizers():
    W = torch.nn.Parameter(torch.randn(M, N))
    adamw = torch.optim.AdamW([W])
    full = stepped(adamw, [W])
    assert full["moments"] == 2 * M * N * F32 and full["other"] == 4  # torch keeps `step` as a 0-d tensor
    galore = stepped(GaLoreAdamW([{"params": [W], "rank": R}]), [W])
    assert galore["total"] / full["moments"] == pytest.approx((M * R + 2 * R * N) / (2 * M * N))
