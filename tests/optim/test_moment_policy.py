"""How Adam's moments cross a projector refresh: keep (galore-torch), reset (FRUGAL), rotate.

References: a float64 rotation written out here, an exact permutation of the basis (where the
rotation must move the moments exactly), and an uninterrupted run for resume.
"""

import pytest
import torch

from scrimp.optim import GaLoreAdamW, GaLoreAdamW8bit, SubspaceAdamW
from scrimp.optim.functional import rotate_moments_


def orthonormal(rows, cols, seed):
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).Q


@pytest.mark.parametrize("side", ["left", "right"])
def test_rotation_matches_a_float64_reference_and_keeps_v_non_negative(side):
    P_old, P_new = orthonormal(30, 5, 0), orthonormal(30, 5, 1)
    g = torch.Generator().manual_seed(2)
    shape = (5, 12) if side == "left" else (12, 5)
    m, v = torch.randn(shape, generator=g), torch.rand(shape, generator=g)
    overlap = P_new.double().t() @ P_old.double()
    expect_m = overlap @ m.double() if side == "left" else m.double() @ overlap.t()
    expect_v = (overlap * overlap) @ v.double() if side == "left" else v.double() @ (overlap * overlap).t()
    rotate_moments_(m, v, P_new, P_old, side)
    torch.testing.assert_close(m.double(), expect_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.double(), expect_v, rtol=1e-5, atol=1e-6)
    assert (v >= 0).all()


def test_a_permuted_and_sign_flipped_basis_moves_the_moments_exactly():
    P_old = orthonormal(30, 4, 3)
    order, signs = torch.tensor([2, 0, 3, 1]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    P_new = P_old[:, order] * signs
    m, v = torch.randn(4, 7), torch.rand(4, 7)
    m_rot, v_rot = m.clone(), v.clone()
    rotate_moments_(m_rot, v_rot, P_new, P_old, "left")
    torch.testing.assert_close(m_rot, m[order] * signs[:, None], rtol=0, atol=1e-6)
    torch.testing.assert_close(v_rot, v[order], rtol=0, atol=1e-6)


def stream(m, n, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g)
    return [base + 0.5 * torch.randn(m, n, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("policy", ["keep", "reset", "rotate"])
def test_the_engine_carries_the_moments_as_its_policy_says(policy):
    grads = stream(10, 16, 6)
    W = torch.nn.Parameter(torch.zeros(10, 16))
    opt = GaLoreAdamW([{"params": [W], "rank": 3}], lr=1e-2, update_proj_gap=5, stagger=False, moment_policy=policy)
    for G in grads[:5]:
        W.grad = G.clone()
        opt.step()
    state = opt.state[W]
    P_old, m_old, v_old = state["proj_P"].clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    W.grad = grads[5].clone()
    opt.step()  # refresh, then one Adam step
    P_new = state["proj_P"]
    R = (P_new.t() @ grads[5]).double()
    overlap = P_new.double().t() @ P_old.double()
    carried_m, carried_v = {"keep": (m_old.double(), v_old.double()), "reset": (0 * m_old.double(), 0 * v_old.double()),
                            "rotate": (overlap @ m_old.double(), (overlap * overlap) @ v_old.double())}[policy]
    torch.testing.assert_close(state["exp_avg"].double(), 0.9 * carried_m + 0.1 * R, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"].double(), 0.999 * carried_v + 0.001 * R * R, rtol=1e-4, atol=1e-6)
    assert state["moment_step"] == (1 if policy == "reset" else 6)


def test_rotation_with_8bit_moments_tracks_fp32():
    grads = stream(64, 128, 8, seed=4)
    moved = []
    for make in (GaLoreAdamW, GaLoreAdamW8bit):
        W = torch.nn.Parameter(torch.zeros(64, 128))
        opt = make([{"params": [W], "rank": 32}], lr=1e-2, update_proj_gap=4, stagger=False, moment_policy="rotate",
                   **({"eps": 1e-6, "weight_decay": 0.0, "eps_style": "hf"} if make is GaLoreAdamW8bit else {}))
        for G in grads:
            W.grad = G.clone()
            opt.step()
        moved.append(W.detach().clone())
    assert float((moved[1] - moved[0]).norm() / moved[0].norm()) < 0.05  # 8-bit rounding, as without rotation


def test_resume_across_a_rotating_refresh_equals_no_interruption():
    grads = stream(10, 16, 12, seed=5)

    def make(W):
        return GaLoreAdamW([{"params": [W], "rank": 3}], lr=1e-2, update_proj_gap=4, moment_policy="rotate")

    W = torch.nn.Parameter(torch.zeros(10, 16))
    opt = make(W)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    W2 = torch.nn.Parameter(torch.zeros(10, 16))
    opt2 = make(W2)
    for G in grads[:6]:
        W2.grad = G.clone()
        opt2.step()
    saved = opt2.state_dict()
    opt3 = make(W2)
    opt3.load_state_dict(saved)
    for G in grads[6:]:
        W2.grad = G.clone()
        opt3.step()
    assert torch.equal(W.detach(), W2.detach())


@pytest.mark.parametrize("settings, message", [
    ({"moment_policy": "spin"}, "moment_policy must be one of"),
    ({"moment_policy": "rotate", "projector": "randk"}, "moment_policy='rotate' needs a dense projector"),
    ({"moment_policy": "rotate", "reset_statistics": True}, "reset_statistics=True is moment_policy='reset'"),
])
def test_bad_moment_policies_are_one_sentence(settings, message):
    with pytest.raises(ValueError, match=message):
        SubspaceAdamW([{"params": [torch.nn.Parameter(torch.randn(8, 12))], "rank": 2, **settings}])
