"""Resume: the checkpoint's settings against the config, before setup; and what a run prints.

A rank-8 GaLore checkpoint (2 real steps on llama_tiny) is resumed with other settings: those that
change what the saved state means are refused naming both values, before the data or the model is
built; ``resume.allow_changed`` lets the user choose, and then the run truly trains with the new
value; the lr and the schedule may change and are then really used. The command-line runs check the
console: one line per log message, a progress bar that counts the run's steps, a message while the
tokenizer is trained.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.helpers import SMALL, compose_train

REPO = Path(__file__).resolve().parents[2]
COMMON = ["optim=galore", "optim.rank=8", "optim.update_proj_gap=2", "trainer.val_check_interval=2",
          "checkpoint.every_n_steps=0", "module.warmup_steps=0", "trainer.deterministic=true"]


@pytest.fixture(scope="module")
def rank8_checkpoint(tmp_path_factory, cache_dir) -> Path:
    from scrimp.training.run import train

    run_dir = tmp_path_factory.mktemp("rank8")
    train(compose_train([*SMALL, f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", *COMMON,
                         "trainer.max_steps=2"]))
    return run_dir / "checkpoints" / "last.ckpt"


def _nothing_built(monkeypatch):
    import scrimp.training.run as run

    def never(*args, **kwargs):
        raise AssertionError("built before the checkpoint was checked")

    monkeypatch.setattr(run, "build_datamodule", never)
    monkeypatch.setattr(run, "build_module", never)


@pytest.mark.parametrize("overrides,key,was,now", [
    (["optim.rank=16"], "optim.rank", "8", "16"),  # trained at rank 8 while summary.json said 16
    (["optim.update_proj_gap=5"], "optim.update_proj_gap", "2", "5"),
    (["optim.scale=0.5"], "optim.scale", "0.25", "0.5"),
    (["optim.projector=gram"], "optim.projector", "'svd'", "'gram'"),
    (["optim.weight_decay=0.1"], "optim.weight_decay", "0.0", "0.1"),
])
def test_a_changed_optimizer_setting_is_refused_naming_both_values_before_setup(
        rank8_checkpoint, small_cfg, tmp_path, monkeypatch, overrides, key, was, now):
    from scrimp.training.run import train
    from scrimp.training.validate import ConfigError

    _nothing_built(monkeypatch)
    with pytest.raises(ConfigError) as err:
        train(small_cfg(*COMMON, "trainer.max_steps=4", f"ckpt_path={rank8_checkpoint}", *overrides))
    message = str(err.value)
    assert f"was written with {key}={was} but the config gives {key}={now};" in message, message
    assert f"resume.allow_changed=[{key}]" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_another_optimizer_is_refused_before_setup(rank8_checkpoint, small_cfg, tmp_path, monkeypatch):
    from scrimp.training.run import train

    _nothing_built(monkeypatch)
    with pytest.raises(ValueError, match=r"was written with optimizer 'galore' but optim.name is 'adamw'; resume with "
                                         r"optim=galore, allow the change with resume.allow_changed=\[optim.name"):
        train(small_cfg(*(o for o in COMMON if not o.startswith("optim")), "optim=adamw", "trainer.max_steps=4",
                        f"ckpt_path={rank8_checkpoint}"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,message", [
    (["model.name=llama_60m"], r"holds a model with model.name='llama_tiny' but the config gives "
                               r"model.name='llama_60m'"),
    (["+model.overrides.num_hidden_layers=1"], r"holds a model with model.overrides.num_hidden_layers=None but the "
                                               r"config gives model.overrides.num_hidden_layers=1"),
])
def test_another_architecture_is_refused_before_setup(rank8_checkpoint, small_cfg, tmp_path, monkeypatch, overrides,
                                                      message):
    from scrimp.training.run import train

    _nothing_built(monkeypatch)
    with pytest.raises(ValueError, match=message):
        train(small_cfg(*COMMON, "trainer.max_steps=4", f"ckpt_path={rank8_checkpoint}", *overrides))
    assert not (tmp_path / "run").exists()


def test_another_vocabulary_is_refused_before_the_model_is_built(rank8_checkpoint, small_cfg, tmp_path, monkeypatch):
    # Was a size-mismatch traceback after setup. The tokenizer must be trained to know its size; the
    # model must not be built.
    import scrimp.training.run as run
    from scrimp.training.run import train

    monkeypatch.setattr(run, "build_module", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"holds a model with a vocabulary of 512 tokens but this run's tokenizer "
                                         r"has 384"):
        train(small_cfg(*COMMON, "data.vocab_size=384", "trainer.max_steps=4", f"ckpt_path={rank8_checkpoint}"))
    assert not (tmp_path / "run" / "csv").exists()


def test_settings_that_may_change_on_resume_pass(rank8_checkpoint, small_cfg):
    from scrimp.training.validate import check_resume, check_train_config

    for overrides in (["optim.lr=0.02"], ["module.warmup_steps=1", "module.min_lr_ratio=0.5"],
                      ["trainer.max_steps=8", "trainer.val_check_interval=4"], ["trainer=ddp_cpu"],
                      ["+optim.fused=false"]):
        plan = check_resume(check_train_config(small_cfg(*COMMON, "trainer.max_steps=4",
                                                         f"ckpt_path={rank8_checkpoint}", *overrides)))
        assert plan is not None and not plan.fresh_optimizer and plan.changed == [], overrides


def _projected_moment_shapes(ckpt_path: Path) -> tuple[set, set, int]:
    """Shapes of the projected groups' Adam moments, their ranks, and the checkpoint's step."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = ckpt["optimizer_states"][0]
    shapes = set()
    for group in state["param_groups"]:
        if group.get("rank"):
            for index in group["params"]:
                if "exp_avg" in state["state"].get(index, {}):
                    shapes.add(tuple(state["state"][index]["exp_avg"].shape))
    return shapes, {g.get("rank") for g in state["param_groups"] if g.get("rank")}, ckpt["global_step"]


def test_an_allowed_change_trains_with_the_new_value_and_records_it(rank8_checkpoint, small_cfg, tmp_path):
    from scrimp.training.run import train

    before, ranks, _ = _projected_moment_shapes(rank8_checkpoint)
    assert ranks == {8} and before and all(8 in s for s in before)
    summary = train(small_cfg(*COMMON, "trainer.max_steps=4", "optim.rank=16", "resume.allow_changed=[optim.rank]",
                              f"ckpt_path={rank8_checkpoint}"))
    after, ranks, step = _projected_moment_shapes(tmp_path / "run" / "checkpoints" / "last.ckpt")
    # llama_tiny's projected weights are 128 x 128 and 128 x 344: a rank-16 moment has 16 rows or columns
    assert ranks == {16} and after and all(16 in s and 8 not in s for s in after), after
    assert step == 4 and summary["steps"] == 4  # resumed at step 2, not restarted
    assert summary["config"]["optim"]["rank"] == 16


def _logged_lr(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    return {int(r["step"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}


def test_a_new_lr_on_resume_is_the_lr_used(rank8_checkpoint, small_cfg, tmp_path):
    # The scheduler's saved base lr used to overwrite the configured one: optim.lr=0.02 trained at 0.01.
    from scrimp.training.run import train
    from scrimp.training.schedule import cosine_with_warmup

    train(small_cfg(*COMMON, "trainer.max_steps=4", "optim.lr=0.02", f"ckpt_path={rank8_checkpoint}"))
    # The rows in order are optimizer steps 2 and 3 (the CSV's step column after a resume is not compared:
    # Lightning numbers it from its own restored counter). The lr is logged in float32.
    logged = [lr for _, lr in sorted(_logged_lr(tmp_path / "run").items())]
    expected = [0.02 * cosine_with_warmup(step, 0, 4, 0.1) for step in (2, 3)]
    assert logged == pytest.approx(expected, rel=2**-23)


# -- the console of a command-line run and its resume ------------------------------------------------------
def _cli(*args: str, cache: Path) -> str:
    env = {**os.environ, "SCRIMP_CACHE": str(cache), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_command_line_prints_each_log_line_once_and_counts_steps_across_a_resume(tmp_path):
    small = [o for o in SMALL if not o.startswith("trainer.enable_progress_bar")]
    common = [*small, "optim=adamw", "trainer.val_check_interval=3", "checkpoint.every_n_steps=0"]
    first = _cli(*common, "trainer.max_steps=3", f"run_dir={tmp_path}/run", cache=tmp_path / "cache")
    # Lightning's INFO lines reached the console twice: plain from Lightning's own handler, then Hydra's.
    assert len(re.findall(r"GPU available: False", first)) == 1, first
    assert "training a byte-level BPE tokenizer (vocab 512)" in first  # the first run's silent half-minute
    assert "tokenizing the train split" in first
    resumed = _cli(*common, "trainer.max_steps=5", f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt",
                   f"run_dir={tmp_path}/resumed", cache=tmp_path / "cache")
    assert len(re.findall(r"Restored all states from the checkpoint", resumed)) == 1, resumed
    assert "training a byte-level BPE tokenizer" not in resumed  # cached
    for output, steps in ((first, 3), (resumed, 5)):
        assert "Epoch 0/-2" not in output and "/-2" not in output
        bar = [line for line in output.splitlines() if line.startswith("Step ")]
        assert bar and re.search(rf"\b{steps}/{steps}\b", bar[-1]), bar  # was 5/2 after the resume
