"""Tests of scrimp/training/module.py: the optimization mode follows the optimizer, layer-wise updates
through manual optimization equal Lightning's automatic path, and a non-finite loss never steps."""

from __future__ import annotations

import pytest
import torch

from scrimp.training.module import CausalLMModule, optimization_mode
from scrimp.training.run import train
from scrimp.training.schedule import WarmupCosineScheduler
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


def test_layerwise_under_ddp_is_refused_by_the_module_itself():
    # A library user's own Trainer, not experiments/train.py: the module refuses when its optimizers
    # are configured, which Lightning does in every rank before the first step.
    import lightning as L

    module = CausalLMModule("llama_tiny", {"name": "galore", "rank": 8, "layerwise": True}, vocab_size=256,
                            grad_clip=None, total_steps=10)
    module.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                               enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"^optim.layerwise=true cannot run on 2 processes: "):
        module.configure_optimizers()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False)
    assert module.configure_optimizers()["optimizer"] is module.build_optimizer()


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


class _NaNGradient(CausalLMModule):
    """A finite loss whose backward writes NaN into one gradient (an overflow in backward)."""

    def on_fit_start(self):
        self.model.lm_head.weight.register_hook(lambda g: g * float("nan"))


def test_non_finite_gradient_with_finite_loss_stops_before_the_weights():
    import lightning as L

    module = _NaNGradient("llama_tiny", {"name": "adamw"}, vocab_size=64, grad_clip=None)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    blocks = [{"input_ids": b} for b in torch.randint(0, 64, (2, 2, 16))]
    with pytest.raises(FloatingPointError, match="gradient of model.lm_head.weight holds inf or NaN"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(blocks, batch_size=None))
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


class _RecordsMode(CausalLMModule):
    def forward(self, input_ids):
        self.modes = getattr(self, "modes", []) + [self.training]
        return super().forward(input_ids)


def test_zeroth_order_probes_run_without_dropout_as_mezo_does():
    import lightning as L

    module = _RecordsMode("llama_tiny", {"name": "zo_sgd", "lr": 1e-3, "eps": 1e-3}, vocab_size=64, grad_clip=None,
                          model_overrides={"attention_dropout": 0.5})
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    blocks = [{"input_ids": b} for b in torch.randint(0, 64, (1, 2, 16))]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(blocks, batch_size=None))
    assert module.modes == [False, False]  # MeZO's zo_forward: model.eval() for both probes
    assert module.training  # and training mode is back afterwards


def test_nan_grad_clip_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="module.grad_clip must be null or a finite number >= 0, got nan"):
        CausalLMModule("llama_tiny", {"name": "adamw"}, vocab_size=64, grad_clip=float("nan"))


# -- zeroth-order path --------------------------------------------------------------------------------
class _NaNOnThirdBatch(CausalLMModule):
    """The module with a forward that returns a NaN loss on the third training batch (both ZO probes)."""

    def forward(self, input_ids):
        loss = super().forward(input_ids)
        return loss * float("nan") if self.batches_seen == 3 else loss


def test_zeroth_order_non_finite_loss_is_skipped_not_fatal(tmp_path):
    import lightning as L

    torch.manual_seed(0)
    blocks = torch.randint(0, 64, (6, 2, 16))
    batches = [{"input_ids": b} for b in blocks]
    module = _NaNOnThirdBatch("llama_tiny", {"name": "zo_sgd", "lr": 1e-3, "eps": 1e-3}, vocab_size=64,
                              grad_clip=None)
    reference = CausalLMModule("llama_tiny", {"name": "zo_sgd", "lr": 1e-3, "eps": 1e-3}, vocab_size=64,
                               grad_clip=None)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert module.batches_seen == 6 and module._optimizer.skipped == 1 and module._optimizer.steps == 5
    assert float(trainer.callback_metrics["train/zo_skipped"]) == 1.0
    after = module.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the other 5 steps did update
    # Independent reference: the same optimizer driven by hand, skipping batch 3's update, same seeds.
    opt = reference.build_optimizer()
    schedule = WarmupCosineScheduler(opt, 0, 6, reference.hparams.min_lr_ratio)
    for i, batch in enumerate(batches):
        if i == 2:
            opt.draws += 1  # a skipped attempt still consumes its seeds
        else:
            opt.step(lambda b=batch: reference(b["input_ids"]))
        schedule.step()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_zeroth_order_resume_equals_no_interrupt_and_log_is_cleared(small_cfg, tmp_path):
    common = ["optim=zo_sgd", "optim.lr=1e-3", "optim.momentum=0.9", "trainer.max_steps=6",
              "trainer.val_check_interval=3", "trainer.deterministic=true", "checkpoint.every_n_steps=3",
              "checkpoint.keep=-1", "module.grad_clip=null"]
    train(small_cfg(*common, run_dir=tmp_path / "full"))
    ckpt = tmp_path / "full" / "checkpoints" / "step000003.ckpt"
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["zo"]
    # A full save holds the parameters: the (seed, scalar) log restarts, the momentum window is kept.
    assert saved["log"] == [] and saved["steps"] == 3 and len(saved["window"]) == 3
    resumed = train(small_cfg(*common, f"ckpt_path={ckpt}", run_dir=tmp_path / "resumed"))
    full, again = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert sorted(again) == [3, 4, 5] and resumed["steps"] == 6
    assert [again[s] for s in range(3, 6)] == [full[s] for s in range(3, 6)]  # exact, not approximate
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["optimizer_states"][0]["zo"]["log"] == [] and a["optimizer_states"][0]["zo"]["steps"] == 6


def test_gradient_check_reads_fp16_norms_safely_and_leaves_fp16_amp_to_its_scaler():
    from types import SimpleNamespace

    module = CausalLMModule("llama_tiny", {"name": "adamw"}, vocab_size=64).half()  # as precision="16-true"
    for p in module.parameters():
        p.grad = torch.full_like(p, 1e3)  # finite, but an fp16 L2 norm would overflow
    module.on_before_optimizer_step(None)
    module.model.lm_head.weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="gradient of model.lm_head.weight holds inf or NaN"):
        module.on_before_optimizer_step(None)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))  # fp16-mixed: its job
    module.on_before_optimizer_step(None)


def test_gradient_check_is_the_libraries_exact_rule_with_no_false_alarm_from_huge_finite_gradients():
    # The module uses finite_guard's verdict (a sum per gradient off CUDA): finite gradients whose
    # fp32 sum overflows must pass, as torch.isfinite says (the brute-force reference), not be
    # refused as "another rank's" non-finite values; one inf among them is refused, naming it.
    module = CausalLMModule("llama_tiny", {"name": "adamw"}, vocab_size=64)
    for p in module.parameters():
        p.grad = torch.full_like(p, 1e37)  # finite; 64 or more of them sum past the fp32 maximum
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    module.on_before_optimizer_step(None)
    module.model.model.norm.weight.grad[3] = float("-inf")
    with pytest.raises(FloatingPointError, match="^the gradient of model.model.norm.weight holds inf or NaN although "
                                                 "the loss is finite"):
        module.on_before_optimizer_step(None)


def test_a_nan_loss_stops_the_automatic_path_before_its_step():
    import lightning as L

    def fit(module, steps):
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        blocks = [{"input_ids": b} for b in torch.randint(0, 64, (4, 2, 16), generator=torch.Generator().manual_seed(0))]
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(blocks, batch_size=None))

    failing = _NaNOnThirdBatch("llama_tiny", {"name": "adamw"}, vocab_size=64, grad_clip=None, total_steps=4)
    with pytest.raises(FloatingPointError, match="the training loss is nan; stopping before it reaches the weights"):
        fit(failing, 4)
    reference = CausalLMModule("llama_tiny", {"name": "adamw"}, vocab_size=64, grad_clip=None, total_steps=4)
    fit(reference, 2)  # the two steps before the NaN batch
    for key, value in reference.state_dict().items():
        assert torch.equal(value, failing.state_dict()[key]), key


def test_a_loss_left_from_a_fit_stopped_mid_window_does_not_fail_the_next_fit():
    module = CausalLMModule("llama_tiny", {"name": "adamw"}, vocab_size=64)
    module._worst_loss = torch.tensor(float("nan"))  # as a fit stopped inside an accumulation window leaves it
    module.on_train_start()
    module.on_before_optimizer_step(None)  # no gradients, no pending loss: nothing to refuse


_DDP_INF_ON_ONE_RANK = '''
import sys, torch, lightning as L
from scrimp.training.module import CausalLMModule

class M(CausalLMModule):
    def forward(self, input_ids):
        loss = super().forward(input_ids)
        # rank 1 alone sees an infinite loss whose gradients stay finite
        return loss + float("inf") if self.global_rank == 1 and self.batches_seen == 2 else loss

blocks = [{"input_ids": b} for b in torch.randint(0, 64, (8, 2, 16), generator=torch.Generator().manual_seed(0))]
module = M("llama_tiny", {"name": "adamw"}, vocab_size=64, grad_clip=None, total_steps=4)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
try:
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(blocks, batch_size=None))
    outcome = "finished"
except FloatingPointError as err:
    outcome = f"stopped: {err}"
# one file per rank: two processes printing to one stdout may interleave their lines
with open(f"rank{trainer.global_rank}.txt", "w") as out:
    out.write(f"rank {trainer.global_rank}: {outcome}")
'''


def test_ddp_ranks_stop_together_when_one_ranks_loss_alone_is_infinite(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_inf.py"
    script.write_text(_DDP_INF_ON_ONE_RANK)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [(tmp_path / f"rank{rank}.txt").read_text() if (tmp_path / f"rank{rank}.txt").exists() else ""
             for rank in (0, 1)]
    assert all(lines), done.stdout + done.stderr[-2000:]
    assert lines[0].startswith("rank 0: stopped: another rank's training loss")
    assert lines[1].startswith("rank 1: stopped: the training loss is inf")
