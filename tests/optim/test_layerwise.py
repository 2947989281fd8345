"""Layer-wise updates with accumulation equal plain accumulation; impossible options raise."""

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


def test_groups_given_as_a_generator_are_read_once():
    model, groups = model_and_groups(rank=3)
    opt = layerwise(model, lambda gs: GaLoreAdamW(gs), groups=(g for g in groups))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
