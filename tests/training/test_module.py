"""Tests of scrimp/training/module.py: the optimization mode follows the optimizer, layer-wise updates
through manual optimization equal Lightning's automatic path, and a non-finite loss never steps."""

from __future__ import annotations

import pytest
import torch

from scrimp.training.module import CausalLMModule, optimization_mode
from scrimp.training.run import train
from training.test_run import train_losses


class _Flags:
    def __init__(self, **flags):
        self.__dict__.update(flags)


def test_optimization_mode_is_read_from_the_optimizer():
    assert optimization_mode(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) == "automatic"
    assert optimization_mode(_Flags(needs_manual_optimization=True, is_zeroth_order=True)) == "zeroth_order"
    assert optimization_mode(_Flags(needs_manual_optimization=True, is_layerwise=True)) == "layerwise"
    assert optimization_mode(_Flags(needs_manual_optimization=True)) == "manual"


def test_module_picks_the_mode_from_the_built_optimizer():
    galore = CausalLMModule("llama_tiny", {"name": "galore", "rank": 8}, vocab_size=256)
    galore.build_optimizer()
    assert galore.automatic_optimization and galore.mode == "automatic"
    layerwise = CausalLMModule("llama_tiny", {"name": "galore", "rank": 8, "layerwise": True}, vocab_size=256,
                               grad_clip=None)
    layerwise.build_optimizer()
    assert not layerwise.automatic_optimization and layerwise.mode == "layerwise"
    zo = CausalLMModule("llama_tiny", {"name": "zo_sgd", "lr": 1e-6}, vocab_size=256)
    zo.build_optimizer()
    assert not zo.automatic_optimization and zo.mode == "zeroth_order"


def test_layerwise_clipping_is_refused_in_one_sentence():
    module = CausalLMModule("llama_tiny", {"name": "galore", "rank": 8, "layerwise": True}, vocab_size=256,
                            grad_clip=1.0)
    with pytest.raises(ValueError, match=r"^module.grad_clip must be null with a layer-wise optimizer"):
        module.build_optimizer()


def test_layerwise_manual_path_equals_automatic_path(small_cfg, tmp_path):
    # One projector (gap > steps): later SVDs of gradients that differ in the 7th digit may rotate
    # a near-degenerate subspace, which is sensitivity of the SVD, not of the optimization path.
    common = ["optim.rank=8", "optim.update_proj_gap=200", "module.grad_clip=null", "trainer.max_steps=4",
              "trainer.val_check_interval=4", "trainer.deterministic=true"]
    auto = train(small_cfg(*common, run_dir=tmp_path / "auto"))
    manual = train(small_cfg(*common, "optim.layerwise=true", run_dir=tmp_path / "layerwise"))
    assert manual["optimizer"]["mode"] == "layerwise" and auto["optimizer"]["mode"] == "automatic"
    a = torch.load(tmp_path / "auto" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "layerwise" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # Same math, different float order (per-parameter vs foreach Adam): Adam divides by sqrt(v), so
    # entries with near-zero gradients may differ by a small fraction of one lr step (lr = 1e-2).
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
    assert manual["metrics"]["val/loss"] == pytest.approx(auto["metrics"]["val/loss"], abs=1e-5)
    losses_auto, losses_manual = train_losses(tmp_path / "auto"), train_losses(tmp_path / "layerwise")
    assert sorted(losses_auto) == sorted(losses_manual) == [0, 1, 2, 3]
    assert all(losses_manual[s] == pytest.approx(losses_auto[s], abs=1e-5) for s in losses_auto)


def test_non_finite_loss_stops_before_the_weights():
    module = CausalLMModule("llama_tiny", {"name": "adamw"}, vocab_size=64)
    with pytest.raises(FloatingPointError, match="loss is nan; stopping before it reaches the weights"):
        module._check_finite(torch.tensor(float("nan")), "training")
