"""The engine's public stages (issue 14, item 3): begin (refresh, project), run_inner, finish.

Offload runs the inner rule on the host between projection and back-projection; FSDP inserts a
collective on R after projection. Both are driven here from outside the engine and must give the
weights of a plain ``step()`` exactly (the same ops in the same order).
"""

import pytest
import torch

from scrimp.optim import (
    ApolloAdamW,
    ApolloMiniAdamW,
    FrugalAdamW,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    SubspaceAdamW,
    param_groups,
)
from scrimp.optim.subspace import is_projected_group


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 12))


MAKERS = {
    "galore": lambda m: GaLoreAdamW(param_groups(m, rank=4, update_proj_gap=3), lr=1e-2, weight_decay=0.1),
    "galore_rotate": lambda m: GaLoreAdamW(param_groups(m, rank=4, update_proj_gap=3), lr=1e-2,
                                           moment_policy="rotate"),
    "frugal_randk": lambda m: FrugalAdamW(param_groups(m, density=0.25), lr=1e-2, update_gap=3),
    "frugal_blocks": lambda m: FrugalAdamW(param_groups(m, density=0.5), lr=1e-2, update_gap=2, proj_type="blocks"),
    "scaled_svd": lambda m: SubspaceAdamW(param_groups(m, rank=4, update_proj_gap=3, residual="scaled"), lr=1e-2),
    "galore8bit": lambda m: GaLoreAdamW8bit(param_groups(m, rank=4, update_proj_gap=3), lr=1e-2),
    # output rule "apollo" (channel- and tensor-wise), on the gaussian projector
    "apollo": lambda m: ApolloAdamW(param_groups(m, rank=4, update_proj_gap=3), lr=1e-2, weight_decay=0.1),
    "apollo_mini": lambda m: ApolloMiniAdamW(param_groups(m, rank=1, update_proj_gap=3), lr=1e-2),
    # the other inner rules, each with a residual or a moment policy other than the default
    "lion": lambda m: SubspaceAdamW(param_groups(m, rank=4, update_proj_gap=3, residual="sign_sgd"), lr=1e-3,
                                    weight_decay=0.1, inner="lion", reset_statistics=True),
    "sgd": lambda m: SubspaceAdamW(param_groups(m, rank=4, update_proj_gap=3, residual="sgd"), lr=1e-2,
                                   inner="sgd", momentum=0.9, nesterov=True),
    "natural": lambda m: SubspaceAdamW(param_groups(m, rank=4, update_proj_gap=3), lr=1e-2, inner="natural",
                                       natural_history=3),
    "natural_rotate": lambda m: SubspaceAdamW(param_groups(m, rank=4, update_proj_gap=3), lr=1e-2, inner="natural",
                                              natural_history=3, moment_policy="rotate"),
}


def batches(steps=7):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(8, 24, generator=gen) for _ in range(steps)]


def backward(net, x):
    net(x).pow(2).mean().backward()


def train_plain(make):
    net = model()
    opt = make(net)
    for x in batches():
        backward(net, x)
        opt.step()
        opt.zero_grad()
    return net


def offloaded_inner(opt, s):
    """What offload does: copies of R and the moments on the host, the inner rule there, results back."""
    if s.R is None:  # no subspace this step (an inactive block): a residual-only finish
        return None
    R_host = s.R.detach().to("cpu", copy=True)
    opened = opt.open_moments(s)
    host = {k: v.to("cpu", copy=True) for k, v in opened.items()}
    N = s.parts.inner.direction(R_host, host, s.hp)
    for key, value in host.items():
        opened[key].copy_(value)
    opt.close_moments(s, opened)
    return N.to(s.p.device)


def train_staged(make, between=None, inner=None):
    """step() by hand: begin, an optional hook on s (a collective), the inner rule, finish; plain groups
    keep the engine's own step for them."""
    net = model()
    opt = make(net)
    assert any(is_projected_group(g) and g["params"] for g in opt.param_groups)  # the stages have work to do
    for x in batches():
        backward(net, x)
        for group in opt.param_groups:
            if not is_projected_group(group):
                continue
            for p in group["params"]:
                s = opt.begin(p, group, p.grad)
                if between is not None and s.R is not None:
                    between(s)
                N = inner(opt, s) if inner is not None else opt.run_inner(s)
                opt.finish(s, N)
                p.grad = None
        opt.step()  # the plain groups: the engine's batched AdamW, as step() runs it
        opt.zero_grad()
    return net


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs by {float((p - q).detach().abs().max()):.3e}"


@pytest.mark.parametrize("name", MAKERS)
def test_stages_by_hand_equal_step(name):
    assert_same_weights(train_plain(MAKERS[name]), train_staged(MAKERS[name]))


@pytest.mark.parametrize("name", MAKERS)
def test_inner_rule_on_a_host_copy_of_the_state_equals_step(name):
    assert_same_weights(train_plain(MAKERS[name]), train_staged(MAKERS[name], inner=offloaded_inner))


def sum_of_halves(s):
    """A row-sharded left projection's all-reduce, simulated: each 'rank' projects its half of the rows
    of G with its rows of P, and R is the sum (``U^T G = U_1^T G_1 + U_2^T G_2``); here that is written
    into s.R in place, as a collective would."""
    if s.basis is None or s.basis.dim() != 2 or s.projector.side != "left":
        return
    half = s.basis.shape[0] // 2
    P, G = s.basis, s.grad
    summed = P[:half].t() @ G[:half] + P[half:].t() @ G[half:]
    torch.testing.assert_close(summed, s.R, rtol=1e-5, atol=1e-6)  # the sharded sum is the projection
    s.R.copy_(s.R)  # a collective writes its result into the same buffer


def test_a_collective_on_R_between_projection_and_inner_rule_fits():
    make = MAKERS["galore"]
    seen = []

    def collective(s):
        seen.append(s.projector.side)
        sum_of_halves(s)

    assert_same_weights(train_plain(make), train_staged(make, between=collective))
    assert "left" in seen  # the (12, 40) weight, projected from the left, took the sharded sum


def test_changing_R_between_the_stages_changes_the_step():
    """The seam is real: what the collective leaves in s.R is what the inner rule reads."""
    make = MAKERS["galore"]
    scaled = train_staged(make, between=lambda s: s.R.mul_(2.0))
    plain = train_plain(make)
    assert any(not torch.equal(p, q) for p, q in zip(scaled.parameters(), plain.parameters()))


# -- moment_policy="rotate" for the inner rules other than Adam ----------------------------------------

# How each rule's state crosses a refresh with O = P_new^T P_old: linear averages of projected gradients
# (Lion's and SGD's momentum, Natural GaLore's m and gradient history) by O itself, exactly; a second
# moment by the squared overlap O * O, which keeps it non-negative (``functional.rotate_moments_``).
ROTATED_STATE = {
    "lion": {"exp_avg": "linear"},
    "sgd": {"momentum_buffer": "linear"},
    "natural": {"exp_avg": "linear", "grad_history": "linear", "exp_avg_sq": "squared"},
}
RULE_SETTINGS = {"lion": {}, "sgd": {"momentum": 0.9}, "natural": {"natural_history": 3}}


def rotated_float64(state: torch.Tensor, overlap: torch.Tensor, side: str) -> torch.Tensor:
    """The state in the new basis: ``O state`` on the left side (coordinates along rows), ``state O^T`` on the
    right, over any leading (history) axis."""
    return overlap @ state if side == "left" else state @ overlap.t()


@pytest.mark.parametrize("shape", [(12, 20), (20, 8)])  # left and right side
@pytest.mark.parametrize("inner", ROTATED_STATE)
def test_rotate_carries_each_inner_rules_state_into_the_new_basis(inner, shape):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(shape))
    r, gap = 4, 3
    opt = SubspaceAdamW([{"params": [W], "rank": r}], lr=1e-2, inner=inner, projector="svd", update_proj_gap=gap,
                        stagger=False, moment_policy="rotate", **RULE_SETTINGS[inner])
    group, state = opt.param_groups[0], opt.state[W]
    # A drifting dominant subspace: consecutive bases overlap, but O is far from the identity.
    gen = torch.Generator().manual_seed(1)
    common = torch.randn(shape, generator=gen)
    grads = [common + 0.7 * torch.randn(shape, generator=gen) for _ in range(gap + 1)]
    for G in grads[:gap]:
        W.grad = G.clone()
        opt.step()
    P_old = state["proj_P"].double()
    before = {key: state[key].double() for key in ROTATED_STATE[inner]}
    s = opt.begin(W, group, grads[gap].clone())  # the refresh, and the moments carried into the new basis
    overlap = state["proj_P"].double().t() @ P_old
    side, dim = s.projector.side, P_old.shape[0]
    assert (overlap - torch.eye(r, dtype=torch.float64)).abs().max() > 0.1  # a real change of basis
    for key, how in ROTATED_STATE[inner].items():
        carrier = overlap if how == "linear" else overlap * overlap
        expected = rotated_float64(before[key], carrier, side)
        # fp32: the overlap has sums of dim products (dim u each entry, 2 dim u squared), then r terms per entry.
        bound = r * (2 * dim + r + 1) * 2.0**-24 * before[key].abs().max().item()
        assert (state[key].double() - expected).abs().max().item() <= bound, key
        assert (expected - before[key]).abs().max().item() > 100 * bound  # keeping the state would fail
    opt.finish(s, opt.run_inner(s))
    assert torch.isfinite(W).all()
