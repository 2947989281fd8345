"""APOLLO's parts (scrimp.optim.rules.apollo) against a float64 reference and, teacher-forced, apollo-torch.

A small local loop drives the parts one weight at a time as the engine composes them (project, Adam
with HF eps via ``functional.adam_direction_``, ``ApolloScaling.full_update``, decoupled decay, apply),
so each part is checked without the engine; ``test_local_loop_is_the_engines_composition`` ties the loop
to ``ApolloAdamW``, and ``tests/optim/test_apollo.py`` tests the composed optimizer against apollo-torch.
"""

import math

import pytest
import torch

from scrimp.optim import functional as F
from scrimp.optim.apollo import ApolloAdamW
from scrimp.optim.rules.apollo import (
    ApolloScaling,
    apollo_base_seed,
    apollo_projection,
    apollo_seed,
    channel_scaling,
    limit_norm_growth,
    next_apollo_seed,
    tensor_scaling,
)
from scrimp.optim.rules.base import StepHyper
from scrimp.optim.rules.registry import OUTPUT_RULES

U32 = 2.0**-24  # unit roundoff of fp32
BETAS, EPS = (0.9, 0.999), 1e-6
# Two matrices, one per side (GaLore's "std" rule: the smaller side is projected).
WIDE, TALL = (8, 20), (24, 6)  # left (R is (r, 20)), right (R is (24, r))


def side_of(shape):
    return "left" if shape[0] < shape[1] else "right"


def growing_gradients(shape, steps, seed, magnitude=1e-5):
    """Gradients small enough that Adam's eps and APOLLO's 1e-8 guards matter, with norms that grow
    faster than Fira's 1.01 per step on some steps (the limiter acts) and shrink on others."""
    gen = torch.Generator().manual_seed(seed)
    growth = [1.0, 1.5, 0.7, 2.0, 1.0, 3.0, 0.5, 1.2, 1.8][:steps]
    return [magnitude * g * torch.randn(shape, generator=gen) for g in growth]


def local_apollo(W, grads, projection, rule, *, lr, scale, weight_decay, gap, side):
    """The engine's composition, by hand: returns the final fp32 weight and the rule's state."""
    W = W.clone()
    state: dict = {}
    P = None
    m = v = None
    for t, G in enumerate(grads):
        if t % gap == 0:
            P = projection(t // gap)
        R = F.project(G, P, side)
        if m is None:
            m, v = torch.zeros_like(R), torch.zeros_like(R)
        step = t + 1
        N = F.adam_direction_(R, m, v, step=step, beta1=BETAS[0], beta2=BETAS[1],
                              eps=F.hf_eps(EPS, step, BETAS[1], "hf"))
        hp = StepHyper(step=step, lr=lr, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=weight_decay,
                       scale=math.sqrt(scale), side=side)
        U = rule.full_update(G, R, N, state, hp)
        F.decay_(W, lr=lr, weight_decay=weight_decay)
        F.apply_update_(W, U, -lr * hp.scale)
    return W, state


def reference_apollo(W, grads, projections, *, lr, scale, weight_decay, gap, side, mode, gamma):
    """APOLLO written out in float64 from the paper (Alg. 1) with apollo-torch's choices (module doc of
    rules/apollo.py): HF eps, factors from the bias-corrected Adam direction, the limiter on the
    uncorrected scaled gradient, channels along the unprojected side, decay on W_{t-1}.

    Returns the weight and, per step, ``lr * sqrt(scale) * max|update|`` (for the error bound)."""
    W = W.double()
    b1, b2 = BETAS
    m = v = None
    previous = None
    sizes = []
    for t, G in enumerate(grads):
        G, P = G.double(), projections[t // gap].double()
        R = P.t() @ G if side == "left" else G @ P
        m = (1 - b1) * R if m is None else b1 * m + (1 - b1) * R
        v = (1 - b2) * R * R if v is None else b2 * v + (1 - b2) * R * R
        k = t + 1
        corr = math.sqrt(1 - b2**k) / (1 - b1**k)
        N = (m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + EPS / math.sqrt(1 - b2**k))
        if mode == "tensor":
            s = torch.sqrt((N * N).sum()) / (torch.sqrt((R * R).sum()) + 1e-8)
        elif side == "left":  # one factor per column of G
            s = torch.stack([N[:, j].norm() / (R[:, j].norm() + 1e-8) for j in range(G.shape[1])])[None, :]
        else:  # one per row
            s = torch.stack([N[i].norm() / (R[i].norm() + 1e-8) for i in range(G.shape[0])])[:, None]
        raw = G * s / corr
        norm = raw.norm()
        if previous is not None and gamma is not None:
            shrink = max(norm / (previous + 1e-8), gamma) / gamma
            raw, norm = raw / shrink, norm / shrink
        previous = norm
        update = corr * raw
        W = W * (1 - lr * weight_decay) - lr * math.sqrt(scale) * update
        sizes.append(lr * math.sqrt(scale) * update.abs().max().item())
    return W, sizes


def error_bound(shape, rank, sizes, W):
    """A forward-error bound for the fp32 run against float64, from its operations.

    Per step, an entry of the update carries the relative error of: the projection's dot products of
    length d (gamma_d times |P|^T |G| / |R|, about d * sqrt(d) ulps for Gaussian data), the norms over
    rank (or all) entries, Adam's few element-wise operations per step so far, and the limiter's ratio;
    4x that sum of ulps, times the step's update size, summed over the steps, plus the rounding of W
    itself at each step.
    """
    d = max(shape)
    ulps = 4 * (d * math.sqrt(d) + shape[0] * shape[1] + rank + 10 * len(sizes))
    return ulps * U32 * sum(sizes) + len(sizes) * U32 * W.abs().max().item()


def test_registered_as_the_apollo_output_rule():
    assert OUTPUT_RULES["apollo"] is ApolloScaling
    assert ApolloScaling.state_keys == ("limiter_norm",)


def test_scaling_factors_against_float64_loops():
    gen = torch.Generator().manual_seed(3)
    R, N = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    columns = channel_scaling(R, N, axis=0)
    rows = channel_scaling(R, N, axis=1)
    assert columns.shape == (1, 7) and rows.shape == (3, 1)
    Rd, Nd = R.double(), N.double()
    for j in range(7):
        want = math.sqrt(sum(Nd[i, j] ** 2 for i in range(3))) / (math.sqrt(sum(Rd[i, j] ** 2 for i in range(3))) + 1e-8)
        assert columns[0, j].item() == pytest.approx(want, rel=1e-6)
    for i in range(3):
        want = math.sqrt(sum(Nd[i, j] ** 2 for j in range(7))) / (math.sqrt(sum(Rd[i, j] ** 2 for j in range(7))) + 1e-8)
        assert rows[i, 0].item() == pytest.approx(want, rel=1e-6)
    total = math.sqrt(float((Nd**2).sum())) / (math.sqrt(float((Rd**2).sum())) + 1e-8)
    assert tensor_scaling(R, N).item() == pytest.approx(total, rel=1e-6)
    # The guard keeps a zero channel finite: factor 0, not NaN.
    assert channel_scaling(torch.zeros(2, 3), torch.zeros(2, 3), axis=0).eq(0).all()


def test_norm_growth_limiter_caps_growth_at_gamma_and_passes_shrinking_updates():
    update = torch.full((4, 4), 1.0)  # norm 4
    first, norm = limit_norm_growth(update, None, 1.01)
    assert torch.equal(first, update) and norm.item() == pytest.approx(4.0)
    grown, norm2 = limit_norm_growth(3 * update, norm, 1.01)  # norm 12 -> capped at 4 * 1.01
    assert norm2.item() == pytest.approx(4.0 * 1.01, rel=1e-6)
    assert torch.linalg.vector_norm(grown).item() == pytest.approx(4.0 * 1.01, rel=1e-6)
    assert torch.allclose(grown / grown[0, 0], torch.ones(4, 4))  # shrunk as a whole, direction kept
    shrunk, norm3 = limit_norm_growth(0.5 * update, norm2, 1.01)  # a smaller norm passes unchanged
    assert torch.equal(shrunk, 0.5 * update) and norm3.item() == pytest.approx(2.0)
    # A previous norm that torch's loader cast to bf16 still gives an fp32 norm.
    _, norm4 = limit_norm_growth(update, norm.to(torch.bfloat16), 1.01)
    assert norm4.dtype == torch.float32


def test_projection_is_seeded_gaussian_with_variance_one_over_rank():
    left = apollo_projection(400, 50, "left", seed=7, device="cpu")
    right = apollo_projection(400, 50, "right", seed=7, device="cpu")
    assert left.shape == right.shape == (400, 50) and left.dtype == torch.float32
    assert torch.equal(left, apollo_projection(400, 50, "left", seed=7, device="cpu"))
    assert not torch.equal(left, apollo_projection(400, 50, "left", seed=8, device="cpu"))
    # 20000 draws: the sample variance is 1/50 within a few standard errors (sqrt(2/n) relative).
    for P in (left, right):
        assert P.var().item() == pytest.approx(1 / 50, rel=5 * math.sqrt(2 / P.numel()))
    assert apollo_seed(5, 0) == 5 and apollo_seed(5, 2) != apollo_seed(5, 1) != 5


def test_seed_chain_is_cached_without_deep_recursion():
    # A run resumed at a late refresh: the cached chain equals the plain walk, with no RecursionError.
    walked = 77
    for _ in range(3000):
        walked = next_apollo_seed(walked)
    assert apollo_seed(77, 3000) == walked
    with pytest.raises(ValueError, match="refresh"):
        apollo_seed(77, -1)
    assert apollo_base_seed(3) == 3 and apollo_base_seed(3, seed=10) == 13


@pytest.mark.parametrize("bad", [{"apollo_mode": "row"}, {"norm_growth_limit": 0.9}, {"norm_growth_limit": "1.01"},
                                 {"norm_growth_limit": float("inf")}])
def test_bad_settings_get_one_sentence(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ApolloScaling(**bad)


@pytest.mark.parametrize("mode, rank, scale", [("channel", 3, 4.0), ("tensor", 1, 128.0)])
@pytest.mark.parametrize("shape", [WIDE, TALL])
def test_full_update_against_float64_reference(shape, mode, rank, scale):
    steps, gap, lr, wd = 9, 4, 1e-2, 0.1  # refreshes before steps 0, 4 and 8
    side = side_of(shape)
    dim = shape[0] if side == "left" else shape[1]
    projections = [apollo_projection(dim, rank, side, seed=100 + k, device="cpu") for k in range(3)]
    grads = growing_gradients(shape, steps, seed=11)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours, state = local_apollo(W0, grads, projections.__getitem__, ApolloScaling(mode), lr=lr, scale=scale,
                               weight_decay=wd, gap=gap, side=side)
    ref, sizes = reference_apollo(W0, grads, projections, lr=lr, scale=scale, weight_decay=wd, gap=gap, side=side,
                                  mode=mode, gamma=1.01)
    gap_ = (ours.double() - ref).abs().max().item()
    bound = error_bound(shape, rank, sizes, ref)
    assert gap_ <= bound, (gap_, bound)
    assert (ref - W0.double()).abs().max().item() > 1e3 * bound  # the weights really moved
    # The limiter acted: without it the reference ends elsewhere, by far more than the bound.
    unlimited, _ = reference_apollo(W0, grads, projections, lr=lr, scale=scale, weight_decay=wd, gap=gap, side=side,
                                    mode=mode, gamma=None)
    assert (unlimited - ref).abs().max().item() > 100 * bound
    assert state["limiter_norm"].dtype == torch.float32 and state["limiter_norm"].dim() == 0


# -- teacher-forced parity with apollo-torch ----------------------------------------------------------------


def apollo_torch_run(shapes, grads, *, rank, scale, mode, gap, lr, wd, W0s):
    """apollo-torch's APOLLOAdamW on the given weights, fed the given gradients. Its weight decay runs after
    the update; ours (torch's AdamW order) before: so it gets weight_decay=0 and the decay by hand first."""
    apollo_torch = pytest.importorskip("apollo_torch")
    params = [torch.nn.Parameter(W.clone()) for W in W0s]
    opt = apollo_torch.APOLLOAdamW([{"params": params, "rank": rank, "proj": "random", "scale_type": mode,
                                     "scale": scale, "update_proj_gap": gap, "proj_type": "std"}],
                                   lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    for step_grads in zip(*grads):
        with torch.no_grad():
            for p, G in zip(params, step_grads):
                p.mul_(1 - lr * wd)
                p.grad = G.clone()
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("mode, rank, scale", [("channel", 3, 4.0), ("tensor", 1, 128.0)])
def test_teacher_forced_parity_with_apollo_torch(mode, rank, scale, capsys):
    steps, gap, lr, wd = 9, 4, 1e-2, 0.1
    shapes = (WIDE, TALL)
    W0s = [torch.randn(s, generator=torch.Generator().manual_seed(20 + i)) for i, s in enumerate(shapes)]
    grads = [growing_gradients(s, steps, seed=30 + i) for i, s in enumerate(shapes)]
    theirs, opt = apollo_torch_run(shapes, grads, rank=rank, scale=scale, mode=mode, gap=gap, lr=lr, wd=wd, W0s=W0s)
    for position, (shape, W0, G, Wt) in enumerate(zip(shapes, W0s, grads, theirs), start=1):
        side = side_of(shape)
        dim = shape[0] if side == "left" else shape[1]

        def projection(refresh, dim=dim, side=side, position=position):
            return apollo_projection(dim, rank, side, apollo_seed(apollo_base_seed(position), refresh), "cpu")

        # Same seed scheme: their last matrix (drawn at the third refresh) is ours, bit for bit.
        their_matrix = opt.state[opt.param_groups[0]["params"][position - 1]]["projector"].ortho_matrix
        assert torch.equal(projection(2), their_matrix if side == "left" else their_matrix.t())
        ours, state = local_apollo(W0, G, projection, ApolloScaling(mode), lr=lr, scale=scale, weight_decay=wd,
                                   gap=gap, side=side)
        _, sizes = reference_apollo(W0, G, [projection(k) for k in range(3)], lr=lr, scale=scale, weight_decay=wd,
                                    gap=gap, side=side, mode=mode, gamma=1.01)
        measured = (ours - Wt).abs().max().item()
        with capsys.disabled():
            print(f"\napollo-torch parity {mode} {shape} ({side}): max |W_ours - W_apollo_torch| = {measured:.3e}, "
                  f"moved {(Wt - W0).abs().max().item():.3e}")
        assert measured <= error_bound(shape, rank, sizes, Wt)
        their_norm = opt.state[opt.param_groups[0]["params"][position - 1]]["scaled_grad"]
        assert state["limiter_norm"].item() == pytest.approx(float(their_norm), rel=1e-5)


@pytest.mark.parametrize("mode, rank, scale", [("channel", 3, 4.0), ("tensor", 1, 128.0)])
@pytest.mark.parametrize("shape", [WIDE, TALL])
def test_local_loop_is_the_engines_composition(shape, mode, rank, scale):
    steps, gap, lr, wd = 9, 4, 1e-2, 0.1
    side = side_of(shape)
    dim = shape[0] if side == "left" else shape[1]
    grads = growing_gradients(shape, steps, seed=12)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    W = torch.nn.Parameter(W0.clone())
    opt = ApolloAdamW([{"params": [W], "rank": rank, "scale_type": mode, "scale": scale, "update_proj_gap": gap}],
                      lr=lr, betas=BETAS, eps=EPS, weight_decay=wd)
    for G in grads:
        W.grad = G.clone()
        opt.step()

    def projection(refresh):  # the engine's seeds: the parameter is the optimizer's first (position 1)
        return apollo_projection(dim, rank, side, apollo_seed(apollo_base_seed(1), refresh), "cpu")

    ours, state = local_apollo(W0, grads, projection, ApolloScaling(mode), lr=lr, scale=scale, weight_decay=wd,
                               gap=gap, side=side)
    # The same operations in the same order: bitwise the same weight and limiter state.
    assert torch.equal(W.detach(), ours) and torch.equal(opt.state[W]["limiter_norm"], state["limiter_norm"])
    assert (W.detach() - W0).abs().max().item() > 1e-3  # the weight really moved
