"""The run comparison: the table that ends a ``-m`` multirun (Hydra callback) and ``scrimp report``.

The reference is each job's own summary.json, read here independently of scrimp.report: every number
in the table must equal the summary's value up to half a unit of the printed last digit (the table's
rounding, nothing else).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scrimp.cli import main as scrimp_main
from training.helpers import SMALL

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _table_rows(text: str) -> dict[str, list[str]]:
    """The table's body lines, keyed by the run label (first column); the header and rule are skipped."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run ")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith(("comparison:", "plot:")):
            break
        cells = _cells(line)
        rows[cells[0]] = cells
    return rows


def _check_row(cells: list[str], summary: dict, metric: str) -> None:
    optimizer, status, steps, value, state, ratio, tokens = cells[1:]
    assert optimizer == summary["optimizer"]["name"] and status == summary["status"]
    assert int(steps) == summary["steps"]
    assert float(value) == pytest.approx(summary["metrics"][metric], abs=0.5e-4)
    state_bytes = summary["memory_bytes"]["optimizer_state"]
    assert float(state.removesuffix(" MiB")) == pytest.approx(state_bytes / MIB, abs=0.5e-2)
    assert float(ratio) == pytest.approx(state_bytes / summary["adamw_state_bytes"], abs=0.5e-3)
    assert float(tokens) == pytest.approx(summary["metrics"]["train/tokens_per_s"], abs=0.5)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """A real two-job multirun (adamw, galore) of the tiny config; its folder and its stdout. It shares
    the training tests' token cache, so the tokenizer is trained once per session."""
    root = tmp_path_factory.mktemp("report")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "-m", "optim=adamw,galore", *SMALL,
                           f"data.cache_dir={cache_dir}",
                           "trainer.max_steps=2", "trainer.val_check_interval=2",
                           f"hydra.sweep.dir={root}/sweep"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "sweep", proc.stdout


def _summaries(sweep_dir: Path) -> dict[str, dict]:
    return {f"optim={json.loads((sweep_dir / str(i) / 'summary.json').read_text())['optimizer']['name']}":
            json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in range(2)}


def test_multirun_ends_with_a_table_across_its_jobs(sweep):
    sweep_dir, stdout = sweep
    summaries = _summaries(sweep_dir)
    rows = _table_rows(stdout)
    assert sorted(rows) == sorted(summaries) == ["optim=adamw", "optim=galore"]
    for label, summary in summaries.items():
        _check_row(rows[label], summary, "val/loss")  # the sweep's optimized_metric
    assert (sweep_dir / "comparison.txt").read_text().strip() in stdout
    # GaLore's point: less optimizer state than AdamW on the same model
    galore, adamw = (summaries[k]["memory_bytes"]["optimizer_state"] for k in ("optim=galore", "optim=adamw"))
    assert galore < adamw


def test_scrimp_report_prints_the_same_table_and_writes_a_plot(sweep, tmp_path, capsys):
    sweep_dir, stdout = sweep
    plot = tmp_path / "cmp.png"
    with pytest.raises(SystemExit) as end:
        scrimp_main(["report", str(sweep_dir), "--plot", str(plot), "--metric", "val/loss"])
    assert end.value.code == 0
    printed = capsys.readouterr().out
    assert _table_rows(printed) == _table_rows(stdout)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000

    # one run folder, another metric: the same numbers from the same summary
    with pytest.raises(SystemExit):
        scrimp_main(["report", str(sweep_dir / "1"), "--plot", str(plot), "--metric", "val/ppl"])
    (row,) = _table_rows(capsys.readouterr().out).values()
    summary = json.loads((sweep_dir / "1" / "summary.json").read_text())
    assert row[0].startswith("optim=galore ")  # a single run: all its overrides
    _check_row(row, summary, "val/ppl")


def test_a_metric_no_run_has_is_shown_as_missing(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit):
        scrimp_main(["report", str(sweep[0]), "--plot", str(tmp_path / "p.png"), "--metric", "val/nothing"])
    rows = _table_rows(capsys.readouterr().out)
    assert [cells[4] for cells in rows.values()] == ["n/a", "n/a"]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "absent", "does not exist or is not a folder"),
    (lambda tmp: tmp, "holds no summary.json"),
    (lambda tmp: (tmp / "run").mkdir() or (tmp / "run" / "summary.json").write_text("{not json") and tmp / "run",
     "is not a scrimp training summary"),
    (lambda tmp: (tmp / "run").mkdir() or (tmp / "run" / "summary.json").write_text('{"a": 1}') and tmp / "run",
     "is not a scrimp training summary"),
])
def test_bad_report_folders_end_with_one_sentence(make, message, tmp_path, capsys):
    folder = make(tmp_path)
    with pytest.raises(SystemExit) as end:
        scrimp_main(["report", str(folder), "--plot", str(tmp_path / "p.png")])
    assert end.value.code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: ") and message in out[0]
    assert not (tmp_path / "p.png").exists()


# -- loggers are _target_ configs (conf/logger/) ------------------------------------------------------
def test_logger_configs_are_instantiated_and_null_drops_one(small_cfg, tmp_path):
    from scrimp.training.run import train

    run_dir = tmp_path / "tb"
    train(small_cfg("logger=tensorboard", "logger.csv=null", "trainer.max_steps=2",
                    "trainer.val_check_interval=2", run_dir=run_dir))
    assert list((run_dir / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    assert not (run_dir / "csv").exists()


def test_a_logger_whose_package_is_missing_is_left_out_with_a_warning(small_cfg, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here; the fallback needs it absent")
    except ImportError:
        pass
    from lightning.pytorch.loggers import CSVLogger

    from scrimp.training.run import _loggers  # the trainer's loggers, without a training run

    with pytest.warns(UserWarning, match="logger.wandb is on but its package is not installed"):
        kept = _loggers(small_cfg("logger=wandb"), tmp_path)
    assert [type(x).__mro__[1] for x in kept] == [CSVLogger] and kept[0].save_dir == str(tmp_path)
    with pytest.warns(UserWarning, match="logger.wandb"):  # the only logger missing: CSV is the fallback
        (fallback,) = _loggers(small_cfg("logger=wandb", "logger.csv=null"), tmp_path)
    assert isinstance(fallback, CSVLogger) and fallback.log_dir == str(tmp_path / "csv" / "version_0")


@pytest.mark.parametrize("override, message", [
    ("logger.csv=abc", "logger.csv must be null or a mapping with a '_target_'"),
    ("+logger.mine={name: x}", "logger.mine must be null or a mapping with a '_target_'"),
])
def test_a_logger_that_is_not_a_target_config_is_refused_before_training(small_cfg, override, message, tmp_path):
    from scrimp.training.run import train

    with pytest.raises(ValueError, match=re.escape(message)):
        train(small_cfg(override, run_dir=tmp_path / "bad"))
    assert not (tmp_path / "bad" / "summary.json").exists()
