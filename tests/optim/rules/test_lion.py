"""The Lion inner rule (scrimp.optim.rules.lion) against a float64 reference of the paper's update
(Chen et al., 2023, arXiv:2302.06675, Alg. 2; FRUGAL's ``frugal/lion.py``), its exact rotation,
``FrugalLion`` against FRUGAL's whole step in float64 (``conftest.frugal_float64``), and, teacher-forced,
the authors' FRUGAL Lion when ``FRUGAL_SRC`` names a clone of their repository."""

import pytest
import torch

from scrimp.optim import FrugalLion, SubspaceAdamW
from scrimp.optim.rules.base import StepHyper
from scrimp.optim.rules.lion import LionRule, lion_direction_
from scrimp.optim.rules.registry import INNER_RULES

U32 = 2.0**-24  # unit roundoff of fp32
SHAPE = (16, 24)
BETAS = (0.9, 0.99)


def hp(step, betas=BETAS):
    return StepHyper(step=step, lr=1e-4, beta1=betas[0], beta2=betas[1], eps=1e-8, weight_decay=0.0)


def gradients(steps, shape=SHAPE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def lion_reference(grads, beta1, beta2):
    """Lion in float64: c = b1 m + (1 - b1) g, N = sign(c), then m = b2 m + (1 - b2) g; returns (c, m) per step."""
    m, out = torch.zeros(grads[0].shape, dtype=torch.float64), []
    for g in grads:
        g = g.double()
        c = beta1 * m + (1 - beta1) * g
        m = beta2 * m + (1 - beta2) * g
        out.append((c, m))
    return out


@pytest.mark.parametrize("betas", [BETAS, (0.95, 0.98), (0.0, 0.5)])
def test_lion_rule_matches_a_float64_reference(betas):
    grads = gradients(10)
    rule, moments = LionRule(), {"exp_avg": torch.zeros(SHAPE)}
    expect = lion_reference(grads, *betas)
    scale = max(g.abs().max().item() for g in grads)
    unchecked = 0
    for t, (g, (c, m)) in enumerate(zip(grads, expect), 1):
        N = rule.direction(g, moments, hp(t, betas))
        # m rounds twice per step (mul, add): after t steps its error is below 2 t u max|g|; c adds
        # two more roundings. Where |c| clears that bound the fp32 sign must be the float64 sign.
        bound = (2 * t + 2) * U32 * scale
        torch.testing.assert_close(moments["exp_avg"].double(), m, rtol=0, atol=bound)
        clear = c.abs() > 2 * bound
        assert torch.equal(N.double()[clear], c.sign()[clear])
        assert set(N.unique().tolist()) <= {-1.0, 0.0, 1.0}
        unchecked += int((~clear).sum())
    assert unchecked < 0.001 * len(grads) * N.numel()  # the check above covered (almost) every entry


def test_direction_uses_the_moment_before_it_moves():
    m0 = torch.tensor([1.0, -1.0, 0.05])
    g = torch.tensor([-1.0, 1.0, -1.0])
    m = m0.clone()
    N = lion_direction_(g, m, beta1=0.9, beta2=0.99)
    assert torch.equal(N, torch.tensor([1.0, -1.0, -1.0]))  # 0.9 m0 + 0.1 g, not the new m
    torch.testing.assert_close(m, 0.99 * m0 + 0.01 * g)


def test_bf16_gradients_and_a_fresh_direction():
    g = gradients(1)[0]
    moments = {"exp_avg": torch.zeros(SHAPE)}
    N = LionRule().direction(g.bfloat16(), moments, hp(1))
    assert N.dtype == torch.float32 and N is not moments["exp_avg"]
    assert torch.equal(N, g.bfloat16().float().sign())
    torch.testing.assert_close(moments["exp_avg"], 0.01 * g.bfloat16().float())


def test_rotation_carries_the_moment_exactly_into_a_new_basis_of_the_same_subspace():
    gen = torch.Generator().manual_seed(4)
    m, n, r = 10, 14, 3
    P_old = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    P_new = P_old @ torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
    Gs = [torch.randn(m, r, generator=gen, dtype=torch.float64) @ P_old.t() for _ in range(4)]  # inside the span
    rule = LionRule()
    old, new = {"exp_avg": torch.zeros(m, r, dtype=torch.float64)}, {"exp_avg": torch.zeros(m, r, dtype=torch.float64)}
    for t, G in enumerate(Gs, 1):  # right side: R = G P
        rule.direction(G @ P_old, old, hp(t))
        rule.direction(G @ P_new, new, hp(t))
    rule.rotate(old, P_new.t() @ P_old, "right")
    torch.testing.assert_close(old["exp_avg"], new["exp_avg"], rtol=1e-12, atol=1e-12)


def test_lion_is_registered_and_keeps_one_quantizable_signed_moment():
    assert INNER_RULES["lion"] is LionRule and LionRule.rotatable
    (spec,) = LionRule().moment_specs()
    assert spec.name == "exp_avg" and spec.signed and spec.quantizable and spec.history == 0


# -- the configuration ------------------------------------------------------------------------------

def test_the_frugal_lion_config_builds_a_lion_engine_and_trains(config_trainer):
    _, _, projected = config_trainer("frugal_lion")
    assert projected and all(g["inner"] == "lion" and tuple(g["betas"]) == (0.9, 0.99) for g in projected)


class LionFloat64:
    """``frugal/lion.py``'s Lion (``_compute_update`` without the -lr) in float64: its ``_init_state`` zeroes
    the moment at each reset. Records the smallest |b1 m + (1 - b1) R| whose sign it took."""

    def __init__(self, betas):
        self.beta1, self.beta2 = betas
        self.closest = float("inf")

    def reset(self, R):
        return {"exp_avg": torch.zeros_like(R)}

    def step(self, R, state):
        c = self.beta1 * state["exp_avg"] + (1 - self.beta1) * R
        state["exp_avg"] = self.beta2 * state["exp_avg"] + (1 - self.beta2) * R
        self.closest = min(self.closest, c.abs().min().item())
        return c.sign()


@pytest.mark.parametrize("proj_type", ["svd", "randk"])
def test_frugal_lion_equals_a_float64_frugal_lion(proj_type, frugal_reference):
    """FrugalLion end to end against FRUGAL's step in float64 (no authors' code needed): Lion on the subspace,
    signSGD on the residual, both lr scales off 1, resets at each refresh (every 3 steps), decoupled decay."""
    inner = LionFloat64(BETAS)
    run = frugal_reference(FrugalLion, inner, lr=1e-3, proj_type=proj_type)
    lr, pls, ils, gap, steps = run.lr, run.pls, run.ils, run.gap, run.steps
    # fp32 R = P^T G (d <= 20 terms, |P col|_1 <= sqrt(d)) is off by at most d sqrt(d) u max|G|, and the moment
    # and c add 2 gap + 2 roundings of that size; twice this is a margin no rounding crosses. These
    # gradients keep every sign the two paths take beyond it (measured: 851 u max|G|; another seed may not).
    d = 20
    margin = 2 * (d + 2 * gap + 2) * d**0.5 * U32 * max(g.abs().max().item() for gs in run.grads for g in gs)
    assert inner.closest > margin and run.closest_residual > margin, "a sign is within rounding of 0: change the seed"
    for p, e in zip(run.params, run.expected):
        # Each step rounds W about 3 times (decay, subspace part, residual; u |W| each) and the back-projection
        # of N (entries +-1, r terms) to r u. A wrong sign moves some entry by at least 2 lr pls ils (residual)
        # or 2 lr pls / sqrt(d) (a unit column of P has an entry >= 1/sqrt(d)): 20x this bound or more.
        bound = steps * (3 * U32 * e.abs().max().item() + lr * pls * 8 * U32)
        assert 20 * bound < min(2 * lr * pls * ils, 2 * lr * pls / d**0.5)
        assert (p.detach().double() - e).abs().max().item() <= bound


# -- teacher-forced: the authors' code ------------------------------------------------------------

def test_rule_equals_the_authors_lion_on_the_same_projected_gradients(authors_code):
    authors = authors_code("frugal.lion")
    grads = gradients(10)
    theirs_opt = authors.Lion([torch.zeros(1, requires_grad=True)], lr=1.0, betas=BETAS)
    state = theirs_opt._init_state(example=grads[0].clone())
    rule, moments = LionRule(), {"exp_avg": torch.zeros(SHAPE)}
    for t, g in enumerate(grads, 1):
        N = rule.direction(g, moments, hp(t))
        theirs = -theirs_opt._compute_update(g.clone(), state, lr=1.0, betas=BETAS)
        assert torch.equal(N, theirs)  # measured gap: 0 (every sign and the moment bitwise equal)
        assert torch.equal(moments["exp_avg"], state["exp_avg"])


def test_engine_with_inner_lion_equals_the_authors_galore_lion(authors_code, twins):
    """FRUGAL-Lion end to end: SVD subspace (density 0.25, refreshed every 3 steps with a reset),
    signSGD on the residual, both lr scales off 1, decoupled decay; the same gradients to both."""
    authors = authors_code("frugal.lion")
    twin_params, step_both = twins
    start, ours, theirs = twin_params()
    lr, wd, pls, ils = 1e-3, 0.1, 0.5, 0.3
    opt = SubspaceAdamW([{"params": ours, "density": 0.25}], lr=lr, betas=BETAS, weight_decay=wd, inner="lion",
                        projector="svd", proj_type="std", residual="sign_sgd", reset_statistics=True, stagger=False,
                        update_proj_gap=3, scale=pls, residual_lr_scale=pls * ils)
    ref = authors.GaloreLion([{"params": theirs, "is_proj_params": True}], lr=lr, betas=BETAS, weight_decay=wd,
                             density=0.25, update_gap=3, proj_params_lr_scale=pls, inactive_lr_scale=ils,
                             reset_statistics=True, inactive_update_rule="sign_sgd", proj_type="svd", proj_side="std")
    step_both(opt, ours, ref, theirs, steps=7)
    for a, b, w in zip(ours, theirs, start):
        # Both paths round W a few times per step in a different order (decay, subspace part, residual):
        # 3 roundings of up to 2u |W| per step. One Lion sign flipped on an fp32 tie would move an entry by
        # 2 lr pls, far above this bound.
        bound = 3 * 7 * 2 * U32 * w.abs().max().item()
        assert bound < 0.1 * lr * pls
        assert (a.detach() - b.detach()).abs().max() <= bound  # measured: 6e-7, 1.2 ulp of max|W|
