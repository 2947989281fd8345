"""FRUGAL's SGD-with-momentum inner rule (scrimp.optim.rules.sgd) against a float64 reference written
from the authors' ``frugal/sgd.py``, its exact rotation across a refresh, ``FrugalSGD`` against FRUGAL's
whole step in float64 (``conftest.frugal_float64``), and, teacher-forced, the authors' code itself when
``FRUGAL_SRC`` names a clone of github.com/philipzmushko/FRUGAL."""

import pytest
import torch

from scrimp.optim import FrugalSGD, SubspaceAdamW
from scrimp.optim.rules.base import StepHyper
from scrimp.optim.rules.registry import INNER_RULES
from scrimp.optim.rules.sgd import SGDMomentumRule, rotate_coordinates_

U32 = 2.0**-24  # unit roundoff of fp32
SHAPE = (6, 10)


def hp(step):
    return StepHyper(step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


def gradients(steps, shape=SHAPE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def sgd_reference(grads, *, momentum, dampening, nesterov, sign_update):
    """FRUGAL's SGD._compute_update (without -lr) in float64; the buffer starts at the first gradient
    (``_init_state(example=project_down(grad))`` with ``_example_state_init=True``)."""
    buf, out = None, []
    for g in grads:
        g = g.double()
        if momentum:
            buf = g.clone() if buf is None else buf
            buf = momentum * buf + (1 - dampening) * g
            d = g + momentum * buf if nesterov else buf
        else:
            d = g
        out.append(d.sign() if sign_update else d)
    return out, buf


def run_rule(rule, grads, moments=None):
    moments = {s.name: torch.zeros(SHAPE) for s in rule.moment_specs()} if moments is None else moments
    return [rule.direction(g, moments, hp(t)) for t, g in enumerate(grads, 1)], moments


@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.9, 0.0, False), (0.9, 0.0, True), (0.5, 0.3, False),
                                                         (0.0, 0.0, False)])
def test_sgd_rule_matches_a_float64_reference_of_frugal_sgd(momentum, dampening, nesterov):
    grads = gradients(8)
    rule = SGDMomentumRule(momentum=momentum, dampening=dampening, nesterov=nesterov)
    ours, moments = run_rule(rule, grads)
    expect, buf = sgd_reference(grads, momentum=momentum, dampening=dampening, nesterov=nesterov, sign_update=False)
    # Each step rounds the buffer twice (mul, add) and the nesterov sum once, relative to the largest
    # magnitude met so far: (2 T + 2) u of max |value| bounds the accumulated fp32 error.
    atol = (2 * len(grads) + 2) * U32 * max(e.abs().max().item() for e in expect)
    for N, e in zip(ours, expect):
        assert N.dtype == torch.float32
        torch.testing.assert_close(N.double(), e, rtol=0, atol=atol)
    if momentum:
        torch.testing.assert_close(moments["momentum_buffer"].double(), buf, rtol=0, atol=atol)
    else:
        assert rule.moment_specs() == ()  # plain SGD keeps no state


def test_first_step_after_a_restart_starts_the_buffer_at_the_gradient_as_frugal_does():
    g = gradients(1)[0]
    rule = SGDMomentumRule(momentum=0.9, dampening=0.1)
    (N,), _ = run_rule(rule, [g])
    torch.testing.assert_close(N, (1 + 0.9 - 0.1) * g)  # torch.optim.SGD would give g


def test_sign_update_is_the_sign_of_the_momentum_direction():
    grads = gradients(5)
    ours, _ = run_rule(SGDMomentumRule(momentum=0.9, sign_update=True), grads)
    expect, _ = sgd_reference(grads, momentum=0.9, dampening=0.0, nesterov=False, sign_update=True)
    for N, e in zip(ours, expect):
        assert torch.equal(N.double(), e)


def test_direction_is_a_new_tensor_and_bf16_gradients_work():
    rule = SGDMomentumRule(momentum=0.0)
    g = gradients(1)[0]
    (N,), _ = run_rule(rule, [g])
    N.mul_(2)  # the engine may scale N in place: R must not change
    torch.testing.assert_close(N, 2 * g)
    rule = SGDMomentumRule(momentum=0.9)
    moments = {"momentum_buffer": torch.zeros(SHAPE)}
    N = rule.direction(g.bfloat16(), moments, hp(1))
    assert N.dtype == torch.float32 and N is not moments["momentum_buffer"]
    torch.testing.assert_close(N, 1.9 * g.bfloat16().float())


def test_rotation_carries_the_buffer_exactly_into_a_new_basis_of_the_same_subspace():
    # Gradients inside span(P_old); P_new = P_old Q spans the same subspace. The rotated buffer must
    # equal the buffer built from the new coordinates from the start.
    gen = torch.Generator().manual_seed(3)
    m, n, r = 12, 10, 4
    P_old = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
    P_new = P_old @ Q
    Gs = [P_old @ torch.randn(r, n, generator=gen, dtype=torch.float64) for _ in range(5)]
    rule = SGDMomentumRule(momentum=0.9)
    old = {"momentum_buffer": torch.zeros(r, n, dtype=torch.float64)}
    new = {"momentum_buffer": torch.zeros(r, n, dtype=torch.float64)}
    for t, G in enumerate(Gs, 1):
        rule.direction(P_old.t() @ G, old, hp(t))
        rule.direction(P_new.t() @ G, new, hp(t))
    rule.rotate(old, P_new.t() @ P_old, "left")
    torch.testing.assert_close(old["momentum_buffer"], new["momentum_buffer"], rtol=1e-12, atol=1e-12)
    # The right side (R = G P) rotates along columns; a stack rotates slice by slice.
    stack = torch.randn(3, n, r, generator=gen, dtype=torch.float64)
    expect = stack @ (P_new.t() @ P_old).t()
    rotate_coordinates_(stack, P_new.t() @ P_old, "right")
    torch.testing.assert_close(stack, expect)


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum=-0.1), "momentum"), (dict(momentum=1.5), "momentum"), (dict(dampening=2.0), "dampening"),
    (dict(nesterov=1), "nesterov"), (dict(sign_update="yes"), "sign_update"),
    (dict(momentum=0.0, nesterov=True), "nesterov=True needs momentum > 0"),
    (dict(momentum=0.9, dampening=0.1, nesterov=True), "nesterov=True needs momentum > 0 and dampening 0"),
])
def test_bad_settings_raise_one_clear_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGDMomentumRule(**kwargs)


def test_sgd_is_registered_with_its_group_keys():
    assert INNER_RULES["sgd"] is SGDMomentumRule
    assert SGDMomentumRule.group_keys == {"momentum": 0.9, "dampening": 0.0, "nesterov": False, "sign_update": False}


# -- the configuration ------------------------------------------------------------------------------

def test_the_frugal_sgd_config_builds_an_sgd_engine_and_trains(config_trainer):
    _, _, projected = config_trainer("frugal_sgd")
    assert projected and all(g["inner"] == "sgd" and g["momentum"] == 0.9 for g in projected)


class SGDFloat64:
    """``frugal/sgd.py``'s SGD (``_compute_update`` without the -lr) in float64. At each reset the buffer starts
    as the projected gradient (``_init_state(example=project_down(grad))``, GaloreSGD's ``_example_state_init``)."""

    def __init__(self, momentum, dampening, nesterov):
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov

    def reset(self, R):
        return {"momentum_buffer": R.clone()}

    def step(self, R, state):
        if not self.momentum:
            return R
        state["momentum_buffer"] = self.momentum * state["momentum_buffer"] + (1 - self.dampening) * R
        return R + self.momentum * state["momentum_buffer"] if self.nesterov else state["momentum_buffer"]


@pytest.mark.parametrize("proj_type,momentum,dampening,nesterov", [
    ("svd", 0.9, 0.1, False), ("randk", 0.9, 0.0, True), ("svd", 0.0, 0.0, False), ("randk", 0.0, 0.0, False)])
def test_frugal_sgd_equals_a_float64_frugal_sgd(proj_type, momentum, dampening, nesterov, frugal_reference):
    """FrugalSGD end to end against FRUGAL's step in float64 (no authors' code needed): SGD with momentum on the
    subspace, signSGD on the residual, both lr scales off 1, resets at each refresh (every 3 steps), decoupled
    decay. Plain SGD (momentum 0) keeps no state beyond the subspace itself."""
    run = frugal_reference(FrugalSGD, SGDFloat64(momentum, dampening, nesterov), lr=1e-2, proj_type=proj_type,
                           momentum=momentum, dampening=dampening, nesterov=nesterov)
    lr, pls, ils, gap, steps = run.lr, run.pls, run.ils, run.gap, run.steps
    # The residual's fp32 rounding (d <= 20 terms per entry of P^T G, then P R) stays below 2 (d + 2) sqrt(d) u
    # max|G|: no residual sign taken is that close to 0 (measured: above 1000 u max|G|).
    d = 20
    max_grad = max(g.abs().max().item() for gs in run.grads for g in gs)
    assert run.closest_residual > 2 * (d + 2) * d**0.5 * U32 * max_grad, "a residual sign is within rounding: change the seed"
    for p, e in zip(run.params, run.expected):
        # W rounds about 3 times a step (u |W| each); the subspace part lr pls |P N| has |N| up to about
        # (1 + 2 momentum) / (1 - momentum) max|G| after a restart, rounded over d + gap + 2 operations.
        largest_move = lr * pls * (1 + 2 * momentum) / (1 - momentum) * d**0.5 * max_grad
        bound = steps * (3 * U32 * e.abs().max().item() + (d + gap + 2) * U32 * largest_move)
        assert 20 * bound < 2 * lr * pls * ils  # a wrong residual sign moves an entry by this much
        assert (p.detach().double() - e).abs().max().item() <= bound
    moments = {k for st in run.opt.state.values() for k, v in st.items() if torch.is_tensor(v) and not k.startswith("proj_")}
    assert moments == ({"momentum_buffer"} if momentum else set())


# -- teacher-forced: the authors' code ------------------------------------------------------------

@pytest.mark.parametrize("nesterov,sign_update", [(False, False), (True, False), (False, True)])
def test_rule_equals_the_authors_sgd_on_the_same_projected_gradients(authors_code, nesterov, sign_update):
    authors = authors_code("frugal.sgd")
    grads = gradients(8)
    kw = dict(momentum=0.9, dampening=0.0, nesterov=nesterov, sign_update=sign_update)
    theirs_opt = authors.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, **kw)
    state = theirs_opt._init_state(example=grads[0].clone())  # FRUGAL's reset with _example_state_init
    ours, _ = run_rule(SGDMomentumRule(**kw), grads)
    for g, N in zip(grads, ours):
        state["step"] += 1
        theirs = -theirs_opt._compute_update(g.clone(), state, lr=1.0, **kw)
        assert torch.equal(N, theirs)  # the same fp32 ops in the same order: bitwise equal


def test_engine_with_inner_sgd_equals_the_authors_galore_sgd(authors_code, twins):
    """FRUGAL-SGD end to end: SVD subspace (density 0.25, refreshed every 3 steps with a reset),
    signSGD on the residual, both lr scales off 1, decoupled decay; the same gradients to both."""
    authors = authors_code("frugal.sgd")
    twin_params, step_both = twins
    start, ours, theirs = twin_params()
    lr, wd, pls, ils = 1e-2, 0.1, 0.5, 0.3
    opt = SubspaceAdamW([{"params": ours, "density": 0.25}], lr=lr, weight_decay=wd, inner="sgd", momentum=0.9,
                        projector="svd", proj_type="std", residual="sign_sgd", reset_statistics=True, stagger=False,
                        update_proj_gap=3, scale=pls, residual_lr_scale=pls * ils)
    ref = authors.GaloreSGD([{"params": theirs, "is_proj_params": True}], lr=lr, weight_decay=wd, momentum=0.9,
                            density=0.25, update_gap=3, proj_params_lr_scale=pls, inactive_lr_scale=ils,
                            reset_statistics=True, inactive_update_rule="sign_sgd", proj_type="svd", proj_side="std")
    step_both(opt, ours, ref, theirs, steps=7)
    for a, b, w in zip(ours, theirs, start):
        # Both paths round W a few times per step in a different order (decay, subspace part, residual):
        # 3 roundings of up to 2u |W| per step, against changes of order lr.
        bound = 3 * 7 * 2 * U32 * w.abs().max().item()
        assert (a.detach() - b.detach()).abs().max() <= bound
