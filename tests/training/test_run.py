"""Tests of scrimp/training/run.py: the job behind ``python -m experiments.train``, on compose()-built
configs (every optim/ choice, loss decrease, exact resume, summary.json, each bad input)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from scrimp.training.run import SUMMARY_KEYS, train
from training.helpers import CONF_DIR

OPTIM_CHOICES = sorted(p.stem for p in (CONF_DIR / "optim").glob("*.yaml"))
EXPECTED_MODE = {"zo_sgd": "zeroth_order", "zo_adam": "zeroth_order"}


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from the CSV log (Lightning logs step index = global_step - 1)."""
    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.parametrize("optim", OPTIM_CHOICES)
def test_entry_point_runs_every_optim_choice(small_cfg, tmp_path, optim):
    extra = ["optim.rank=8"] if optim.startswith("galore") else []
    cfg = small_cfg(f"optim={optim}", "trainer.max_steps=2", "trainer.val_check_interval=2", *extra)
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["optimizer"]["name"] == optim
    assert summary["optimizer"]["mode"] == EXPECTED_MODE.get(optim, "automatic")
    assert torch.isfinite(torch.tensor(summary["metrics"]["val/loss"]))
    assert (tmp_path / "run" / "summary.json").exists()


def test_summary_json_has_the_documented_keys(small_cfg, tmp_path):
    summary = train(small_cfg("optim=adamw", "trainer.max_steps=3", "trainer.val_check_interval=3"))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(on_disk) == list(SUMMARY_KEYS)
    for key in ("val/loss", "val/ppl", "train/loss", "train/tokens_per_s", "memory/params", "memory/grads",
                "memory/optimizer_state", "memory/peak_rss", "memory/live_tensors"):
        assert key in on_disk["metrics"], key
    params = sum(p.numel() * 4 for p in _tiny_model(summary).parameters())
    assert on_disk["memory_bytes"]["params"] == params
    assert on_disk["memory_bytes"]["optimizer_state"] == 2 * params + 4 * len(list(_tiny_model(summary).parameters()))
    assert on_disk["adamw_state_bytes"] == 2 * params
    assert on_disk["metrics"]["val/ppl"] == pytest.approx(torch.tensor(on_disk["metrics"]["val/loss"]).exp().item(),
                                                           rel=1e-5)
    assert on_disk["config"]["optim"]["name"] == "adamw" and "torch" in on_disk["versions"]
    assert on_disk["wall_time_s"] > 0 and Path(on_disk["checkpoint"]).exists()


def _tiny_model(summary):
    from scrimp.training.models import build_model

    return build_model("llama_tiny", vocab_size=summary["data"]["vocab_size"])


def test_loss_decreases_over_50_steps_on_stdlib(small_cfg, tmp_path):
    summary = train(small_cfg("trainer.max_steps=50", "trainer.val_check_interval=50", "optim.rank=16",
                              "optim.update_proj_gap=200"))
    losses = train_losses(tmp_path / "run")
    first = sum(losses[s] for s in range(5)) / 5
    last = sum(losses[s] for s in range(45, 50)) / 5
    assert last < first - 0.5, (first, last)
    assert summary["metrics"]["val/loss"] < 0.95 * torch.log(torch.tensor(512.0)).item()  # below uniform guessing


def test_resume_equals_no_interrupt(small_cfg, tmp_path):
    # GaLore with a projector refresh after the resume point (gap 2, staggered across layers).
    common = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.deterministic=true",
              "checkpoint.every_n_steps=3", "checkpoint.keep=-1", "optim.rank=8", "optim.update_proj_gap=2",
              "module.warmup_steps=2"]
    train(small_cfg(*common, run_dir=tmp_path / "full"))
    ckpt = tmp_path / "full" / "checkpoints" / "step000003.ckpt"
    assert ckpt.exists()
    resumed = train(small_cfg(*common, f"ckpt_path={ckpt}", run_dir=tmp_path / "resumed"))
    full, again = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert sorted(again) == [3, 4, 5]
    assert [again[s] for s in range(3, 6)] == [full[s] for s in range(3, 6)]  # exact, not approximate
    assert resumed["steps"] == 6
    full_state = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    resumed_state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


def test_resume_before_half_the_run_and_the_final_checkpoint(small_cfg, tmp_path):
    # Resumed at step 2 of 7: Lightning counts the resumed epoch's remaining batches from the
    # loader's length, so a loader that shortened itself ended the epoch early and replayed the
    # stream. 7 is no multiple of the checkpoint interval: last.ckpt must still hold step 7, and
    # the final validation (7 is no multiple of val_check_interval) must keep train/* metrics.
    common = ["trainer.max_steps=7", "trainer.val_check_interval=3", "trainer.deterministic=true",
              "checkpoint.every_n_steps=2", "checkpoint.keep=-1", "optim.rank=8", "optim.update_proj_gap=3"]
    full = train(small_cfg(*common, run_dir=tmp_path / "full"))
    resumed = train(small_cfg(*common, f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'step000002.ckpt'}",
                              run_dir=tmp_path / "resumed"))
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert sorted(b) == list(range(2, 7)) and [b[s] for s in range(2, 7)] == [a[s] for s in range(2, 7)]
    for summary, name in ((full, "full"), (resumed, "resumed")):
        assert summary["steps"] == 7 and "train/loss" in summary["metrics"] and "train/lr" in summary["metrics"]
        last = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
        assert last["global_step"] == 7 and last["scrimp"]["batches_seen"] == 7
    full_state = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    resumed_state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
    assert full["metrics"]["val/loss"] == resumed["metrics"]["val/loss"]


def test_resume_with_accumulation_writes_no_checkpoint_inside_a_window(small_cfg, tmp_path):
    common = ["trainer.max_steps=6", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=12",
              "trainer.deterministic=true", "checkpoint.every_n_steps=2", "checkpoint.keep=-1", "optim=adamw"]
    train(small_cfg(*common, run_dir=tmp_path / "full"))
    train(small_cfg(*common, f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'step000002.ckpt'}",
                    run_dir=tmp_path / "resumed"))
    for path in sorted((tmp_path / "resumed" / "checkpoints").glob("step*.ckpt")):
        saved = torch.load(path, weights_only=False)
        # every checkpoint sits at a window boundary: 2 micro-batches per optimizer step
        assert saved["scrimp"]["batches_seen"] == 2 * saved["global_step"], path.name
    assert not (tmp_path / "resumed" / "checkpoints" / "step000002.ckpt").exists()


def test_max_epochs_runs_each_epoch_once(small_cfg, tmp_path):
    # Each Lightning epoch is one pass over the loader, which continues the stream from the
    # module's batch counter: 2 epochs are 2 x (blocks // batch) steps, not 4 x (a replay).
    summary = train(small_cfg("trainer.max_steps=-1", "+trainer.max_epochs=2", "data.max_documents=6",
                              "trainer.val_check_interval=1000", "optim=adamw"))
    per_epoch = summary["data"]["blocks_train"] // 4
    assert per_epoch >= 2 and summary["steps"] == 2 * per_epoch
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["scrimp"]["batches_seen"] == 2 * per_epoch


@pytest.mark.parametrize("optim", ["adamw", "zo_sgd"])
def test_logged_lr_is_the_lr_the_step_used(small_cfg, tmp_path, optim):
    # Manual-optimization modes step the scheduler inside training_step; the log must still show
    # the lr of the step it belongs to, as automatic mode does.
    from scrimp.training.schedule import cosine_with_warmup

    train(small_cfg(f"optim={optim}", "optim.lr=1e-3", "trainer.max_steps=6", "module.warmup_steps=3",
                    "trainer.val_check_interval=6"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}
    assert sorted(logged) == list(range(6))
    for step, lr in logged.items():
        assert lr == pytest.approx(1e-3 * cosine_with_warmup(step, 3, 6, 0.1), rel=1e-6), step


# -- bad input: one sentence each, before training starts -------------------------------------------
def _assert_not_started(run_dir: Path):
    assert not (run_dir / "csv").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.name=sgdx"], r"^optim.name must be one of \[.*'galore'.*\], got 'sgdx'"),
        (["model.name=llama_huge"], r"^model.name 'llama_huge' is not a known model; choose one of .*llama_tiny"),
        (["data=text_files", "data.path=/nonexistent/corpus"], r"^data.path '/nonexistent/corpus' does not exist$"),
        (["optim.rank=128"], r"rank must be below min\(m, n\) = 128"),
        (["trainer=ddp_cpu", "optim=galore", "optim.layerwise=true", "module.grad_clip=null"],
         r"^optim.layerwise=true cannot run on 2 processes: .* use one process or optim.layerwise=false$"),
    ],
)
def test_bad_input_is_one_sentence_before_training(small_cfg, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        train(small_cfg(*overrides))
    assert "\n" not in str(err.value)
    _assert_not_started(tmp_path / "run")


def test_data_glob_matching_nothing(small_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"matches no data files"):
        train(small_cfg("data=text_files", f"data.path={tmp_path}/*.parquet"))
    _assert_not_started(tmp_path / "run")


def test_empty_corpus(small_cfg, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("")
    (tmp_path / "corpus" / "b.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"is empty: it has no text$"):
        train(small_cfg("data=text_files", f"data.path={tmp_path / 'corpus'}"))
    _assert_not_started(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_trainer_without_gpu(small_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"^trainer.accelerator='gpu' needs a CUDA GPU but .* use trainer=cpu"):
        train(small_cfg("trainer=gpu"))
    _assert_not_started(tmp_path / "run")


def test_checkpoint_from_a_different_optimizer(small_cfg, tmp_path):
    train(small_cfg("optim=adamw", "trainer.max_steps=1", "trainer.val_check_interval=1",
                    run_dir=tmp_path / "adamw"))
    ckpt = tmp_path / "adamw" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"was written with optimizer 'adamw' but optim.name is 'galore'; resume with"):
        train(small_cfg("optim=galore", f"ckpt_path={ckpt}"))
    _assert_not_started(tmp_path / "run")


def test_train_metrics_reach_the_logger_every_n_steps_and_at_the_last_step(small_cfg, tmp_path):
    # Lightning writes step metrics every log_every_n_steps optimizer steps; the module and the
    # throughput callback log only then and at the last step (whose values are the summary's).
    common = ["optim=adamw", "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.deterministic=true"]
    train(small_cfg(*common, run_dir=tmp_path / "every"))
    sparse = train(small_cfg(*common, "trainer.log_every_n_steps=4", run_dir=tmp_path / "sparse"))
    every, losses = train_losses(tmp_path / "every"), train_losses(tmp_path / "sparse")
    assert sorted(every) == list(range(6)) and losses == {3: every[3]}
    assert sparse["metrics"]["train/loss"] == pytest.approx(every[5], rel=1e-6)
    rows = list(csv.DictReader(open(tmp_path / "sparse" / "csv" / "version_0" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/tokens_per_s")] == [3]
    assert sparse["metrics"]["train/tokens_per_s"] > 0


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=-5", r"^trainer.max_steps must be a positive integer \(or -1: run by epochs\), got -5$"),
    ("trainer.max_steps=0", r"^trainer.max_steps must be a positive integer"),
    ("checkpoint.keep=-5", r"^checkpoint.keep must be an integer >= 0, or -1"),
    ("checkpoint.every_n_steps=-1", r"^checkpoint.every_n_steps must be an integer >= 0 \(0: only last.ckpt\)"),
    ("trainer.accumulate_grad_batches=0", r"^trainer.accumulate_grad_batches must be an integer >= 1"),
])
def test_step_counts_lightning_would_refuse_with_a_traceback_are_one_sentence(small_cfg, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(small_cfg(override))
    _assert_not_started(tmp_path / "run")
