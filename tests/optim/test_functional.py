"""Pure update math against float64 references written out step by step."""

import math

import pytest
import torch

from scrimp.optim import functional as F


def reference_direction(g, m, v, step, b1, b2, eps):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return m, v, m / (v.sqrt() + eps) * math.sqrt(1 - b2**step) / (1 - b1**step)


@pytest.mark.parametrize("path", [F.adam_direction_, F.adam_direction_reference_])
def test_adam_direction_matches_float64_formula(path):
    torch.manual_seed(0)
    g, m, v = torch.randn(5, 7), torch.randn(5, 7) * 0.1, torch.rand(5, 7) * 0.01
    rm, rv, rn = reference_direction(g.double(), m.double(), v.double(), 3, 0.9, 0.99, 1e-6)
    n = path(g, m, v, step=3, beta1=0.9, beta2=0.99, eps=1e-6)
    torch.testing.assert_close(m.double(), rm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v.double(), rv, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(n.double(), rn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("rule", [None, "sign_sgd", "sgd"])
def test_projected_step_matches_float64_chain(side, rule):
    torch.manual_seed(1)
    m_, n_, r = 6, 9, 3
    W, G = torch.randn(m_, n_), torch.randn(m_, n_)
    dim = m_ if side == "left" else n_
    P = torch.linalg.qr(torch.randn(dim, r)).Q
    mshape = (r, n_) if side == "left" else (m_, r)
    ea, eas = torch.randn(mshape) * 0.1, torch.rand(mshape) * 0.1
    Wd, Gd, Pd = W.double(), G.double(), P.double()
    R = Pd.t() @ Gd if side == "left" else Gd @ Pd
    _, _, N = reference_direction(R, ea.double(), eas.double(), 4, 0.9, 0.999, 1e-8)
    U = Pd @ N if side == "left" else N @ Pd.t()
    lr, wd, scale, rls = 0.1, 0.05, 0.25, 0.5
    expect = Wd * (1 - lr * wd) - lr * scale * U
    res = Gd - (Pd @ Pd.t() @ Gd if side == "left" else Gd @ Pd @ Pd.t())
    if rule == "sign_sgd":
        expect = expect - lr * rls * torch.sign(res)
    elif rule == "sgd":
        expect = expect - lr * rls * res
    F.projected_adam_step_torch(W, G, P, ea, eas, step=4, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                                scale=scale, side=side, residual=rule, residual_lr_scale=rls)
    torch.testing.assert_close(W.double(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_residual_is_orthogonal_to_subspace(side):
    torch.manual_seed(2)
    G = torch.randn(10, 14, dtype=torch.float64)
    P = torch.linalg.qr(torch.randn(10 if side == "left" else 14, 4, dtype=torch.float64)).Q
    res = F.subspace_residual(G, P, side)
    inner = P.t() @ res if side == "left" else res @ P
    assert inner.abs().max() < 1e-12
    torch.testing.assert_close(res + F.back_project(F.project(G, P, side), P, side), G)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_coordinate_step_equals_dense_selection_matrix(dim):
    torch.manual_seed(3)
    W, G = torch.randn(6, 8), torch.randn(6, 8)
    if dim is None:
        index = torch.tensor([1, 5, 17, 30, 47])
        mshape = (5,)
    else:
        index = torch.tensor([0, 2, 5])
        mshape = (3, 8) if dim == 0 else (6, 3)
    ea, eas = torch.zeros(mshape), torch.zeros(mshape)
    W2, ea2, eas2 = W.clone(), ea.clone(), eas.clone()
    hyper = dict(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, scale=0.5, residual="sgd")
    F.coordinate_adam_step_torch(W, G, index, ea, eas, dim=dim, **hyper)
    if dim is None:  # flat entries: a dense projector over the flattened matrix (as a (1, mn) row)
        P = torch.eye(48)[:, index]
        W2v = W2.view(1, -1)
        F.projected_adam_step_torch(W2v, G.reshape(1, -1), P, ea2.view(1, -1), eas2.view(1, -1),
                                    side="right", **hyper)
    else:
        P = torch.eye(6 if dim == 0 else 8)[:, index]
        F.projected_adam_step_torch(W2, G, P, ea2, eas2, side="left" if dim == 0 else "right", **hyper)
    torch.testing.assert_close(W, W2)
    torch.testing.assert_close(ea, ea2)


def test_bf16_weight_is_updated_in_fp32_and_stored_in_bf16():
    torch.manual_seed(4)
    W = torch.randn(8, 12, dtype=torch.bfloat16)
    G = torch.randn(8, 12, dtype=torch.bfloat16)
    P = torch.linalg.qr(torch.randn(8, 3)).Q
    ea, eas = torch.zeros(3, 12), torch.zeros(3, 12)
    W32 = W.float()
    F.projected_adam_step_torch(W32, G.float(), P, ea.clone(), eas.clone(), step=1, lr=0.01, beta1=0.9,
                                beta2=0.999, eps=1e-8, weight_decay=0.0, scale=1.0, side="left")
    F.projected_adam_step_torch(W, G, P, ea, eas, step=1, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.0, scale=1.0, side="left")
    assert W.dtype == torch.bfloat16 and ea.dtype == torch.float32
    torch.testing.assert_close(W, W32.to(torch.bfloat16))


def test_foreach_adam_equals_single_tensor_formula():
    torch.manual_seed(5)
    params = [torch.randn(4, 5), torch.randn(7)]
    grads = [torch.randn_like(p) for p in params]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    expect = []
    for p, g in zip(params, grads):
        _, _, n = reference_direction(g.double(), 0 * g.double(), 0 * g.double(), 1, 0.9, 0.999, 1e-8)
        expect.append(p.double() * (1 - 1e-3 * 0.1) - 1e-3 * n)
    # scale 1 takes torch's fused kernel, another scale the foreach ops: both must match
    half = [p.detach().clone() for p in params]
    F.adam_step_foreach(params, grads, ms, vs, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    F.adam_step_foreach(half, grads, [torch.zeros_like(p) for p in half], [torch.zeros_like(p) for p in half],
                        step=1, lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, scale=0.5)
    for p, h, e in zip(params, half, expect):
        torch.testing.assert_close(h.double(), e, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-7)


def test_scaled_residual_carries_the_adam_norm_ratio():
    torch.manual_seed(6)
    res, R, N = torch.randn(5, 6), torch.randn(2, 6), torch.randn(2, 6)
    out = F.residual_update(res, "scaled", low_rank_grad=R, direction=N)
    torch.testing.assert_close(out, res * (N.norm() / R.norm()))
    with pytest.raises(ValueError, match="residual rule must be one of"):
        F.residual_update(res, "adam")


@pytest.mark.parametrize("layout", ["transposed_grad", "channels_last_param"])
def test_adam_ignores_memory_layout_and_matches_float64(layout):
    # torch's fused AdamW kernel pairs elements by memory position; a gradient (or parameter) laid
    # out differently from its moments must still get the update of its own entries.
    torch.manual_seed(6)
    if layout == "transposed_grad":
        p = torch.randn(6, 9)
        g = torch.randn(9, 6).t()  # same shape, column-major
    else:
        p = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
        g = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    m, v = torch.zeros(p.shape), torch.zeros(p.shape)  # contiguous, as the optimizers create them
    _, _, n = reference_direction(g.double(), 0 * g.double(), 0 * g.double(), 1, 0.9, 0.999, 1e-8)
    expect = p.double() * (1 - 1e-3 * 0.1) - 1e-3 * n
    F.adam_step_foreach([p], [g], [m], [v], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    torch.testing.assert_close(p.double(), expect, rtol=1e-6, atol=1e-7)
    direction = F.adam_direction_(g, torch.zeros(p.shape), torch.zeros(p.shape), step=1, beta1=0.9, beta2=0.999,
                                  eps=1e-8)
    torch.testing.assert_close(direction.double(), n, rtol=1e-6, atol=1e-7)
