"""build(cfg, model) by name, from dicts and Hydra configs, with clear errors."""

import pytest
import torch
from omegaconf import OmegaConf

from scrimp.optim import FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, LayerwiseOptimizer, build
from scrimp.training.models import build_model


@pytest.fixture(scope="module")
def tiny():
    # llama_tiny shrunk further: the test is about wiring, and CPU SVDs are the cost
    return build_model("llama_tiny", vocab_size=128, seed=0, hidden_size=48, intermediate_size=96,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)


def one_step(model, opt):
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    moved = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with torch.no_grad():  # restore the shared fixture
        for b, p in zip(before, model.parameters()):
            p.copy_(b)
    return moved


@pytest.mark.parametrize("cfg,cls", [
    ({"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}, torch.optim.AdamW),
    ({"name": "galore", "lr": 1e-2, "rank": 8, "update_proj_gap": 10, "scale": 0.25}, GaLoreAdamW),
    ({"name": "galore8bit", "rank": 8}, GaLoreAdamW8bit),
    ({"name": "frugal", "density": 0.25, "proj_type": "svd", "inactive_update_rule": "sign_sgd"}, FrugalAdamW),
])
def test_build_by_name_steps_every_parameter(tiny, cfg, cls):
    opt = build(OmegaConf.create(cfg), tiny)
    assert isinstance(opt, cls)
    assert not getattr(opt, "needs_manual_optimization", False)
    assert one_step(tiny, opt) == len(list(tiny.parameters()))


def test_build_adamw8bit(tiny):
    import bitsandbytes as bnb

    assert isinstance(build({"name": "adamw8bit", "lr": 1e-3, "betas": [0.9, 0.95]}, tiny), bnb.optim.AdamW8bit)


def test_build_layerwise_sets_the_manual_optimization_contract(tiny):
    opt = build({"name": "galore", "rank": 8, "layerwise": True, "accumulate": 1}, tiny)
    assert isinstance(opt, LayerwiseOptimizer)
    assert opt.needs_manual_optimization is True and opt.is_layerwise is True
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = tiny.model.layers[0].mlp.up_proj.weight.detach().clone()
    tiny(x, labels=x).loss.backward()  # the update runs inside backward
    assert not torch.equal(before, tiny.model.layers[0].mlp.up_proj.weight)
    opt.remove_hooks()
    with torch.no_grad():
        tiny.model.layers[0].mlp.up_proj.weight.copy_(before)


@pytest.mark.parametrize("cfg,message", [
    ({"name": "sgd"}, r"optimizer name must be one of \['adamw', 'adamw8bit', 'galore'"),
    ({"name": "galore", "rank": 8, "density": 0.5}, r"optimizer 'galore' does not take \['density'\]"),
    ({"name": "adamw", "rank": 4}, r"optimizer 'adamw' does not take \['rank'\]"),
    ({"name": "galore", "rank": 8, "layerwise": True, "clip_grad_norm": 1.0}, "clip_grad_norm is not possible"),
    ({"name": "galore", "rank": 8, "accumulate": 4}, "accumulate=4 applies only with layerwise=True"),
    ({"name": "galore", "rank": 48}, r"rank must be below min\(m, n\) = 48"),
    ({"name": "frugal", "density": 2.0}, r"density must be in \(0, 1\]"),
    ({"name": "galore", "rank": 8, "lr": -0.1}, "lr must be a finite number >= 0"),
])
def test_build_errors(tiny, cfg, message):
    with pytest.raises(ValueError, match=message):
        build(cfg, tiny)


def test_zeroth_order_names_resolve_lazily(tiny):
    zo = pytest.importorskip("scrimp.optim.zeroth_order")
    opt = build({"name": "zo_sgd", "lr": 1e-6}, tiny)
    assert isinstance(opt, zo.ZOSGD)
    assert opt.needs_manual_optimization and opt.is_zeroth_order


def test_zeroth_order_weight_decay_spares_biases_and_layer_norms_as_mezo_does():
    # MeZO's zo_update decays no parameter whose name holds "bias", "layer_norm" or "layernorm".
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4), "input_layernorm": torch.nn.LayerNorm(4)})
    opt = build({"name": "zo_sgd", "lr": 1e-3, "eps": 1e-3, "weight_decay": 0.1}, model)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())  # model order kept
    assert decays[id(named["proj.weight"])] == 0.1
    assert all(decays[id(named[n])] == 0.0 for n in ("proj.bias", "input_layernorm.weight", "input_layernorm.bias"))
    # without weight decay the parameters stay one list in model order (the order keys each perturbation)
    plain = build({"name": "zo_sgd", "lr": 1e-3, "eps": 1e-3}, model)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["params"] == list(model.parameters())
