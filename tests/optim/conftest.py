"""Fixtures shared by the optimizer tests (tests/optim and its subfolders)."""

from pathlib import Path

import pytest
import torch
import yaml

from scrimp.optim import build

OPTIM_CONF = Path(__file__).resolve().parents[2] / "conf" / "optim"


def build_from_config_and_train(config: str, steps: int = 3):
    """Build ``conf/optim/<config>.yaml`` for a two-layer model (64 -> 64 -> 48: rank 32 fits) and train it
    ``steps`` steps on one random batch; every parameter must stay finite and move. Returns (cfg, optimizer,
    projected groups: those with a density or a rank) for the caller to check the groups the config made
    (stepping does not change a group's settings)."""
    cfg = yaml.safe_load((OPTIM_CONF / f"{config}.yaml").read_text())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48))
    opt = build(cfg, model)
    X, Y = torch.randn(32, 64), torch.randn(32, 48)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    projected = [g for g in opt.param_groups if g.get("density") is not None or g.get("rank") is not None]
    return cfg, opt, projected


@pytest.fixture
def config_trainer():
    """``build_from_config_and_train``: a config of conf/optim built for a small model and trained a few steps."""
    return build_from_config_and_train
