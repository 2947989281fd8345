"""Layer-wise updates with accumulation equal plain accumulation; impossible options raise."""

import copy
from pathlib import Path

import pytest
import torch

from scrimp.optim import FrugalAdamW, GaLoreAdamW, layerwise
from scrimp.optim.memory import state_bytes


def model_and_groups(seed=0, **projection):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 10), torch.nn.Tanh(),
                                torch.nn.Linear(10, 3))
    projected = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in projected)]
    return model, [{"params": projected, **projection}, {"params": rest}]


def micro_batches(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def loss_of(model, batch, k):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y) / k


FACTORIES = {
    "galore": (dict(rank=3), lambda groups: GaLoreAdamW(groups, lr=1e-2, update_proj_gap=2)),
    # eps 1e-6: FRUGAL's torch-style eps right after each moment reset (gap 2) is 1e-8 * sqrt(1 - b2),
    # which turns rounding-level differences between the two accumulation orders into +-lr steps.
    "frugal-sign": (dict(density=0.5), lambda groups: FrugalAdamW(groups, lr=1e-2, eps=1e-6, update_gap=2,
                                                                  proj_type="svd")),
    "frugal-randk": (dict(density=0.25), lambda groups: FrugalAdamW(groups, lr=1e-2, update_gap=3,
                                                                     proj_type="randk", inactive_update_rule="no")),
    "torch-adamw": (dict(), lambda groups: torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-2)),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_layerwise_accumulate_4_equals_plain_accumulation(name):
    projection, factory = FACTORIES[name]
    k, windows = 4, 5  # gap 2: windows alternate between refresh steps and low-rank accumulation
    batches = micro_batches(k * windows)
    plain_model, plain_groups = model_and_groups(**projection)
    plain = factory(plain_groups)
    for w in range(windows):
        plain.zero_grad()
        for batch in batches[w * k:(w + 1) * k]:
            loss_of(plain_model, batch, k).backward()
        plain.step()
    lw_model, lw_groups = model_and_groups(**projection)
    opt = layerwise(lw_model, factory, accumulate=k, groups=lw_groups)
    assert opt.needs_manual_optimization and opt.is_layerwise
    for batch in batches:
        loss_of(lw_model, batch, k).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(lw_model.parameters(), plain_model.parameters()):
        # sums of projections vs projection of sums, per-tensor vs foreach Adam: rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in lw_model.parameters())


def test_projected_gradients_are_freed_between_refreshes():
    model, groups = model_and_groups(rank=3)
    opt = layerwise(model, lambda gs: GaLoreAdamW(gs, update_proj_gap=100, stagger=False), accumulate=2,
                    groups=groups)
    batches = micro_batches(3)
    for batch in batches[:2]:  # first window: refresh step, full gradients accumulate
        loss_of(model, batch, 2).backward()
        opt.step()
    loss_of(model, batches[2], 2).backward()  # second window, first micro-batch: only projections kept
    assert model[0].weight.grad is None and model[2].weight.grad is None
    assert model[4].weight.grad is not None  # a plain parameter accumulates in .grad
    assert state_bytes(opt)["other"] == (24 * 3 + 3 * 24) * 4  # the two low-rank accumulation buffers


def train_layerwise(model, opt, part, k):
    """Backward each micro-batch (the updates run in the hooks), then the wrapper's bookkeeping."""
    for batch in part:
        loss_of(model, batch, k).backward()
        opt.step()
        opt.zero_grad()


def test_layerwise_state_dict_resume_matches_uninterrupted(tmp_path):
    batches = micro_batches(12)
    run = lambda model, opt, part: train_layerwise(model, opt, part, 2)  # noqa: E731

    factory = lambda gs: GaLoreAdamW(gs, lr=1e-2, update_proj_gap=3)
    ref_model, ref_groups = model_and_groups(rank=3)
    run(ref_model, layerwise(ref_model, factory, accumulate=2, groups=ref_groups), batches)
    model, groups = model_and_groups(rank=3)
    opt = layerwise(model, factory, accumulate=2, groups=groups)
    run(model, opt, batches[:6])
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, tmp_path / "ck.pt")
    blob = torch.load(tmp_path / "ck.pt", weights_only=True)
    model2, groups2 = model_and_groups(rank=3)
    model2.load_state_dict(blob["model"])
    opt2 = layerwise(model2, factory, accumulate=2, groups=groups2)
    opt2.load_state_dict(blob["opt"])
    run(model2, opt2, batches[6:])
    for a, b in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["galore", "torch-adamw"])
def test_a_parameter_unused_in_the_last_micro_batch_steps_with_its_window(name):
    # The first layer is skipped in the last micro-batch of every window (a frozen-input branch, a
    # routed expert, ...): plain accumulation still steps it with what it got; so must layer-wise,
    # and nothing may leak into the next window.
    projection, factory = FACTORIES[name]
    k, windows = 2, 4

    def forward(model, batch, use_first):
        x, y = batch
        h = model[0](x) if use_first else torch.zeros(x.shape[0], 24)
        return torch.nn.functional.mse_loss(model[4](model[3](model[2](model[1](h)))), y) / k

    batches = micro_batches(k * windows)
    plain_model, plain_groups = model_and_groups(**projection)
    plain = factory(plain_groups)
    for w in range(windows):
        plain.zero_grad()
        for i, batch in enumerate(batches[w * k:(w + 1) * k]):
            forward(plain_model, batch, use_first=i < k - 1).backward()
        plain.step()
    lw_model, lw_groups = model_and_groups(**projection)
    opt = layerwise(lw_model, factory, accumulate=k, groups=lw_groups)
    for j, batch in enumerate(batches):
        forward(lw_model, batch, use_first=j % k < k - 1).backward()
        opt.step()
        opt.zero_grad()
        if j % k == k - 1:
            assert not opt._accum and all(p.grad is None for p in lw_model.parameters())
    for a, b in zip(lw_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["galore", "torch-adamw"])
def test_loaded_hyper_parameters_drive_the_hooks_and_schedulers(name, tmp_path):
    # A run whose lr is lowered mid-way, saved and resumed, must continue with the lowered lr,
    # and a scheduler attached after the load must still reach the updates.
    projection, factory = FACTORIES[name]
    batches = micro_batches(8)
    run = lambda model, opt, part: train_layerwise(model, opt, part, 1)  # noqa: E731

    ref_model, ref_groups = model_and_groups(**projection)
    ref = layerwise(ref_model, factory, accumulate=1, groups=ref_groups)
    run(ref_model, ref, batches[:4])
    for group in ref.param_groups:
        group["lr"] = 1e-3
    torch.save({"opt": ref.state_dict(), "model": ref_model.state_dict()}, tmp_path / "ck.pt")
    run(ref_model, ref, batches[4:])

    blob = torch.load(tmp_path / "ck.pt", weights_only=True)
    model, groups = model_and_groups(**projection)
    model.load_state_dict(blob["model"])
    opt = layerwise(model, factory, accumulate=1, groups=groups)
    opt.load_state_dict(blob["opt"])
    assert all(group["lr"] == 1e-3 for group in opt.param_groups)
    run(model, opt, batches[4:])
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    frozen = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0 from here on
    before = [p.detach().clone() for p in model.parameters()]
    run(model, opt, batches[:2])
    assert frozen.get_last_lr()[0] == 0.0
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_global_clipping_and_bad_accumulate_raise_at_build_time():
    model, groups = model_and_groups(rank=3)
    with pytest.raises(ValueError, match="clip_grad_norm is not possible with layer-wise updates"):
        layerwise(model, GaLoreAdamW, accumulate=2, clip_grad_norm=1.0, groups=groups)
    with pytest.raises(ValueError, match="accumulate must be an integer >= 1"):
        layerwise(model, GaLoreAdamW, accumulate=0, groups=groups)


def test_layerwise_is_a_torch_optimizer_whose_groups_are_the_inner_ones():
    model, groups = model_and_groups(rank=3)
    opt = layerwise(model, lambda gs: GaLoreAdamW(gs, lr=1e-2), accumulate=1, groups=groups)
    assert isinstance(opt, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    loss_of(model, micro_batches(1)[0], 1).backward()
    opt.step()
    scheduler.step()
    assert [g["lr"] for g in opt.optimizer.param_groups] == [5e-3, 5e-3]


def test_loaded_low_rank_buffers_follow_their_parameters_device():
    # A mid-window checkpoint loaded to the CPU must resume on the parameters' device; "meta"
    # stands in for a GPU here (the inner optimizer's own state is moved by torch's load_state_dict).
    model, groups = model_and_groups(rank=3)
    factory = lambda gs: GaLoreAdamW(gs, update_proj_gap=100, stagger=False)  # noqa: E731
    opt = layerwise(model, factory, accumulate=2, groups=groups)
    batches = micro_batches(3)
    train_layerwise(model, opt, batches, 2)  # stops inside the second window: low-rank buffers held
    saved = opt.state_dict()
    assert saved["accum"] and all(buf.device.type == "cpu" for buf in saved["accum"].values())
    meta_model = model_and_groups(rank=3)[0].to("meta")
    projected = [meta_model[0].weight, meta_model[2].weight]
    rest = [p for p in meta_model.parameters() if all(p is not q for q in projected)]
    meta_groups = [{"params": projected, "rank": 3}, {"params": rest}]
    resumed = layerwise(meta_model, factory, accumulate=2, groups=meta_groups)
    resumed.load_state_dict(saved)
    assert resumed._accum and all(buf.device.type == "meta" for buf in resumed._accum.values())


def test_bad_groups_and_state_dicts_are_one_sentence():
    model, groups = model_and_groups(rank=3)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="1 parameter\\(s\\) in groups do not require grad"):
        layerwise(model, lambda gs: GaLoreAdamW(gs), groups=groups)
    with pytest.raises(ValueError, match=r"groups\[0\] must be a dict with a 'params' list"):
        layerwise(model, lambda gs: GaLoreAdamW(gs), groups=[{"parms": []}])
    model[0].bias.requires_grad_(True)
    opt = layerwise(model, lambda gs: GaLoreAdamW(gs), groups=groups)
    with pytest.raises(ValueError, match="state_dict is not a layer-wise optimizer's"):
        opt.load_state_dict({})


def test_check_finite_must_be_a_bool():
    model, groups = model_and_groups(rank=3)
    with pytest.raises(ValueError, match="^check_finite must be True or False, got 'yes'$"):
        layerwise(model, lambda gs: GaLoreAdamW(gs), groups=groups, check_finite="yes")


def test_check_finite_false_lets_the_caller_own_the_check():
    # The documented opt-out: no device flags, no host reads; a NaN then reaches the weights as with
    # torch's own AdamW (which does not check) driven by hand.
    model = TokenModel()
    layerwise(model, FACTORIES["torch-adamw"][1], accumulate=1, groups=model.groups(), check_finite=False)
    poison(model.out.weight)
    token_loss(model, 0).backward()
    assert torch.isnan(model.out.weight).all()


def test_groups_given_as_a_generator_are_read_once():
    model, groups = model_and_groups(rank=3)
    opt = layerwise(model, lambda gs: GaLoreAdamW(gs), groups=(g for g in groups))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# -- the loops a user writes (issue 13, item 5) ------------------------------------------------------
# Teacher-forced gradients: each micro-batch's "loss" is sum(p * g), whose gradient is exactly g, so
# the two runs see the same gradients whatever their weights. Inside a window the gradient of a
# projected weight is c_i * G with c = (1/8, 1/8, 1/4, 1/2): every partial sum is exact in binary
# floating point, and scaling by a power of two commutes with rounding, so the sum of projections
# equals the projection of the sum bit for bit and any difference from plain accumulation is a
# plumbing error (a micro-batch lost, counted twice, or put in the wrong window), not rounding.
# Plain parameters get independent random gradients: their sums are formed in .grad by autograd in
# both runs, in the same order, so they too must agree bit for bit.
DYADIC = (0.125, 0.125, 0.25, 0.5)


def teacher_gradients(model, windows, seed=11):
    """Per window, per micro-batch, one gradient per parameter of ``model_and_groups``'s model."""
    g = torch.Generator().manual_seed(seed)
    projected = {id(model[0].weight), id(model[2].weight)}
    out = []
    for _ in range(windows):
        base = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        window = []
        for c in DYADIC:
            window.append([c * b if id(p) in projected else torch.randn(p.shape, generator=g)
                           for p, b in zip(model.parameters(), base)])
        out.append(window)
    return out


def teacher_backward(model, grads):
    sum((p * g).sum() for p, g in zip(model.parameters(), grads)).backward()


TEACHER_FACTORIES = {
    "galore": (dict(rank=3), lambda groups: GaLoreAdamW(groups, lr=1e-2, update_proj_gap=2)),
    "adamw-groups": (dict(), lambda groups: GaLoreAdamW([{"params": g["params"]} for g in groups], lr=1e-2)),
    "torch-adamw": FACTORIES["torch-adamw"],
}


def plain_accumulation(name, grads):
    projection, factory = TEACHER_FACTORIES[name]
    model, groups = model_and_groups(**projection)
    opt = factory(groups)
    for window in grads:
        opt.zero_grad()
        for micro in window:
            teacher_backward(model, micro)
        opt.step()
    return model


def step_per_window(model, opt, window):
    for micro in window:
        teacher_backward(model, micro)
    opt.step()
    opt.zero_grad()


def step_every_backward(model, opt, window):
    for micro in window:
        teacher_backward(model, micro)
        opt.step()
        opt.zero_grad()


def step_every_backward_zero_grad_per_window(model, opt, window):
    for micro in window:
        teacher_backward(model, micro)
        opt.step()
    opt.zero_grad()


def step_per_window_without_zero_grad(model, opt, window):
    for micro in window:
        teacher_backward(model, micro)
    opt.step()


WORKING_LOOPS = [step_per_window, step_every_backward, step_every_backward_zero_grad_per_window,
                 step_per_window_without_zero_grad]


@pytest.mark.parametrize("loop", WORKING_LOOPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", list(TEACHER_FACTORIES))
def test_every_supported_loop_updates_exactly_as_plain_accumulation(name, loop):
    # 6 windows of 4 with update_proj_gap 2: refresh windows (full sums in .grad) alternate with
    # low-rank windows (projected sums), so both kinds of window and two refreshes are covered.
    projection, factory = TEACHER_FACTORIES[name]
    model, groups = model_and_groups(**projection)
    grads = teacher_gradients(model, windows=6)
    reference = plain_accumulation(name, grads)
    opt = layerwise(model, factory, accumulate=4, groups=groups)
    for window in grads:
        loop(model, opt, window)
        assert all(p.grad is None for p in model.parameters()) and not opt._accum
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(model[0].weight, model_and_groups(**projection)[0][0].weight)  # it really moved
    if name == "galore":
        assert opt.optimizer.state[model[0].weight]["proj_refresh"] >= 2


def zero_grad_every_micro_batch(model, opt, window):
    for i, micro in enumerate(window):
        teacher_backward(model, micro)
        if i == len(window) - 1:
            opt.step()
        opt.zero_grad()


def zero_grad_before_every_backward(model, opt, window):
    for i, micro in enumerate(window):
        opt.zero_grad()
        teacher_backward(model, micro)
        if i == len(window) - 1:
            opt.step()


def step_every_second_backward(model, opt, window):
    for i, micro in enumerate(window):
        teacher_backward(model, micro)
        if i % 2 == 1:
            opt.step()
            opt.zero_grad()


def backward_without_step(model, opt, window):
    for micro in window + window[:1]:
        teacher_backward(model, micro)


def model_zero_grad_inside_the_window(model, opt, window):
    for i, micro in enumerate(window):
        teacher_backward(model, micro)
        if i == 1:
            model.zero_grad()
    opt.step()


REFUSED_LOOPS = {
    zero_grad_every_micro_batch: "zero_grad\\(\\) came after a backward pass that no step\\(\\) has taken",
    zero_grad_before_every_backward: "zero_grad\\(\\) came after a backward pass that no step\\(\\) has taken",
    step_every_second_backward: "step\\(\\) came after 2 backward passes since the previous step\\(\\)",
    backward_without_step: "arrived 5 times without step\\(\\); with accumulate=4 call step\\(\\) after every",
    model_zero_grad_inside_the_window: "the summed gradient of 4.bias was cleared inside an accumulation window",
}


@pytest.mark.parametrize("loop", list(REFUSED_LOOPS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", ["galore", "torch-adamw"])
def test_every_other_loop_is_refused_in_one_sentence_before_any_update(name, loop):
    projection, factory = TEACHER_FACTORIES[name]
    model, groups = model_and_groups(**projection)
    before = [p.detach().clone() for p in model.parameters()]
    opt = layerwise(model, factory, accumulate=4, groups=groups)
    with pytest.raises(RuntimeError, match=REFUSED_LOOPS[loop]) as err:
        loop(model, opt, teacher_gradients(model, windows=1)[0])
    assert "\n" not in str(err.value)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_accumulating_loop_with_accumulate_1_is_refused_at_the_second_backward():
    # accumulate=1 updates inside each backward: a loop that sums 4 backward passes per step() would
    # get 4 updates, not one. The second backward is refused at its first hook, before it updates.
    model, groups = model_and_groups(rank=3)
    opt = layerwise(model, TEACHER_FACTORIES["galore"][1], accumulate=1, groups=groups)
    window = teacher_gradients(model, windows=1)[0]
    teacher_backward(model, window[0])
    assert opt.optimizer.state  # the first backward updated at once, as accumulate=1 does
    after_first = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="arrived 2 times without step\\(\\); with accumulate=1 each backward "
                                           "updates the weights at once"):
        teacher_backward(model, window[1])
    for a, b in zip(model.parameters(), after_first):
        assert torch.equal(a, b)


# -- non-finite gradients ---------------------------------------------------------------------------
class TokenModel(torch.nn.Module):
    """Embedding -> Linear -> Linear (no bias at the end: its weight is the first leaf backward reaches)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(16, 12)
        self.hidden = torch.nn.Linear(12, 10)
        self.out = torch.nn.Linear(10, 16, bias=False)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))

    def groups(self):
        return [{"params": [self.hidden.weight], "rank": 3},
                {"params": [self.embed.weight, self.hidden.bias, self.out.weight]}]


def token_loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 8, (6,), generator=g)  # tokens 8..15 are never used
    return torch.nn.functional.cross_entropy(model(tokens), torch.randint(0, 16, (6,), generator=g))


def poison(param, row=None):
    """A tensor hook that puts NaN into ``param``'s gradient (in one row, or everywhere)."""
    def hook(grad):
        grad = grad.clone()
        if row is None:
            grad.fill_(float("nan"))
        else:
            grad[row] = float("nan")
        return grad
    return param.register_hook(hook)


FACTORY = lambda gs: GaLoreAdamW(gs, lr=1e-2, update_proj_gap=2)  # noqa: E731


def test_accumulate_1_nan_in_an_unused_embedding_row_never_reaches_the_embedding():
    model = TokenModel()
    opt = layerwise(model, FACTORY, accumulate=1, groups=model.groups())
    token_loss(model, 0).backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = poison(model.embed.weight, row=12)  # a token that no batch uses
    with pytest.raises(FloatingPointError, match=r"^the gradient of embed.weight holds inf or NaN; it was not "
                                                 r"updated, nor any parameter whose gradient comes later"):
        token_loss(model, 1).backward()
    assert torch.equal(model.embed.weight, before["embed.weight"])
    # the layers nearer the loss were updated earlier in the same backward, with finite gradients (documented)
    assert not torch.equal(model.out.weight, before["out.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    handle.remove()
    token_loss(model, 2).backward()  # the next batch trains normally
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accumulate_1_nan_in_the_first_gradient_of_backward_leaves_every_weight_unchanged():
    model = TokenModel()
    opt = layerwise(model, FACTORY, accumulate=1, groups=model.groups())
    before = [p.detach().clone() for p in model.parameters()]
    poison(model.out.weight)
    with pytest.raises(FloatingPointError, match="^the gradient of out.weight holds inf or NaN"):
        token_loss(model, 0).backward()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    assert not opt.optimizer.state  # no moment was created either


@pytest.mark.parametrize("loop", [step_per_window, step_every_backward], ids=lambda f: f.__name__)
def test_accumulate_4_nan_anywhere_in_a_window_updates_nothing_and_the_next_window_trains(loop):
    # Window 2's second micro-batch carries a NaN in a row of the projected weight's gradient. No
    # parameter may take window 2; windows 1 and 3 must be exactly plain accumulation of windows 1 and 3.
    projection, factory = TEACHER_FACTORIES["galore"]
    model, groups = model_and_groups(**projection)
    grads = teacher_gradients(model, windows=3)
    bad = [list(micro) for micro in grads[1]]
    bad[1][0] = bad[1][0].clone()
    bad[1][0][5, 2] = float("nan")
    reference = plain_accumulation("galore", [grads[0], grads[2]])
    opt = layerwise(model, factory, accumulate=4, groups=groups)
    loop(model, opt, grads[0])
    after_first = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"^the gradient of 0.weight holds inf or NaN in this accumulation "
                                                 r"window \(in a micro-batch, or in the sum of finite ones\); no "
                                                 r"parameter was updated with the window"):
        loop(model, opt, bad)
    for a, b in zip(model.parameters(), after_first):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters()) and not opt._accum
    opt.zero_grad()
    loop(model, opt, grads[2])
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


# -- the wrapper owns the finite-gradient rule (review of issue 13: no half-applied window) ---------
def poisoned_windows(model, name, windows, bad_window, value, seed=11):
    """Teacher gradients (2 micro-batches per window) with ``value`` filling parameter ``name``'s
    gradient in every micro-batch of window ``bad_window``."""
    index = [n for n, _ in model.named_parameters()].index(name)
    grads = [[list(micro) for micro in window[:2]] for window in teacher_gradients(model, windows, seed)]
    for micro in grads[bad_window]:
        micro[index] = torch.full_like(micro[index], value)
    return grads


def test_check_finite_false_a_nan_in_a_plain_parameter_is_applied_whole_and_the_next_window_trains():
    # The documented contract of check_finite=False: nothing is checked, in the wrapper or in the
    # inner optimizer (whose own default check would refuse after the low-rank weights had moved,
    # and leave the window's sums behind). Reference: plain accumulation with an unchecked GaLore.
    factory = lambda gs: GaLoreAdamW(gs, lr=1e-2, update_proj_gap=2)  # noqa: E731  (check_finite left at its default)
    model, groups = model_and_groups(rank=3)
    grads = poisoned_windows(model, "4.bias", windows=3, bad_window=1, value=float("nan"))
    ref_model, ref_groups = model_and_groups(rank=3)
    plain = GaLoreAdamW(ref_groups, lr=1e-2, update_proj_gap=2, check_finite=False)
    opt = layerwise(model, factory, accumulate=2, groups=groups, check_finite=False)
    for window in grads:  # window 1 is a low-rank window: 0.weight and 2.weight step from projected sums
        plain.zero_grad()
        for micro in window:
            teacher_backward(ref_model, micro)
        plain.step()
        step_per_window(model, opt, window)
        for a, b in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # dyadic teacher sums: bit for bit
    assert torch.isnan(model[4].bias).all() and torch.isfinite(model[0].weight).all()


@pytest.mark.parametrize("name, param, sums", [("frugal-randk", "0.weight", "low-rank"), ("galore", "4.bias", "full")])
def test_finite_gradients_whose_window_sum_overflows_update_nothing_and_the_next_window_trains(name, param, sums):
    # 2e38 is finite in fp32, 2e38 + 2e38 is not. randk keeps a subset of the entries exactly, so the
    # low-rank window sum of 0.weight overflows while every micro-batch's gradient (and projection)
    # is finite: only a check of the sum itself sees it. Reference: plain accumulation of the other
    # windows, since the refused one must change nothing (weights, moments, projector clock).
    projection, factory = FACTORIES[name]
    model, groups = model_and_groups(**projection)
    grads = poisoned_windows(model, param, windows=3, bad_window=1, value=2e38)
    ref_model, ref_groups = model_and_groups(**projection)
    plain = factory(ref_groups)
    for window in (grads[0], grads[2]):
        plain.zero_grad()
        for micro in window:
            teacher_backward(ref_model, micro)
        plain.step()
    opt = layerwise(model, factory, accumulate=2, groups=groups)
    step_per_window(model, opt, grads[0])
    for micro in grads[1]:
        teacher_backward(model, micro)
    assert (dict(model.named_parameters())[param].grad is None) == (sums == "low-rank")  # where the sum is kept
    after_first = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=rf"^the gradient of {param} holds inf or NaN in this accumulation "
                                                 r"window \(in a micro-batch, or in the sum of finite ones\)"):
        opt.step()
    for a, b in zip(model.parameters(), after_first):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters()) and not opt._accum
    step_per_window(model, opt, grads[2])
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


class SparseLookup(torch.nn.Module):
    """A dense layer that steps first and a sparse embedding that torch's AdamW refuses in its step()."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dense = torch.nn.Linear(4, 3)
        self.lookup = torch.nn.Embedding(8, 4, sparse=True)

    def loss(self, seed, use_lookup):
        g = torch.Generator().manual_seed(seed)
        x = self.lookup(torch.randint(0, 8, (5,), generator=g)) if use_lookup else torch.randn(5, 4, generator=g)
        return self.dense(x).pow(2).mean()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_an_update_that_fails_partway_says_so_and_leaves_the_optimizer_usable(accumulate):
    # torch's AdamW refuses sparse gradients inside its step(), after the dense parameters' updates:
    # the error must not hide that some weights moved, and the wrapper must not keep the failed
    # window's gradients or counters (every later call would be refused). Reference: per-parameter
    # AdamW on the dense layer fed the same gradients (the failed window's dense update included).
    model, reference = SparseLookup(), SparseLookup()
    factory = lambda gs: torch.optim.AdamW(gs, lr=1e-2)  # noqa: E731
    opt = layerwise(model, factory, accumulate=accumulate, groups=[{"params": [model.dense.weight, model.dense.bias,
                                                                                  model.lookup.weight]}])
    plain = factory([reference.dense.weight, reference.dense.bias])
    lookup_before = model.lookup.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"^a layer-wise update stopped partway, so some parameters may already "
                                           r"hold it .* starts clean: RuntimeError: Adam does not support sparse") as err:
        for seed in range(accumulate):
            model.loss(seed, use_lookup=True).backward()
            opt.step()
    assert "\n" not in str(err.value)
    for seed in range(accumulate):
        reference.loss(seed, use_lookup=True).backward()
    plain.step()
    plain.zero_grad()
    assert torch.equal(model.lookup.weight, lookup_before)
    assert all(p.grad is None for p in model.parameters()) and not opt._arrivals and not opt._micro
    for seed in range(10, 10 + 2 * accumulate):  # two more windows without the lookup train normally
        model.loss(seed, use_lookup=False).backward()
        opt.step()
        opt.zero_grad()
        reference.loss(seed, use_lookup=False).backward()
        if (seed + 1) % accumulate == 0:
            plain.step()
            plain.zero_grad()
    for a, b in zip(model.dense.parameters(), reference.dense.parameters()):
        assert torch.equal(a, b)

# -- checkpoints inside a window --------------------------------------------------------------------
def real_backward(model, batch):
    loss_of(model, batch, 4).backward()


@pytest.mark.parametrize("form", ["step-every-backward", "step-per-window"])
@pytest.mark.parametrize("name", ["galore", "torch-adamw"])
def test_checkpoint_inside_a_window_resumes_exactly(name, form, tmp_path):
    # 4 windows of 4 real micro-batches, gap 2 (refresh and low-rank windows); the checkpoint is
    # taken after 6 micro-batches: inside the second window, with low-rank sums, full sums in .grad
    # and (step-per-window) two backward passes that no step() has taken yet.
    projection, factory = FACTORIES[name]
    batches = micro_batches(16)

    def run(model, opt, part, start):
        for j, batch in enumerate(part, start):
            real_backward(model, batch)
            if form == "step-every-backward" or j % 4 == 3:
                opt.step()
                opt.zero_grad()

    ref_model, ref_groups = model_and_groups(**projection)
    run(ref_model, layerwise(ref_model, factory, accumulate=4, groups=ref_groups), batches, 0)
    model, groups = model_and_groups(**projection)
    opt = layerwise(model, factory, accumulate=4, groups=groups)
    run(model, opt, batches[:6], 0)
    assert any(p.grad is not None for p in model.parameters())  # a partial window is pending
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, tmp_path / "ck.pt")
    blob = torch.load(tmp_path / "ck.pt", weights_only=True)
    model2, groups2 = model_and_groups(**projection)
    model2.load_state_dict(blob["model"])
    opt2 = layerwise(model2, factory, accumulate=4, groups=groups2)
    opt2.load_state_dict(blob["opt"])
    run(model2, opt2, batches[6:], 6)
    for a, b in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_a_nan_pending_in_a_saved_window_is_still_refused_after_resume():
    projection, factory = TEACHER_FACTORIES["galore"]
    model, groups = model_and_groups(**projection)
    window = [list(micro) for micro in teacher_gradients(model, windows=1)[0]]
    window[0][0] = window[0][0].clone()
    window[0][0][0, 0] = float("inf")
    opt = layerwise(model, factory, accumulate=4, groups=groups)
    for micro in window[:2]:
        teacher_backward(model, micro)  # low-rank or full: the projected sum no longer shows the inf
    saved = opt.state_dict()
    model2, groups2 = model_and_groups(**projection)
    opt2 = layerwise(model2, factory, accumulate=4, groups=groups2)
    opt2.load_state_dict(saved)
    for micro in window[2:]:
        teacher_backward(model2, micro)
    with pytest.raises(FloatingPointError, match="^the gradient of 0.weight holds inf or NaN"):
        opt2.step()


# -- loaded state is checked against what it is loaded into -----------------------------------------
def other_mlp(hidden=20, **projection):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10),
                                torch.nn.Tanh(), torch.nn.Linear(10, 3))
    projected = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in projected)]
    return model, [{"params": projected, **projection}, {"params": rest}]


def saved_mid_window(name="galore", **projection):
    projection = projection or FACTORIES[name][0]
    model, groups = model_and_groups(**projection)
    opt = layerwise(model, FACTORIES[name][1], accumulate=2, groups=groups)
    for batch in micro_batches(3):  # window 1 done, window 2 half: low-rank sums pending
        real_backward(model, batch)
        opt.step()
    return opt.state_dict()


def refused(opt, saved, pattern):
    before = opt.state_dict()
    with pytest.raises(ValueError, match=pattern) as err:
        opt.load_state_dict(saved)
    assert "\n" not in str(err.value)
    after = opt.state_dict()  # nothing was replaced
    assert after["micro"] == before["micro"] and after["accum"].keys() == before["accum"].keys()
    assert str(after["optimizer"]) == str(before["optimizer"])


@pytest.mark.parametrize("name", ["galore", "torch-adamw"])
def test_state_of_another_model_is_refused_naming_the_parameter(name):
    saved = saved_mid_window(name)
    model, groups = other_mlp(**FACTORIES[name][0])
    opt = layerwise(model, FACTORIES[name][1], accumulate=2, groups=groups)
    refused(opt, saved, r"^the saved layer-wise state has shape \(24, 12\) for 0.weight, which here has shape \(20, 12\)$")


def test_state_with_another_parameter_count_is_refused():
    saved = saved_mid_window()
    model, groups = model_and_groups(rank=3)
    groups[1]["params"] = groups[1]["params"][:-1]
    model[4].bias.requires_grad_(False)
    opt = layerwise(model, FACTORIES["galore"][1], accumulate=2, groups=groups)
    refused(opt, saved, r"^the saved layer-wise state holds 6 parameters, this optimizer 5$")


def test_low_rank_sums_of_another_rank_are_refused():
    saved = saved_mid_window(rank=3)
    model, groups = model_and_groups(rank=2)
    opt = layerwise(model, FACTORIES["galore"][1], accumulate=2, groups=groups)
    refused(opt, saved, r"^the saved low-rank window sum of 0.weight has shape \(24, 3\), but its group here "
                        r"implies \(24, 2\)$")


def test_bad_positions_indices_and_old_mid_window_states_are_refused():
    model, groups = model_and_groups(rank=3)
    opt = layerwise(model, FACTORIES["galore"][1], accumulate=2, groups=groups)
    saved = saved_mid_window()
    refused(opt, {**saved, "micro": 2}, r"^the saved micro-batch position must be an integer in \[0, 2\), got 2$")
    refused(opt, {**saved, "grads": {6: torch.zeros(3)}},
            r"^the saved 'grads' names parameter index 6, but this optimizer has 6 parameters$")
    refused(opt, {**saved, "grads": {5: torch.zeros(4)}},
            r"^the saved window gradient of 4.bias has shape \(4,\), the parameter \(3,\)$")
    old = {k: saved[k] for k in ("optimizer", "micro", "accumulate", "accum")}  # the format before the window was saved
    refused(opt, old, r"^this layer-wise state was saved inside an accumulation window by a version that did not")
    fresh_model, fresh_groups = model_and_groups(rank=3)
    at_boundary = layerwise(fresh_model, FACTORIES["galore"][1], accumulate=2, groups=fresh_groups).state_dict()
    opt.load_state_dict({k: at_boundary[k] for k in ("optimizer", "micro", "accumulate", "accum")})  # still loads


def test_per_parameter_torch_states_without_shapes_are_checked_by_their_moments():
    saved = saved_mid_window("torch-adamw")
    saved = {k: v for k, v in saved.items() if k != "shapes"}
    model, groups = other_mlp()
    opt = layerwise(model, FACTORIES["torch-adamw"][1], accumulate=2, groups=groups)
    refused(opt, saved, r"^the saved window gradient of|^the saved exp_avg of 0.weight has shape \(24, 12\), the "
                        r"parameter \(20, 12\)$")



# -- state keyed by parameter name (issue 14) --------------------------------------------------------
# Written by data/make_positional_layerwise_states.py with the code of commit 1be3094 (keyed by position).
POSITIONAL = torch.load(Path(__file__).with_name("data") / "positional_layerwise_states.pt", weights_only=True)


def keyed_by_hand(old, order):
    """A position-keyed layer-wise state rewritten by name, by hand: position i meant ``order[i]``."""
    new = {**old, "shapes": {order[i]: shape for i, shape in enumerate(old["shapes"])}}
    for entry in ("accum", "grads", "arrivals"):
        new[entry] = {order[i]: value for i, value in old[entry].items()}
    for entry in ("window", "nonfinite"):
        new[entry] = [order[i] for i in old[entry]]
    if isinstance(old["optimizer"], list):
        new["optimizer"] = {order[i]: sd for i, sd in enumerate(old["optimizer"])}
    return new


def run_windows(model, opt, part, start, form):
    """Windows of 4 real micro-batches, driven by either supported loop."""
    for j, batch in enumerate(part, start):
        real_backward(model, batch)
        if form == "step-every-backward" or j % 4 == 3:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("fixture", list(POSITIONAL))
def test_a_state_keyed_by_position_by_the_previous_version_resumes_as_its_names_say(fixture):
    name, form = fixture.split("/")
    saved = POSITIONAL[fixture]
    by_name = keyed_by_hand(saved["opt"], saved["order"])
    runs = []
    for state in (saved["opt"], by_name):
        model, groups = model_and_groups(**FACTORIES[name][0])
        model.load_state_dict(saved["model"])
        opt = layerwise(model, FACTORIES[name][1], accumulate=4, groups=groups)
        opt.load_state_dict(copy.deepcopy(state))  # torch's load keeps the saved moments: no sharing between runs
        runs.append((model, opt))
    resaved = runs[0][1].state_dict()
    for entry in ("accum", "grads"):
        assert resaved[entry].keys() == by_name[entry].keys()
        assert all(torch.equal(resaved[entry][k], by_name[entry][k]) for k in by_name[entry])
    assert (resaved["arrivals"], resaved["window"], resaved["micro"]) == \
        (by_name["arrivals"], by_name["window"], by_name["micro"])
    for model, opt in runs:
        run_windows(model, opt, micro_batches(16)[6:], 6, form)
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["galore", "torch-adamw"])
def test_a_state_loads_by_name_into_parameters_listed_in_another_order(name):
    projection, factory = FACTORIES[name]
    batches = micro_batches(16)
    ref_model, ref_groups = model_and_groups(**projection)
    run_windows(ref_model, layerwise(ref_model, factory, accumulate=4, groups=ref_groups), batches, 0,
                "step-per-window")
    model, groups = model_and_groups(**projection)
    opt = layerwise(model, factory, accumulate=4, groups=groups)
    run_windows(model, opt, batches[:6], 0, "step-per-window")
    saved = opt.state_dict()
    model2, groups2 = model_and_groups(**projection)
    model2.load_state_dict(model.state_dict())
    reversed_groups = [{**group, "params": group["params"][::-1]} for group in groups2]  # every position moves
    opt2 = layerwise(model2, factory, accumulate=4, groups=reversed_groups)
    opt2.load_state_dict(saved)
    run_windows(model2, opt2, batches[6:], 6, "step-per-window")
    for a, b in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_a_state_of_other_parameter_names_is_refused_naming_them():
    saved = saved_mid_window()
    inner, groups = model_and_groups(rank=3)
    wrapped = torch.nn.Sequential()
    wrapped.add_module("body", inner)  # the same parameters, named body.0.weight, ...
    opt = layerwise(wrapped, FACTORIES["galore"][1], accumulate=2, groups=groups)
    refused(opt, saved, r"^the saved layer-wise state does not hold body.0.weight, body.2.weight, body.0.bias, "
                        r"body.2.bias and 2 more, which this optimizer has, and holds 0.weight, 2.weight, 0.bias, "
                        r"2.bias and 2 more, which this optimizer does not \(parameters are matched by their names "
                        r"in model.named_parameters\(\)\)$")


def test_a_parameter_saved_in_another_group_is_refused():
    def three_groups(model, rest):
        return [{"params": [model[0].weight, model[2].weight], "rank": 3}, {"params": rest[:2]}, {"params": rest[2:]}]

    model, _ = model_and_groups()
    opt = layerwise(model, FACTORIES["galore"][1], accumulate=2,
                    groups=three_groups(model, [model[0].bias, model[2].bias, model[4].weight, model[4].bias]))
    run_windows(model, opt, micro_batches(3), 0, "step-every-backward")
    model2, _ = model_and_groups()
    opt2 = layerwise(model2, FACTORIES["galore"][1], accumulate=2,
                     groups=three_groups(model2, [model2[0].bias, model2[4].bias, model2[4].weight, model2[2].bias]))
    refused(opt2, opt.state_dict(), r"^the saved layer-wise state has 4.bias in parameter group 2 and this "
                                    r"optimizer in group 1; build the parameter groups as they were when it was saved$")


def test_a_wrapper_without_names_keys_by_position_which_a_named_wrapper_reads_in_its_order():
    model, groups = model_and_groups(rank=3)
    unnamed = layerwise(groups, FACTORIES["galore"][1], accumulate=2)  # groups alone: no parameter names
    run_windows(model, unnamed, micro_batches(3), 0, "step-every-backward")
    saved = unnamed.state_dict()
    assert list(saved["shapes"]) == list(range(6)) and list(saved["accum"]) == [0]
    model2, groups2 = model_and_groups(rank=3)
    named = layerwise(model2, FACTORIES["galore"][1], accumulate=2, groups=groups2)
    named.load_state_dict(copy.deepcopy(saved))
    resaved = named.state_dict()
    assert list(resaved["accum"]) == ["0.weight"] and torch.equal(resaved["accum"]["0.weight"], saved["accum"][0])
    assert list(resaved["grads"]) == ["2.weight", "0.bias", "2.bias", "4.weight", "4.bias"]

def test_an_optimizer_that_steps_per_parameter_is_recognised_by_what_it_does():
    # the engine is driven per parameter because it has the methods, not because of its class
    class Driven(torch.optim.SGD):
        def __init__(self, params):
            super().__init__(params, lr=0.5)
            self.calls = []

        def accumulates_low_rank(self, p, group):
            return False

        def project_grad(self, p, group, grad):
            raise AssertionError("never asked: accumulates_low_rank is False")

        def low_rank_shape(self, p, group):
            return None

        def step_param(self, p, group, grad, low_rank_grad=None):
            self.calls.append(p)
            p.add_(grad, alpha=-group["lr"])

    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = layerwise(model, Driven)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert len(opt.optimizer.calls) == 2 and not opt._per_param  # one inner optimizer, stepped per parameter
    expected_grads = [torch.ones(2, 3), torch.ones(2)]
    for p, b, g in zip(model.parameters(), before, expected_grads):
        assert torch.equal(p, b - 0.5 * g)

# -- through Lightning ----------------------------------------------------------------------------
def lightning_fit(val_every, steps=6, ckpt_path=None, save_to=None, seed=0, first_batch=0):
    """CausalLMModule with layer-wise GaLore, 2 micro-batches per window, on a real Lightning Trainer.
    A plain DataLoader restarts its epoch on resume (while Lightning counts the epoch's batches on):
    ``first_batch`` rotates the data so that the resumed fit gets the batches the interrupted one had
    not seen (the project's data module positions its stream by itself)."""
    lightning = pytest.importorskip("lightning")
    from scrimp.training.module import CausalLMModule

    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for _ in range(8)]
    module = CausalLMModule("llama_tiny", {"name": "galore", "rank": 4, "update_proj_gap": 200, "lr": 1e-2,
                                           "layerwise": True, "accumulate": 2}, vocab_size=64, seed=seed,
                            grad_clip=None, total_steps=8)
    trainer = lightning.Trainer(max_steps=steps, val_check_interval=val_every, limit_val_batches=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, accelerator="cpu", deterministic=True, check_val_every_n_epoch=None)
    loader = torch.utils.data.DataLoader(data[first_batch:] + data[:first_batch], batch_size=None)
    trainer.fit(module, loader, torch.utils.data.DataLoader(data[:1], batch_size=None), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module


@pytest.mark.slow
def test_lightning_validation_and_resume_inside_a_window_keep_the_windows_sums(tmp_path):
    # Lightning clears gradients before validation and when fit starts; inside a window those are the
    # window's sums. A run validated after micro-batch 3 (inside window 2), saved there and resumed must
    # give the weights of the run that trains straight through and validates only at its end.
    reference = lightning_fit(val_every=6)
    lightning_fit(val_every=3, steps=3, save_to=tmp_path / "mid.ckpt")
    resumed = lightning_fit(val_every=3, ckpt_path=tmp_path / "mid.ckpt", first_batch=3)
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_the_modules_zero_grad_keeps_a_layerwise_windows_sums():
    # Lightning calls LightningModule.zero_grad() before validation and when fit starts (the slow test
    # above runs the real loop); inside a window the gradients are the window's sums and must stay.
    from scrimp.training.module import CausalLMModule

    module = CausalLMModule("llama_tiny", {"name": "galore", "rank": 4, "layerwise": True, "accumulate": 2},
                            vocab_size=64, grad_clip=None, total_steps=8)
    opt = module.build_optimizer()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    module(ids).backward()
    opt.step()
    pending = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    assert pending  # the plain parameters' sums of the first micro-batch
    module.zero_grad()
    for name, p in module.named_parameters():
        if name in pending:
            assert torch.equal(p.grad, pending[name])
    module(ids).backward()
    opt.step()  # the window closes: now zero_grad clears, as at any window boundary
    module.zero_grad()
    assert all(p.grad is None for p in module.parameters())
