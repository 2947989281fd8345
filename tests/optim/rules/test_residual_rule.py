"""Adding a residual rule touches one file: this one (issue 14, "done when").

A clipped-sign residual, ``sign(res) * min(|res| / c, 1)``, is defined and registered here and
nowhere else, then trained with through ``scrimp.optim.build`` under FRUGAL's name for the
state-free rule. Its first step is compared with a float64 reference of the whole FRUGAL step
written from the paper (Zmushko et al., 2025, arXiv:2411.07837, Alg. 1): Adam on the selected
columns, the rule on the rest.
"""

import math

import pytest
import torch

from scrimp.optim import build
from scrimp.optim.rules.base import ResidualRule
from scrimp.optim.rules.registry import RESIDUAL_RULES, register_residual

CLIP = 0.05


@register_residual
class ClippedSign(ResidualRule):
    """sign(res) * min(|res| / c, 1): signSGD that shrinks towards SGD for small residual entries."""

    name = "clipped_sign"

    def update(self, res, R=None, N=None):
        return res.sign() * (res.abs() / CLIP).clamp(max=1.0)


def clipped_sign_reference(res: torch.Tensor) -> torch.Tensor:
    return torch.sign(res) * torch.minimum(res.abs() / CLIP, torch.ones_like(res))


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def frugal_cfg(**extra):
    return {"name": "frugal", "lr": 1e-2, "density": 0.25, "proj_type": "columns", "update_gap": 5,
            "inactive_update_rule": "clipped_sign", "weight_decay": 0.0, **extra}


def projected_groups(opt):
    return [g for g in opt.param_groups if g.get("density") is not None or g.get("rank") is not None]


def test_registering_is_what_makes_a_rule_known_by_its_name():
    class HalvedSign(ResidualRule):  # defined here, not registered yet
        name = "halved_sign"

        def update(self, res, R=None, N=None):
            return 0.5 * res.sign()

    with pytest.raises(ValueError, match="inactive_update_rule must be one of"):
        build(frugal_cfg(inactive_update_rule="halved_sign"), model())
    register_residual(HalvedSign)
    try:
        opt = build(frugal_cfg(inactive_update_rule="halved_sign"), model())
        assert projected_groups(opt) and all(isinstance(opt.parts(g).residual, HalvedSign)
                                             for g in projected_groups(opt))
    finally:
        del RESIDUAL_RULES["halved_sign"]


def test_the_engine_steps_with_the_registered_rule_and_a_second_one_cannot_take_its_name():
    opt = build(frugal_cfg(), model())
    assert projected_groups(opt) and all(opt.parts(g).residual is RESIDUAL_RULES["clipped_sign"]
                                         for g in projected_groups(opt))

    class Impostor(ResidualRule):
        name = "clipped_sign"

        def update(self, res, R=None, N=None):
            return res

    with pytest.raises(ValueError, match="already registered"):
        register_residual(Impostor)
    assert isinstance(RESIDUAL_RULES["clipped_sign"], ClippedSign)


def test_one_step_equals_a_float64_reference_of_frugal_with_the_rule():
    net = model()
    opt = build(frugal_cfg(), net)
    W = net[0].weight
    before = W.detach().double().clone()
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    net(x).pow(2).mean().backward()
    G = W.grad.detach().double().clone()
    opt.step()
    index = opt.state[W]["proj_index"].long()  # the selected columns (FRUGAL's columns: right side)
    active = torch.zeros_like(G, dtype=torch.bool)
    active[:, index] = True
    group = next(g for g in opt.param_groups if any(p is W for p in g["params"]))
    beta1, beta2 = group["betas"]
    eps = group["eps"]  # FRUGAL's AdamW: eps added to the bias-corrected sqrt(v)
    m, v = (1 - beta1) * G, (1 - beta2) * G * G
    adam = (m / (1 - beta1)) / ((v / (1 - beta2)).sqrt() + eps)
    expected = before - 1e-2 * torch.where(active, adam, clipped_sign_reference(torch.where(active, 0.0, G)))
    torch.testing.assert_close(W.detach().double(), expected, rtol=0, atol=1e-6)
    # the residual moved the inactive entries by less than signSGD would where |G| < c
    small = (~active) & (G.abs() < CLIP) & (G != 0)
    assert small.any() and ((W.detach().double() - before)[small].abs() < 1e-2 - 1e-9).all()


def test_training_with_the_new_rule_lowers_the_loss():
    net = model()
    opt = build(frugal_cfg(), net)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 12, generator=gen), torch.randn(64, 4, generator=gen)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(net(x), y)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert math.isfinite(losses[-1]) and losses[-1] < 0.8 * losses[0]


def test_an_unregistered_rule_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="inactive_update_rule must be one of .*clipped_sign"):
        build(frugal_cfg(inactive_update_rule="clipped_sine"), model())
