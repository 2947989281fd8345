"""Tests of experiments/train.py from the command line: one-sentence errors, the 2-process gloo DDP run
against a single process with the same global batch, and a `-m` multirun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training.helpers import SMALL, compose_train

from scrimp.training.run import train

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRIMP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_input_ends_with_one_sentence_and_no_traceback(tmp_path):
    proc = run_cli("model.name=llama_huge", f"run_dir={tmp_path}/run", cache=tmp_path / "cache")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.name 'llama_huge' is not a known model;")


def _losses(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_ddp_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # 7 validation blocks on 2 ranks: one rank's share is padded, and the padding must not count.
    common = [o for o in SMALL if not o.startswith(("data.batch_size", "data.val_blocks"))] + [
        "data.val_blocks=7", "trainer.max_steps=4", "trainer.val_check_interval=4", "optim.rank=8",
        "optim.update_proj_gap=2", "trainer.deterministic=true"]
    proc = run_cli("trainer=ddp_cpu", "data.batch_size=2", f"run_dir={tmp_path}/ddp", *common,
                   cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2
    assert ddp["ranks_identical_state"] is True  # GaLore projectors/moments equal on both ranks
    single = train(compose_train([*common, "data.batch_size=4", f"data.cache_dir={tmp_path / 'cache'}",
                                  f"run_dir={tmp_path}/single"]))
    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert sorted(ddp_losses) == sorted(single_losses) == [0, 1, 2, 3]
    # The runs differ only in the order fp32 sums the batch: per step, each gradient entry sums
    # global batch x block_size = 4 x 32 token terms, and a recursive sum of N terms carries a relative
    # error of at most (N - 1) u (Higham, Accuracy and Stability, Sec. 4.2). Adam divides each moment by
    # its own scale, so a relative change of the gradient is at most that relative change of the
    # update, except for entries near zero whose sign may flip: those carry almost no gradient, so
    # they move the loss only to second order. Four steps compound the bound.
    tokens, steps = 4 * 32, 4
    rel = steps * (tokens - 1) * 2.0**-24
    for step in range(4):
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=rel)
    assert ddp["metrics"]["val/loss"] == pytest.approx(single["metrics"]["val/loss"], rel=rel)
    # Weights are not compared entry by entry: Adam's first steps are nearly sign(g), so a gradient
    # entry near zero can flip sign under the different summation order of the all-reduce.


def test_multirun_over_optimizers(tmp_path):
    proc = run_cli("-m", "optim=adamw,frugal", *SMALL, "trainer.max_steps=2", "trainer.val_check_interval=2",
                   f"hydra.sweep.dir={tmp_path}/sweep", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text())["optimizer"]["name"]
             for i in range(2)]
    assert names == ["adamw", "frugal"]
