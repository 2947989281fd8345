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
from scrimp.optim.moments import stored_keys
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


# -- seams for drivers that hold the moments themselves (offload, issue 15) ----------------------------

def moment_keys_of(opt, group):
    return {key for spec in opt.parts(group).inner.moment_specs() for key in stored_keys(spec)}


def train_with_moments_outside(make):
    """Every step through the public seams with the moments in dicts of the caller's, never the engine's
    state: projected groups by begin(defer_moments=True) + prepare_moments + run_inner + finish, plain
    groups by step_param(..., moments=...)."""
    net = model()
    opt = make(net)
    held = {p: {} for g in opt.param_groups for p in g["params"]}
    for x in batches():
        backward(net, x)
        for group in opt.param_groups:
            for p in group["params"]:
                if not is_projected_group(group):
                    opt.step_param(p, group, p.grad, moments=held[p])
                    continue
                s = opt.begin(p, group, p.grad, defer_moments=True)
                opt.prepare_moments(s, held[p])
                opt.finish(s, opt.run_inner(s))
            for p in group["params"]:
                assert not moment_keys_of(opt, group) & opt.state[p].keys()  # they stayed with the caller
        opt.zero_grad()
    return net, opt, held


@pytest.mark.parametrize("name", MAKERS)
def test_moments_held_by_the_caller_step_as_the_engines_own(name):
    net, opt, held = train_with_moments_outside(MAKERS[name])
    ref = model()
    ref_opt = MAKERS[name](ref)
    for x in batches():
        backward(ref, x)
        ref_opt.step()
        ref_opt.zero_grad()
    assert_same_weights(ref, net)
    for group, ref_group in zip(opt.param_groups, ref_opt.param_groups):
        keys = moment_keys_of(opt, group)
        for p, q in zip(group["params"], ref_group["params"]):
            ref_moments = {k: v for k, v in ref_opt.state[q].items() if k in keys}
            assert held[p].keys() == ref_moments.keys()
            assert all(torch.equal(held[p][k], ref_moments[k]) for k in held[p])
            assert opt.state[p].keys() == ref_opt.state[q].keys() - keys  # the counters and the projector
            for k, v in opt.state[p].items():
                other = ref_opt.state[q][k]
                assert torch.equal(v, other) if torch.is_tensor(v) else v == other, k


def mixed_plain_group(seed=0):
    """A plain group whose members take different paths of adam_step_foreach alone: fp32 (torch's fused
    kernel), fp32 whose gradient has another layout and an fp64 vector (foreach ops), bf16 (its own path)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(10, 8, generator=gen)),
            torch.nn.Parameter(torch.randn(8, 10, generator=gen).t()),
            torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(6, 4, generator=gen).bfloat16()),
            torch.nn.Parameter(torch.randn(7, generator=gen))]


def plain_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


@pytest.mark.parametrize("eight_bit", [False, True])
def test_step_param_on_a_plain_group_equals_the_batched_step_bitwise(eight_bit):
    batched, alone = mixed_plain_group(), mixed_plain_group()
    if eight_bit:  # 4096 entries: 8-bit moments, which take the stages one by one
        batched.append(torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(5))))
        alone.append(torch.nn.Parameter(batched[-1].detach().clone()))
    make = GaLoreAdamW8bit if eight_bit else SubspaceAdamW
    opt_b = make([{"params": batched}], lr=1e-2, weight_decay=0.1)
    opt_a = make([{"params": alone}], lr=1e-2, weight_decay=0.1)
    for step in range(4):
        active = [i for i in range(len(batched)) if (i + step) % 3]  # parameters with no gradient some steps
        for i, g in zip(active, [plain_grads(batched, step)[i] for i in active]):
            batched[i].grad = g.clone()
        opt_b.step()
        opt_b.zero_grad()
        for i in reversed(active):  # any order: each parameter alone
            opt_a.step_param(alone[i], opt_a.param_groups[0], plain_grads(alone, step)[i])
    for p, q in zip(batched, alone):
        assert torch.equal(p, q), f"{p.dtype} {tuple(p.shape)}"
        for key, value in opt_b.state[p].items():
            other = opt_a.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    if eight_bit:
        assert "exp_avg_q" in opt_a.state[alone[-1]]


def test_the_batch_split_is_what_makes_a_mixed_group_equal(monkeypatch):
    """Without splitting by path, the fp32 members batched with the fp64 one take foreach ops, alone the
    fused kernel: the weights differ (so the test above can fail)."""
    from scrimp.optim import subspace

    monkeypatch.setattr(subspace, "_adam_path", lambda p, grad, moments: p.device)
    batched, alone = mixed_plain_group(), mixed_plain_group()
    opt_b, opt_a = SubspaceAdamW([{"params": batched}], lr=1e-2), SubspaceAdamW([{"params": alone}], lr=1e-2)
    for step in range(3):
        for p, g in zip(batched, plain_grads(batched, step)):
            p.grad = g
        opt_b.step()
        for p, g in zip(alone, plain_grads(alone, step)):
            opt_a.step_param(p, opt_a.param_groups[0], g)
    assert not torch.equal(batched[0], alone[0])


def test_the_moment_event_says_what_a_refresh_does_to_the_moments():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(12, 20))
    opt = SubspaceAdamW([{"params": [W], "rank": 4}], lr=1e-2, update_proj_gap=2, stagger=False,
                        moment_policy="rotate")
    group, held = opt.param_groups[0], {}
    events = []
    for t in range(3):
        P_old = opt.state[W].get("proj_P")
        s = opt.begin(W, group, torch.randn(12, 20), defer_moments=True)
        before = {k: v.clone() for k, v in held.items()}
        events.append(s.moment_event)
        if s.moment_event.overlap is not None:
            expected = opt.state[W]["proj_P"].double().t() @ P_old.double()
            torch.testing.assert_close(s.moment_event.overlap.double(), expected, rtol=0, atol=1e-6)
        with pytest.raises(RuntimeError, match="call prepare_moments"):
            opt.run_inner(s)
        opt.prepare_moments(s, held)
        if t == 2:  # rotated in the caller's dict, by the overlap
            assert not torch.equal(held["exp_avg"], before["exp_avg"])
        with pytest.raises(RuntimeError, match="once per step"):
            opt.prepare_moments(s, held)
        opt.finish(s, opt.run_inner(s))
    assert events[0].drop and events[0].overlap is None and events[0].shape == (4, 20)  # the first subspace
    assert not events[1].drop and events[1].overlap is None  # no refresh
    assert not events[2].drop and events[2].overlap is not None  # a refresh under "rotate"
    assert opt.state[W]["moment_step"] == 3 and "exp_avg" not in opt.state[W]


def test_an_inactive_block_drops_the_callers_moments():
    net = model()
    opt = MAKERS["frugal_blocks"](net)
    group = next(g for g in opt.param_groups if is_projected_group(g))
    held = {p: {} for p in group["params"]}
    saw_pause = False
    for x in batches():
        backward(net, x)
        for p in group["params"]:
            s = opt.begin(p, group, p.grad, defer_moments=True)
            opt.prepare_moments(s, held[p])
            if s.moment_event.shape is None:
                saw_pause = True
                assert s.moment_event.drop and held[p] == {} and opt.state[p]["moment_step"] == 0
            opt.finish(s, opt.run_inner(s))
        opt.zero_grad()
    assert saw_pause


@pytest.mark.parametrize("name", MAKERS)
def test_moment_layout_is_what_the_store_creates(name):
    net = model()
    opt = MAKERS[name](net)
    before = {p: dict(opt.state[p]) for p in net.parameters()}
    layouts = {p: opt.moment_layout(p, g) for g in opt.param_groups for p in g["params"]}
    assert all(opt.state[p] == before[p] for p in layouts)  # asked from the settings alone
    for x in batches(3):
        backward(net, x)
        opt.step()
        opt.zero_grad()
    for group in opt.param_groups:
        for p in group["params"]:
            created = {k: (tuple(v.shape), v.dtype) for k, v in opt.state[p].items()
                       if k in moment_keys_of(opt, group)}
            if created or name != "frugal_blocks":  # an inactive block holds none now
                assert created == {k: tuple(slot) for k, slot in layouts[p].items()}, p.shape


def test_moment_layout_of_8bit_moments_and_of_an_empty_subspace():
    big = torch.nn.Parameter(torch.randn(128, 96))
    opt = GaLoreAdamW8bit([{"params": [big], "rank": 48}, {"params": [torch.nn.Parameter(torch.randn(3))]}])
    layout = opt.moment_layout(big, opt.param_groups[0])
    # std projects the (128, 96) weight from the right: R is (128, 48), 6144 entries, 24 absmax blocks of 256
    assert layout == {"exp_avg_q": ((128, 48), torch.uint8), "exp_avg_absmax": ((24,), torch.float32),
                      "exp_avg_sq_q": ((128, 48), torch.uint8), "exp_avg_sq_absmax": ((24,), torch.float32)}
    tiny = opt.param_groups[1]["params"][0]
    assert opt.moment_layout(tiny, opt.param_groups[1]) == {"exp_avg": ((3,), torch.float32),
                                                            "exp_avg_sq": ((3,), torch.float32)}
    empty = SubspaceAdamW([{"params": [torch.nn.Parameter(torch.randn(8, 6))], "rank": 0}], residual="sign_sgd",
                          projector="svd", allow_empty_subspace=True)
    assert empty.moment_layout(empty.param_groups[0]["params"][0], empty.param_groups[0]) == {}


def test_refuse_nonfinite_gradients_is_public_and_names_the_parameter():
    W = torch.nn.Parameter(torch.randn(4, 3))
    opt = SubspaceAdamW([{"params": [torch.nn.Parameter(torch.randn(2))]}, {"params": [W]}])
    opt.refuse_nonfinite_gradients()  # no gradients: nothing to refuse
    W.grad = torch.full((4, 3), float("nan"))
    with pytest.raises(FloatingPointError, match=r"group 1.*holds inf or NaN"):
        opt.refuse_nonfinite_gradients()
