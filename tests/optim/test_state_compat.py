"""State dicts saved by the engine before it was composed of parts load and continue bitwise (issue 14).

``data/state_compat.pt`` was written by ``data/make_state_compat.py`` at commit 1be3094 (the
monolithic ``step_param``): weights and state dict after three steps, the next two steps'
gradients (regenerated from their seeds here), and the weights that old code reached after them.
"""

from pathlib import Path

import pytest
import torch

from scrimp.optim import FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, SubspaceAdamW

FIXTURES = torch.load(Path(__file__).with_name("data") / "state_compat.pt", weights_only=True)

# The constructors of make_state_compat.py: (projected-group size, constructor, projection keys).
MAKERS = {
    "galore": (2, lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.01), dict(rank=2, update_proj_gap=2)),
    "galore_rotate": (2, lambda g: GaLoreAdamW(g, lr=1e-2, moment_policy="rotate"), dict(rank=3, update_proj_gap=2)),
    "galore8bit": (1, lambda g: GaLoreAdamW8bit(g, lr=1e-2), dict(rank=32, update_proj_gap=2)),
    "frugal_svd": (2, lambda g: FrugalAdamW(g, lr=1e-2, update_gap=2, proj_type="svd"), dict(density=0.25)),
    "frugal_randk": (2, lambda g: FrugalAdamW(g, lr=1e-2, update_gap=2, proj_type="randk"), dict(density=0.25)),
    "frugal_blocks": (3, lambda g: FrugalAdamW(g, lr=1e-2, update_gap=2, proj_type="blocks"), dict(density=0.5)),
    "scaled_columns": (2, lambda g: SubspaceAdamW(g, lr=1e-2),
                       dict(rank=2, projector="columns", residual="scaled", update_proj_gap=2)),
}


def gradients(shapes, step):
    return [torch.randn(shape, generator=torch.Generator().manual_seed(100 * step + i)) for i, shape in enumerate(shapes)]


def test_every_fixture_has_a_maker():
    assert set(FIXTURES) == set(MAKERS)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_old_state_loads_and_continues_as_the_old_code_did(name):
    fixture = FIXTURES[name]
    split, make, projection = MAKERS[name]
    ps = [torch.nn.Parameter(w.clone()) for w in fixture["weights"]]
    opt = make([{"params": ps[:split], **projection}, {"params": ps[split:]}])
    opt.load_state_dict(fixture["state_dict"])
    for step in (3, 4):
        for p, g in zip(ps, gradients([p.shape for p in ps], step)):
            p.grad = g
        opt.step()
    for i, (p, expected) in enumerate(zip(ps, fixture["expected"])):
        assert torch.equal(p.detach(), expected), f"parameter {i}: {float((p.detach() - expected).abs().max()):.3e}"


def test_old_state_keys_are_the_new_ones():
    """The stores keep the key names of before (exp_avg, exp_avg_sq, their _q/_absmax 8-bit forms)."""
    fixture = FIXTURES["galore8bit"]
    split, make, projection = MAKERS["galore8bit"]
    ps = [torch.nn.Parameter(w.clone()) for w in fixture["weights"]]
    opt = make([{"params": ps[:split], **projection}, {"params": ps[split:]}])
    for p, g in zip(ps, gradients([p.shape for p in ps], 0)):
        p.grad = g
    opt.step()
    fresh = opt.state_dict()["state"]
    for pid, saved in fixture["state_dict"]["state"].items():
        assert set(fresh[pid]) == set(saved)
