"""The console scripts: ``scrimp-train``, ``scrimp-ttc`` and ``scrimp {train,ttc,report}``.

They run the same jobs as ``python -m experiments.train`` / ``python -m experiments.ttc`` in a clone
(those files are thin Hydra wrappers around :func:`train_job` and :func:`ttc_job`), but read their
configs from the package (``scrimp/conf`` in a wheel, built from the clone's top-level ``conf/``), so
they work from any directory. Add your own config folders with Hydra's search path, e.g.
``scrimp-train hydra.searchpath=[file:///path/to/my_conf] optim=my_optim``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scrimp._extras import MissingExtraError, require


def config_dir() -> Path:
    """The default configs: ``scrimp/conf`` inside an installed wheel, else the clone's ``conf/``.

    Both are the same files: the wheel's copy is built from ``conf/`` (pyproject ``package-dir``), so an
    editable install or a clone uses ``conf/`` directly and never a stale copy.
    """
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "train.yaml").is_file():
        return packaged
    clone = Path(__file__).resolve().parents[1] / "conf"
    if (clone / "train.yaml").is_file():
        return clone
    raise FileNotFoundError(f"scrimp's configs are in neither {packaged} nor {clone}: reinstall scrimp")


def objective(summary: dict, optimized_metric) -> float | list[float] | None:
    """The value(s) a sweeper optimizes, read from the run's flat metrics."""
    if not optimized_metric:
        return None
    names = [optimized_metric] if isinstance(optimized_metric, str) else list(optimized_metric)
    missing = [n for n in names if n not in summary["metrics"]]
    if missing:
        raise ValueError(f"optimized_metric {missing} not among the run's metrics {sorted(summary['metrics'])}")
    values = [float(summary["metrics"][n]) for n in names]
    return values[0] if isinstance(optimized_metric, str) else values


def _fail(err: Exception) -> None:
    """Bad input: one sentence and exit 1 in a single run; in a multirun the sweeper records it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.get().mode.name == "MULTIRUN":
        raise err
    raise SystemExit(f"error: {err}") from None


def train_job(cfg):
    """Train once from the composed config; returns ``optimized_metric`` for sweeps."""
    from scrimp.training.console import single_log_handler
    from scrimp.training.run import train

    single_log_handler()  # Hydra's root handler prints Lightning's lines; Lightning's own would repeat them
    try:
        summary = train(cfg)
    except ValueError as err:  # bad input: one sentence, raised before training starts
        _fail(err)
    return objective(summary, cfg.get("optimized_metric"))


def ttc_job(cfg) -> float | list[float]:
    """Test-time compute on recorded samples; returns the objective(s) for sweepers."""
    from hydra.core.hydra_config import HydraConfig

    from scrimp.ttc.run import run

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, out_dir)
    except (ValueError, FileNotFoundError) as err:  # bad input: one sentence, before any work
        _fail(err)
    print("\n".join(summary["table"]))
    if "objective" in summary:
        values = summary["objective"]
        return values[0] if len(values) == 1 else values
    return float(summary["accuracy"])


def _run_hydra(job, command: str, config_path: Path, config_name: str):
    """Run ``job`` under ``@hydra.main`` on ``config_path``; a missing extra ends in its one sentence."""
    needs = ("hydra", "lightning") if command == "train" else ("hydra",)
    try:
        for module in needs:
            require(module, f"scrimp-{command}")
    except MissingExtraError as err:
        raise SystemExit(f"error: {err}") from None
    import hydra

    return hydra.main(version_base="1.3", config_path=str(config_path), config_name=config_name)(job)()


def train_main() -> None:
    """``scrimp-train [overrides...]``: the Hydra training CLI on the packaged configs."""
    _run_hydra(train_job, "train", config_dir(), "train")


def ttc_main() -> None:
    """``scrimp-ttc [overrides...]``: the Hydra test-time-compute CLI on the packaged configs."""
    _run_hydra(ttc_job, "ttc", config_dir() / "ttc", "config")


def main(argv: list[str] | None = None) -> None:
    """``scrimp train|ttc [overrides...]`` or ``scrimp report FOLDER... [--plot PATH]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "ttc": ttc_main}
    if argv and argv[0] in commands:
        sys.argv = [f"{sys.argv[0]} {argv[0]}", *argv[1:]]  # Hydra parses sys.argv
        return commands[argv[0]]()
    parser = argparse.ArgumentParser(prog="scrimp", description="scrimp's commands: train, ttc, report.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train (Hydra overrides follow; see scrimp-train --help)")
    sub.add_parser("ttc", help="test-time compute (Hydra overrides follow; see scrimp-ttc --help)")
    from scrimp.report import add_report_arguments, report_command

    add_report_arguments(sub.add_parser("report", help="compare runs: a table of summary.json files and a plot"))
    args = parser.parse_args(argv)
    raise SystemExit(report_command(args))
