"""FRUGAL identities: density 1 is AdamW, an empty subspace with sign_sgd is signSGD, and each
projector type runs."""

import pytest
import torch

from scrimp.optim import FrugalAdamW, SubspaceAdamW
from scrimp.optim.functional import subspace_residual


def params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.randn(20, 8))]


def gradients(steps, shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def drive(ps, opt, grads):
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("proj_type", ["svd", "random", "randperm", "randk", "rows", "columns", "blocks"])
def test_density_one_equals_torch_adamw(proj_type):
    ours, ref = params(), params()
    grads = gradients(12, [p.shape for p in ours])
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    drive(ours, FrugalAdamW([{"params": ours, "density": 1.0}], eps=1e-12, proj_type=proj_type, **kw), grads)
    drive(ref, torch.optim.AdamW(ref, eps=1e-12, **kw), grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_empty_subspace_with_sign_sgd_equals_sign_sgd():
    ours = params()
    expect = [p.detach().clone().double() for p in ours]
    grads = gradients(10, [p.shape for p in ours])
    lr, wd, scale = 1e-2, 0.05, 0.5
    opt = FrugalAdamW([{"params": ours, "rank": 0}], lr=lr, weight_decay=wd, inactive_update_rule="sign_sgd",
                      inactive_lr_scale=scale)
    drive(ours, opt, grads)
    for gs in grads:  # signSGD with decoupled decay, float64
        for e, g in zip(expect, gs):
            e.mul_(1 - lr * wd).sub_(lr * scale * torch.sign(g.double()))
    for a, e in zip(ours, expect):
        torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-6)
    assert not any(torch.is_tensor(v) for st in opt.state.values() for v in st.values())  # no state at all


@pytest.mark.parametrize("proj_type", ["svd", "random"])
def test_residual_update_is_orthogonal_to_the_adam_subspace(proj_type):
    # With sgd as the residual rule and a zero Adam step (scale 0), the weight change is
    # -lr * residual, which must be orthogonal to the subspace. (FRUGAL's own proj_params_lr_scale
    # scales both parts, so the engine's names are used here.)
    (W,) = params()[:1]
    start = W.detach().clone()
    opt = SubspaceAdamW([{"params": [W], "rank": 4}], lr=0.1, projector=proj_type, residual="sgd", scale=0.0)
    G = torch.randn(12, 20, generator=torch.Generator().manual_seed(3))
    W.grad = G.clone()
    opt.step()
    proj = opt.projector(W, opt.param_groups[0])
    P = proj.matrix(opt.state[W], W.device)
    delta = (W.detach() - start).double()
    inner = P.double().t() @ delta if proj.side == "left" else delta @ P.double()
    assert inner.abs().max() < 1e-6
    torch.testing.assert_close(delta, -0.1 * subspace_residual(G.double(), P.double(), proj.side), atol=1e-6,
                               rtol=1e-5)


def frugal_reference(weights, grads, *, lr, wd, eps, betas, density, gap, pls, ils):
    """FRUGAL's update in float64, written from the authors' code (frugal/adamw.py AdamW with
    GaloreOptimizer, proj_type svd, proj_side std, inactive rule sign_sgd, reset_statistics=True)."""
    b1, b2 = betas
    ws = [w.detach().double().clone() for w in weights]
    states = [dict() for _ in ws]
    for gs in grads:
        for W, G, st in zip(ws, gs, states):
            G = G.double()
            m, n = G.shape
            if "step" not in st or st["step"] % gap == 0:  # refresh and reset the statistics
                U, _, Vh = torch.linalg.svd(G, full_matrices=False)
                st["left"] = m < n
                st["P"] = U[:, :round(m * density)] if st["left"] else Vh[:round(n * density)]
                down = st["P"].t() @ G if st["left"] else G @ st["P"].t()
                st.update(step=0, m=torch.zeros_like(down), v=torch.zeros_like(down))
            P = st["P"]
            W.mul_(1 - lr * wd)
            st["step"] += 1
            t = st["step"]
            down = P.t() @ G if st["left"] else G @ P.t()
            st["m"] = b1 * st["m"] + (1 - b1) * down
            st["v"] = b2 * st["v"] + (1 - b2) * down * down
            denom = st["v"].sqrt() / (1 - b2**t) ** 0.5 + eps
            low = -(lr * pls / (1 - b1**t)) * st["m"] / denom
            up = (lambda x, P=P: P @ x) if st["left"] else (lambda x, P=P: x @ P)
            W.add_(up(low) - lr * pls * ils * torch.sign(G - up(down)))
    return ws


def test_frugal_matches_a_float64_reference_of_the_authors_update():
    # Small gradients (1e-4) against eps 1e-6 make the eps placement visible: the HF placement is
    # 18-20% off here, the old residual lr (without proj_params_lr_scale) 34-37%, this code 2e-5.
    # Both lr scales are off 1, and refreshes reset the moments.
    ours = params()
    start = [p.detach().clone() for p in ours]
    grads = [[g * 1e-4 for g in gs] for gs in gradients(7, [p.shape for p in ours])]
    kw = dict(lr=1e-2, eps=1e-6, betas=(0.9, 0.999))
    opt = FrugalAdamW([{"params": ours, "density": 0.25}], weight_decay=0.1, proj_type="svd",
                      inactive_update_rule="sign_sgd", update_gap=3, stagger=False, proj_params_lr_scale=0.5,
                      inactive_lr_scale=0.3, **kw)
    drive(ours, opt, grads)
    expect = frugal_reference(start, grads, wd=0.1, density=0.25, gap=3, pls=0.5, ils=0.3, **kw)
    for a, e, s0 in zip(ours, expect, start):
        change, expected_change = a.detach().double() - s0.double(), e - s0.double()
        assert (change - expected_change).norm() / expected_change.norm() < 1e-4


@pytest.mark.parametrize("eps_style,equal", [("torch", True), ("hf", False)])
def test_eps_style_torch_is_torch_adamw_at_any_eps(eps_style, equal):
    ours, ref = params(), params()
    grads = [[g * 1e-3 for g in gs] for gs in gradients(6, [p.shape for p in ours])]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-3)
    drive(ours, SubspaceAdamW(ours, eps_style=eps_style, **kw), grads)
    drive(ref, torch.optim.AdamW(ref, **kw), grads)
    close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ours, ref))
    assert close == equal


@pytest.mark.parametrize("proj_type", ["svd", "random", "randperm", "randk", "rows", "columns", "blocks"])
@pytest.mark.parametrize("rule", ["sign_sgd", "sgd", "no"])
def test_every_frugal_configuration_reduces_a_regression_loss(proj_type, rule):
    torch.manual_seed(0)
    X, Wtrue = torch.randn(128, 20), torch.randn(20, 10)
    Y = X @ Wtrue
    layers = [torch.nn.Parameter(torch.zeros(20, 10)), torch.nn.Parameter(torch.zeros(20, 10))]
    opt = FrugalAdamW([{"params": layers, "density": 0.5}], lr=1e-1, proj_type=proj_type, update_gap=5,
                      inactive_update_rule=rule, inactive_lr_scale=0.1)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = ((X @ (layers[0] + layers[1]) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_reset_statistics_zeroes_moments_at_each_refresh():
    (W,) = params()[:1]
    opt = FrugalAdamW([{"params": [W], "density": 0.25}], proj_type="randk", update_gap=3, stagger=False,
                      reset_statistics=True)
    for t in range(4):
        W.grad = torch.ones_like(W)
        opt.step()
        assert opt.state[W]["moment_step"] == (t % 3) + 1


def active_blocks(n, density, order, steps, gap=2, seed=0):
    ps = [torch.nn.Parameter(torch.randn(4, 6)) for _ in range(n)]
    opt = FrugalAdamW([{"params": ps, "density": density}], proj_type="blocks", update_gap=gap, block_order=order,
                      seed=seed)
    active_by_step, moment_steps = [], []
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        active_by_step.append([i for i, p in enumerate(ps) if "exp_avg" in opt.state[p]])
        moment_steps.append([opt.state[p]["moment_step"] for p in ps])
    return active_by_step, moment_steps


def test_blocks_rotate_and_inactive_blocks_hold_no_moments():
    active, _ = active_blocks(4, 0.5, "ascending", 6)
    assert active == [[0, 1], [0, 1], [2, 3], [2, 3], [0, 1], [0, 1]]
    active, _ = active_blocks(5, 0.4, "descending", 6)  # FRUGAL's descending: from the last parameter down
    assert active == [[3, 4], [3, 4], [1, 2], [1, 2], [0, 4], [0, 4]]


def test_random_block_order_is_seeded_and_keeps_the_active_count():
    first, _ = active_blocks(6, 0.5, "random", 12)
    again, _ = active_blocks(6, 0.5, "random", 12)
    other, _ = active_blocks(6, 0.5, "random", 12, seed=1)
    assert first == again and first != other
    assert all(len(a) == 3 for a in first)
    assert len({tuple(a) for a in first}) > 1  # the set changes between cycles


def test_a_block_that_stays_active_restarts_its_moments_as_frugal_does():
    # 3 parameters, 2 active: parameter 0 is active in cycles 0 and 1 ([0, 1] then [2, 0]).
    active, moment_steps = active_blocks(3, 2 / 3, "ascending", 4)
    assert active == [[0, 1], [0, 1], [0, 2], [0, 2]]
    assert [m[0] for m in moment_steps] == [1, 2, 1, 2]


def test_frugal_columns_are_a_random_subset_redrawn_at_each_refresh():
    # FRUGAL's CoordinateProjector(coord_choice="columns"): int(n * density) random columns per refresh.
    W = torch.nn.Parameter(torch.zeros(6, 40))
    opt = FrugalAdamW([{"params": [W], "density": 0.25}], proj_type="columns", update_gap=1,
                      inactive_update_rule="no", weight_decay=0.0)
    chosen = []
    for _ in range(3):
        before = W.detach().clone()
        W.grad = torch.randn(6, 40)
        opt.step()
        moved = ((W.detach() - before) != 0).any(dim=0).nonzero().flatten().tolist()
        chosen.append(moved)
    assert all(len(c) == 10 for c in chosen)
    assert len({tuple(c) for c in chosen}) == 3
    assert any(c != list(range(c[0], c[0] + 10)) for c in chosen)  # not a contiguous window


@pytest.mark.parametrize("proj_type", ["randk", "randperm", "rows", "columns"])
def test_coordinate_projectors_step_bf16_weights_like_fp32_ones(proj_type):
    # bf16 weights keep fp32 moments; the step must be the fp32 step rounded once to bf16.
    torch.manual_seed(3)
    w32 = torch.nn.Parameter(torch.randn(16, 24))
    w16 = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    g = torch.randn(16, 24).to(torch.bfloat16)
    opts = [FrugalAdamW([{"params": [w], "density": 0.25}], lr=1e-2, proj_type=proj_type, seed=1)
            for w in (w32, w16)]
    w32.data.copy_(w16.detach().float())  # same starting values
    for w, opt in zip((w32, w16), opts):
        w.grad = g.to(w.dtype)
        opt.step()
    assert w16.dtype == torch.bfloat16
    assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))


@pytest.mark.parametrize("proj_side, selected", [("std", 4), ("right", 4), ("left", 20), ("reverse_std", 20)])
def test_density_counts_directions_on_the_selected_side(proj_side, selected):
    # A (40, 8) weight at density 0.5: randperm picks half of the rows (left) or half of the
    # columns (right), never half of min(m, n) on the larger side.
    w = torch.nn.Parameter(torch.randn(40, 8))
    opt = FrugalAdamW([{"params": [w], "density": 0.5}], proj_type="randperm", proj_side=proj_side)
    w.grad = torch.randn(40, 8)
    opt.step()
    state = opt.state[w]
    rows, cols = state["exp_avg"].shape
    assert (rows if proj_side in ("left", "reverse_std") else cols) == selected
    assert rows * cols == 0.5 * w.numel()


def test_a_flat_parameter_list_projects_its_matrices_and_checks_density():
    W, b = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))
    opt = FrugalAdamW([W, b], density=0.25, proj_type="svd")
    W.grad, b.grad = torch.randn(64, 64), torch.randn(64)
    opt.step()
    assert opt.state[W]["exp_avg"].shape == (64, 16) and opt.state[b]["exp_avg"].shape == (64,)
    for bad in (-3, 2.0, "0.5"):
        with pytest.raises(ValueError, match="density must be in"):
            FrugalAdamW([W], density=bad)


def test_blocks_state_saved_before_block_cycle_existed_resumes_exactly():
    def run(steps, opt=None, ps=None):
        ps = ps or [torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(i))) for i in range(3)]
        opt = opt or FrugalAdamW([{"params": ps, "density": 2 / 3}], proj_type="blocks", update_gap=2,
                                 block_order="ascending")
        for t in steps:
            for i, p in enumerate(ps):
                p.grad = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * t + i))
            opt.step()
        return ps, opt

    straight, _ = run(range(6))
    ps, opt = run(range(3))
    old = opt.state_dict()  # as written before block_cycle, eps_style and block_order were saved
    for state in old["state"].values():
        state.pop("block_cycle", None)
    for key in ("eps_style", "block_order"):
        old["param_groups"][0].pop(key)
    fresh = FrugalAdamW([{"params": ps, "density": 2 / 3}], proj_type="blocks", update_gap=2, eps_style="torch",
                        block_order="ascending")
    fresh.load_state_dict(old)
    fresh.param_groups[0]["eps_style"] = "torch"  # the old default was the HF placement; this run used torch's
    resumed, _ = run(range(3, 6), fresh, ps)
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_random_blocks_follow_a_loaded_seed():
    ps = [torch.nn.Parameter(torch.randn(4, 6)) for _ in range(6)]
    opt = FrugalAdamW([{"params": ps, "density": 0.5}], proj_type="blocks", update_gap=4, seed=0)
    for p in ps:
        p.grad = torch.randn(4, 6)
    opt.step()
    other = FrugalAdamW([{"params": ps, "density": 0.5}], proj_type="blocks", update_gap=4, seed=1)
    other.step()
    saved = other.state_dict()
    opt.load_state_dict(saved)
    opt.step()
    other.step()
    assert [("exp_avg" in opt.state[p]) for p in ps] == [("exp_avg" in other.state[p]) for p in ps]


def test_blocks_match_a_float64_reference_of_the_authors_block_optimizer():
    # FRUGAL's BlockOptimizer (descending order, as its LLaMA scripts use): every gap steps all blocks
    # are reset and round(density * n) of them, counted down from the last, get fresh Adam state; the
    # active ones move by Adam with lr * proj_params_lr_scale, the others by signSGD with
    # lr * proj_params_lr_scale * inactive_lr_scale. Decay first, on all of them.
    lr, wd, eps, (b1, b2), gap, pls, ils = 1e-2, 0.1, 1e-6, (0.9, 0.999), 2, 0.5, 0.3
    shapes = [(6, 4), (5, 3), (4, 4), (3, 7), (2, 5)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(100 * t + i)) * 1e-4
              for i, s in enumerate(shapes)] for t in range(7)]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    opt = FrugalAdamW([{"params": ours, "density": 0.4}], lr=lr, weight_decay=wd, eps=eps, betas=(b1, b2),
                      proj_type="blocks", block_order="descending", update_gap=gap, proj_params_lr_scale=pls,
                      inactive_lr_scale=ils)
    drive(ours, opt, grads)

    ws, n, k, start_block = [w.double().clone() for w in start], len(shapes), round(0.4 * len(shapes)), None
    states = [None] * n
    for t, gs in enumerate(grads):
        if t % gap == 0:  # _update_states: deactivate all, activate k counted down from next_block_start
            start_block = n - 1 if start_block is None else (start_block - k) % n
            active = {(start_block - j) % n for j in range(k)}
            states = [dict(step=0, m=torch.zeros_like(w), v=torch.zeros_like(w)) if i in active else None
                      for i, w in enumerate(ws)]
        for i, (W, G) in enumerate(zip(ws, gs)):
            G = G.double()
            W.mul_(1 - lr * wd)
            st = states[i]
            if st is None:
                W.add_(-lr * pls * ils * torch.sign(G))
                continue
            st["step"] += 1
            st["m"] = b1 * st["m"] + (1 - b1) * G
            st["v"] = b2 * st["v"] + (1 - b2) * G * G
            denom = st["v"].sqrt() / (1 - b2 ** st["step"]) ** 0.5 + eps
            W.add_(-(lr * pls / (1 - b1 ** st["step"])) * st["m"] / denom)
    for a, e, s0 in zip(ours, ws, start):
        change, expected = a.detach().double() - s0.double(), e - s0.double()
        assert (change - expected).norm() / expected.norm() < 1e-4  # fp32 weights: ~2e-5 of rounding


def test_coordinate_sizes_round_down_as_frugal_does():
    # FRUGAL's CoordinateProjector takes int(n * density) columns / entries; its GaLoreProjector round(...).
    W = torch.nn.Parameter(torch.randn(6, 30))
    sizes = {}
    for proj_type in ("columns", "randk", "randperm"):
        opt = FrugalAdamW([{"params": [W], "density": 0.26}], proj_type=proj_type, inactive_update_rule="no")
        W.grad = torch.randn(6, 30)
        opt.step()
        sizes[proj_type] = opt.state[W]["exp_avg"].numel()
    assert sizes == {"columns": 6 * 7, "randk": 46, "randperm": 2 * 30}  # int(7.8), int(46.8), round(1.56) rows


def test_mirror_block_order_pairs_the_front_with_the_back():
    active, _ = active_blocks(6, 4 / 6, "mirror", 6)  # FRUGAL's mirror: k/2 pairs (j, n-1-j), moving forward
    assert active == [[0, 1, 4, 5], [0, 1, 4, 5], [0, 2, 3, 5], [0, 2, 3, 5], [1, 2, 3, 4], [1, 2, 3, 4]]
    with pytest.raises(ValueError, match="block_order 'mirror' activates blocks in pairs"):
        active_blocks(5, 0.6, "mirror", 1)
