"""FRUGAL identities: density 1 is AdamW, an empty subspace with sign_sgd is signSGD, and each
projector type runs."""

import pytest
import torch

from scrimp.optim import FrugalAdamW
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
    # With sgd as the inactive rule and a zero Adam step (lr scale 0 on projected params), the
    # weight change is -lr * residual, which must be orthogonal to the subspace.
    (W,) = params()[:1]
    start = W.detach().clone()
    opt = FrugalAdamW([{"params": [W], "rank": 4}], lr=0.1, proj_type=proj_type, inactive_update_rule="sgd",
                      proj_params_lr_scale=0.0)
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


def test_blocks_rotate_and_inactive_blocks_hold_no_moments():
    ps = [torch.nn.Parameter(torch.randn(4, 6)) for _ in range(4)]
    opt = FrugalAdamW([{"params": ps, "density": 0.5}], proj_type="blocks", update_gap=2)
    active_by_step = []
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        active_by_step.append([i for i, p in enumerate(ps) if "exp_avg" in opt.state[p]])
    assert active_by_step == [[0, 1], [0, 1], [2, 3], [2, 3]]


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
