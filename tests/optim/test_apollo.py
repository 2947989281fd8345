"""ApolloAdamW / ApolloMiniAdamW against the original apollo-torch, teacher-forced on a tiny model."""

import io
import math

import pytest
import torch

from scrimp.optim import build, layerwise
from scrimp.optim.apollo import ApolloAdamW, ApolloMiniAdamW, apollo_group
from scrimp.optim.subspace import SubspaceAdamW

DEFAULTS = dict(rank=4, update_proj_gap=200, scale=1.0, scale_type="channel", proj="random", proj_type="std",
                norm_growth_limit=1.01, seed=0)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 4))


def apollo_groups(model, **extra):
    projected = [model[0].weight, model[2].weight]  # (32, 16): right side; (12, 32): left side
    rest = [p for p in model.parameters() if all(p is not q for q in projected)]
    # The plain group first: apollo-torch seeds each projection with the parameter's position among all
    # parameters (here 5 and 6), which the parity test then checks.
    return [{"params": rest}, {"params": projected, "rank": 4, "proj": "random", "scale_type": "channel",
                               "scale": 4.0, "update_proj_gap": 5, "proj_type": "std", **extra}]


def teacher_forced(ref_model, ref_opt, our_model, our_opt, *, steps=12, lr, wd, seed=1):
    """Both optimizers get the reference model's gradients. apollo-torch decays after its update and ours
    before (torch AdamW order), so the reference runs with weight_decay=0 and the decay by hand first."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        with torch.no_grad():
            for p, q in zip(ref_model.parameters(), our_model.parameters()):
                q.grad = p.grad.clone()
                p.mul_(1 - lr * wd)
        ref_opt.step()
        our_opt.step()


def max_gap(a, b):
    return max((p.float() - q.float()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def train_steps(model, opt, steps, seed, accumulate=1):
    """``steps`` updates, each from ``accumulate`` micro-batches summed (one backward each, step() once per
    window: plain accumulation, and one of the loops ``scrimp.optim.layerwise`` accepts)."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x, y = torch.randn(64, 16, generator=g).to(dtype), torch.randn(64, 4, generator=g).to(dtype)
            (torch.nn.functional.mse_loss(model(x), y) / accumulate).backward()
        opt.step()


def test_groups_translate_apollo_torch_names():
    W = torch.nn.Parameter(torch.zeros(8, 20))
    group = apollo_group({"params": [W], "rank": 2, "scale": 128, "scale_type": "tensor"}, DEFAULTS)
    assert group["projector"] == "gaussian" and group["apollo_mode"] == "tensor" and group["output"] == "apollo"
    assert group["scale"] == pytest.approx(math.sqrt(128)) and group["rank"] == 2 and group["residual"] is None
    assert apollo_group({"params": [W], "scale": 3}, DEFAULTS) == {"params": [W], "scale": 3}  # plain AdamW
    assert apollo_group({"params": [W], "rank": 2, "proj": "svd"}, DEFAULTS)["projector"] == "svd"


@pytest.mark.parametrize("bad, word", [({"proj": "qr"}, "proj"), ({"scale_type": "row"}, "^scale_type must be"),
                                       ({"scale": -1}, "scale"), ({"norm_growth_limit": 0.5}, "norm_growth_limit"),
                                       ({"projector": "svd"}, "apollo-torch's names")])
def test_bad_group_settings_get_one_sentence(bad, word):
    with pytest.raises(ValueError, match=word):
        apollo_group({"params": [], "rank": 2, **bad}, DEFAULTS)


def test_bad_scale_type_is_named_as_the_caller_named_it():
    W = torch.nn.Parameter(torch.zeros(8, 20))
    with pytest.raises(ValueError, match="^scale_type must be one of"):
        ApolloAdamW([W], rank=2, scale_type="row")
    with pytest.raises(ValueError, match="^scale_type must be one of"):
        ApolloMiniAdamW([{"params": [W], "rank": 1, "scale_type": "row"}])
    # The engine's own spelling keeps the engine's name.
    with pytest.raises(ValueError, match="^apollo_mode must be one of"):
        SubspaceAdamW([{"params": [W], "rank": 2, "projector": "gaussian", "output": "apollo", "apollo_mode": "row"}])


@pytest.mark.parametrize("mini", [False, True])
def test_teacher_forced_parity_with_apollo_torch(mini):
    apollo_torch = pytest.importorskip("apollo_torch")
    lr, wd = 1e-2, 0.1
    extra = {"rank": 1, "scale_type": "tensor", "scale": 128.0} if mini else {}
    ref_model, our_model = mlp(), mlp()
    ref = apollo_torch.APOLLOAdamW(apollo_groups(ref_model, **extra), lr=lr, weight_decay=0.0)
    cls = ApolloMiniAdamW if mini else ApolloAdamW
    ours = cls(apollo_groups(our_model, **extra), lr=lr, weight_decay=wd)
    teacher_forced(ref_model, ref, our_model, ours, lr=lr, wd=wd)  # 12 steps, gap 5: refreshes at 5 and 10
    gap = max_gap(our_model, ref_model)
    print(f"\nApollo{'Mini' if mini else ''}AdamW vs apollo-torch: max weight gap {gap:.3e}")
    assert ours.state[our_model[0].weight]["proj_refresh"] == 2
    assert [ours.state[our_model[i].weight]["proj_seed"] for i in (0, 2)] == [5, 6]
    assert gap < 2e-6  # about one fp32 ulp of |W| <= 1 per step over 12 steps (12 * 1.2e-7)
    assert max_gap(our_model, mlp()) > 1e-2  # the parameters really moved


def test_mini_defaults_are_apollo_torch_readme_values():
    model = mlp()
    opt = ApolloMiniAdamW([{"params": [model[0].weight], "rank": 1}])
    group = opt.param_groups[0]
    assert group["apollo_mode"] == "tensor" and group["scale"] == pytest.approx(math.sqrt(128))
    assert opt.state[model[0].weight]["proj_seed"] == 1  # apollo-torch's numbering


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_state_dict_equals_no_interruption(dtype):
    def make(model):
        return ApolloAdamW(apollo_groups(model), lr=1e-2)

    straight = mlp().to(dtype)
    opt = make(straight)
    train_steps(straight, opt, 4, seed=1)
    train_steps(straight, opt, 4, seed=2)
    resumed = mlp().to(dtype)
    first = make(resumed)
    train_steps(resumed, first, 4, seed=1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = make(resumed)
    second.load_state_dict(torch.load(buffer, weights_only=True))  # tensors and numbers only
    for i in (0, 2):
        saved, loaded = first.state[resumed[i].weight]["limiter_norm"], second.state[resumed[i].weight]["limiter_norm"]
        # fp32 and unrounded also for bf16 weights (torch's own loader would cast it to the weight's dtype)
        assert loaded.dtype == torch.float32 and loaded.dim() == 0 and torch.equal(loaded, saved)
    train_steps(resumed, second, 4, seed=2)
    assert max_gap(straight, resumed) == 0.0
    assert max_gap(straight, mlp()) > 1e-2  # the parameters really moved


def test_group_added_later_equals_the_group_given_at_construction():
    # Lightning's finetuning callbacks add param groups after construction; apollo-torch's keys must still count.
    at_once, later = mlp(), mlp()
    together = ApolloAdamW(apollo_groups(at_once), lr=1e-2, weight_decay=0.1)
    plain, projected = apollo_groups(later)
    added = ApolloAdamW([plain], lr=1e-2, weight_decay=0.1)
    added.add_param_group(projected)
    settings = [{k: v for k, v in group.items() if k != "params"} for group in (together, added)
                for group in [group.param_groups[1]]]
    assert settings[0] == settings[1] and settings[1]["projector"] == "gaussian"
    train_steps(at_once, together, 8, seed=1)  # update_proj_gap 5: one refresh
    train_steps(later, added, 8, seed=1)
    assert [added.state[later[i].weight]["proj_seed"] for i in (0, 2)] == [5, 6]  # the count goes on
    assert max_gap(at_once, later) == 0.0
    assert max_gap(at_once, mlp()) > 1e-2


def test_group_added_later_without_rank_is_plain_adamw():
    model = mlp()
    opt = ApolloAdamW([model[0].weight], rank=4, lr=1e-2)
    opt.add_param_group([model[2].weight])  # a bare list of tensors, as torch accepts
    assert opt.param_groups[1].get("output") is None and "rank" not in opt.param_groups[1]
    with pytest.raises(ValueError, match="apollo-torch's names"):
        opt.add_param_group({"params": [model[4].weight], "rank": 2, "apollo_mode": "tensor"})


def hand_built_groups(model, rank):
    """What ``build``'s target_modules="all-linear" should select in ``mlp()``, written out."""
    return [{"params": [model[i].weight for i in (0, 2, 4)], "rank": rank},
            {"params": [model[i].bias for i in (0, 2, 4)]}]


# apollo: the group settings given; apollo_mini: build's and the class's defaults (rank 1, scale 128, tensor)
BUILD_CASES = [("apollo", ApolloAdamW, {"rank": 3, "scale": 4.0, "scale_type": "channel"}, 3),
               ("apollo_mini", ApolloMiniAdamW, {}, 1)]


@pytest.mark.parametrize("name, cls, settings, rank", BUILD_CASES)
def test_build_by_name_equals_the_class_built_by_hand(name, cls, settings, rank):
    common = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=3)
    built_model, hand_model = mlp(), mlp()
    built = build({"name": name, **common, **settings}, built_model)
    by_hand = cls(hand_built_groups(hand_model, rank), **common, **{k: v for k, v in settings.items() if k != "rank"})
    assert type(built) is cls
    train_steps(built_model, built, 7, seed=3)
    train_steps(hand_model, by_hand, 7, seed=3)
    assert max_gap(built_model, hand_model) == 0.0
    assert max_gap(built_model, mlp()) > 1e-2


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("name, cls, settings, rank", BUILD_CASES)
def test_layerwise_equals_plain_training(name, cls, settings, rank, accumulate):
    # APOLLO's output rule scales the full gradient, so layer-wise accumulation sums full gradients as autograd
    # does, and step() updates the window as plain training does: bitwise. With accumulate=1 each parameter
    # steps alone in its hook, and the plain group's biases take the one-tensor Adam path instead of step()'s
    # foreach ops, which round differently by an ulp; 7 steps of that stay far below 1e-6.
    cfg = {"name": name, "lr": 1e-2, "weight_decay": 0.1, "update_proj_gap": 3, **settings}
    plain_model, layerwise_model = mlp(), mlp()
    plain = build(cfg, plain_model)
    per_layer = build({**cfg, "layerwise": True, "accumulate": accumulate}, layerwise_model)
    assert isinstance(per_layer.optimizer, cls)
    train_steps(plain_model, plain, 7, seed=4, accumulate=accumulate)
    train_steps(layerwise_model, per_layer, 7, seed=4, accumulate=accumulate)
    gap = max_gap(plain_model, layerwise_model)
    assert gap == 0.0 if accumulate > 1 else gap < 1e-6
    assert max_gap(plain_model, mlp()) > 1e-2


def test_layerwise_wrapper_by_hand_equals_plain_training():
    plain_model, layerwise_model = mlp(), mlp()
    plain = ApolloAdamW(apollo_groups(plain_model), lr=1e-2)
    per_layer = layerwise(layerwise_model, lambda groups: ApolloAdamW(groups, lr=1e-2), accumulate=2,
                          groups=apollo_groups(layerwise_model))
    train_steps(plain_model, plain, 6, seed=5, accumulate=2)
    train_steps(layerwise_model, per_layer, 6, seed=5, accumulate=2)
    assert [per_layer.optimizer.state[layerwise_model[i].weight]["proj_seed"] for i in (0, 2)] == [5, 6]
    assert max_gap(plain_model, layerwise_model) == 0.0


@pytest.mark.parametrize("config, cls", [("apollo", ApolloAdamW), ("apollo_mini", ApolloMiniAdamW)])
def test_hydra_configs_build_their_class_and_train(config, cls, config_trainer):
    cfg, opt, _ = config_trainer(config)
    assert type(opt) is cls
    (group,) = [g for g in opt.param_groups if g.get("output") == "apollo"]
    assert group["rank"] == cfg["rank"] and group["apollo_mode"] == cfg["scale_type"]
    assert group["scale"] == pytest.approx(math.sqrt(cfg["scale"])) and group["projector"] == "gaussian"
    assert len(group["params"]) == 2 and group["norm_growth_limit"] == cfg["norm_growth_limit"]
