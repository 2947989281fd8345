"""build(cfg, model) with the offload wrapper keys (``offload``, ``offload_path``, ``offload_prefetch``): the
built optimizer is an ``OffloadedOptimizer`` that steps exactly as the same config built without offload
(teacher-forced: the same gradients), and every combination it cannot drive is one sentence before anything
is built or written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from scrimp.optim import build
from scrimp.optim.offload import OffloadedOptimizer

OPTIM_CONF = Path(__file__).resolve().parents[2] / "conf" / "optim"
# The yamls that carry the offload keys; each is built from its file with a refresh inside the run.
OFFLOADABLE = ["galore", "galore8bit", "frugal", "frugal_lion", "frugal_sgd", "apollo", "apollo_mini",
               "natural_galore"]


def two_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48))


def config(name: str, **changes) -> dict:
    cfg = yaml.safe_load((OPTIM_CONF / f"{name}.yaml").read_text())
    for gap in ("update_proj_gap", "update_gap"):
        if gap in cfg:
            cfg[gap] = 2  # a refresh at step 2 of 4
    return {**cfg, **changes}


def train(model: torch.nn.Module, opt, grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", OFFLOADABLE)
@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_offloaded_build_steps_exactly_as_the_plain_build(name, tier, tmp_path):
    assert yaml.safe_load((OPTIM_CONF / f"{name}.yaml").read_text())["offload"] is None  # the yaml's default
    plain_model, offloaded_model = two_layers(), two_layers()
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in plain_model.parameters()] for _ in range(4)]
    path = str(tmp_path / "state") if tier == "disk" else None
    opt = build(config(name, offload=tier, offload_path=path), offloaded_model)
    assert isinstance(opt, OffloadedOptimizer) and opt.tier.name == tier
    train(plain_model, build(config(name), plain_model), grads)
    train(offloaded_model, opt, grads)
    for a, b in zip(plain_model.parameters(), offloaded_model.parameters()):
        assert torch.equal(a, b)
    opt.close()


def test_disk_tier_uses_the_path_and_the_prefetch_depth(tmp_path):
    opt = build(config("galore", offload="disk", offload_path=str(tmp_path / "state"), offload_prefetch=1),
                two_layers())
    assert opt.tier.prefetch == 1
    assert len(list((tmp_path / "state").glob("state_*.bin"))) == 4  # two weights, two biases
    opt.close()


@pytest.mark.parametrize("cfg,sentence", [
    ({"name": "galore", "offload": "ssd"}, "offload must be one of ['cpu', 'disk'] or null"),
    ({"name": "galore", "offload": "disk"}, "offload_path must name a directory for the state files with "
     "offload='disk', got None"),
    ({"name": "galore", "offload": "disk", "offload_path": ""},
     "offload_path must name a directory for the state files with offload='disk', got an empty path"),
    ({"name": "galore", "offload": "cpu", "offload_path": "PATH"}, "offload_path applies only with offload='disk'"),
    ({"name": "galore", "offload": "cpu", "offload_prefetch": 3},
     "offload_prefetch applies only with offload='disk' (offload='cpu' keeps the state in memory and reads nothing "
     "ahead), got 3"),
    ({"name": "galore", "offload_path": "PATH"}, "offload_path applies only with offload='disk' (offload is null)"),
    ({"name": "galore", "offload_prefetch": 1}, "offload_prefetch applies only with offload='disk'"),
    ({"name": "galore", "offload": "disk", "offload_path": "PATH", "offload_prefetch": -1},
     "offload_prefetch must be an integer >= 0"),
    ({"name": "adamw", "offload": "disk", "offload_path": "PATH"}, "offload='disk' does not apply to adamw"),
    ({"name": "adamw8bit", "offload": "cpu"}, "offload='cpu' does not apply to adamw8bit"),
    ({"name": "zo_sgd", "offload": "disk", "offload_path": "PATH"}, "offload='disk' does not apply to zo_sgd"),
    ({"name": "zo_adam", "offload": "cpu"}, "offload='cpu' does not apply to zo_adam"),
    ({"name": "galore", "layerwise": True, "offload": "disk", "offload_path": "PATH"},
     "offload='disk' does not work with layerwise=True"),
])
def test_unsupported_offload_settings_are_one_sentence_before_any_file(cfg, sentence, tmp_path):
    path = tmp_path / "state"
    cfg = {k: (str(path) if v == "PATH" else v) for k, v in cfg.items()}
    with pytest.raises(ValueError) as err:
        build({"rank": 8, **cfg} if cfg["name"] == "galore" else cfg, two_layers())
    message = str(err.value)
    assert message.startswith(sentence.split(" (")[0]) and sentence.replace("PATH", str(path)) in message
    assert "\n" not in message and message.count(". ") == 0
    assert not path.exists()
