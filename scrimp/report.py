"""Compare runs: one table (metric, optimizer-state bytes, tokens/s) across runs' ``summary.json`` files.

    scrimp report multirun/2026-12-06/10-00-00                  # every job of a sweep
    scrimp report outputs/a outputs/b --metric val/ppl --plot cmp.png

The same table ends every ``-m`` multirun of ``scrimp-train`` / ``python -m experiments.train``:
:class:`MultirunTable` is registered as a Hydra callback in ``conf/train.yaml``. Reading only the
summaries (never checkpoints or logs) keeps it cheap and lets it run on a laptop over copied folders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

try:  # Hydra calls every event on every callback, so the callback subclasses Hydra's no-op base
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # `scrimp report` itself needs no Hydra
    _HydraCallback = object

DEFAULT_METRIC = "val/loss"
COLUMNS = ("run", "optimizer", "status", "steps", "{metric}", "optimizer state", "state / AdamW", "tokens/s")


@dataclass(frozen=True)
class RunRow:
    """One run's line of the table, read from its summary.json."""

    label: str  # the run's folder (relative to the folder given)
    overrides: tuple[str, ...]  # the job's command-line overrides, when Hydra recorded them
    optimizer: str
    status: str
    steps: int
    metric: float
    state_bytes: float
    adamw_state_bytes: float
    tokens_per_s: float


def find_summaries(folders: list[str | Path]) -> list[Path]:
    """The summary.json of each run folder, or of every job under a sweep folder, in path order."""
    if not folders:
        raise ValueError("scrimp report needs at least one run or sweep folder")
    found: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ValueError(f"report folder {str(folder)!r} does not exist or is not a folder")
        here = [folder / "summary.json"] if (folder / "summary.json").is_file() else sorted(
            folder.rglob("summary.json"))
        if not here:
            raise ValueError(f"report folder {str(folder)!r} holds no summary.json (is it a finished run or sweep?)")
        found.extend(p for p in here if p not in found)
    return found


def _overrides(summary_path: Path) -> tuple[str, ...]:
    """The job's command-line overrides from Hydra's ``.hydra/overrides.yaml`` (a YAML list of strings)."""
    path = summary_path.parent / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ()
    return tuple(line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- "))


def _folder_label(summary_path: Path, root: Path | None) -> str:
    folder = summary_path.parent
    if root is not None and folder.is_relative_to(root) and folder != root:
        return str(folder.relative_to(root))
    return folder.name


def labels(rows: list[RunRow]) -> list[str]:
    """What tells the runs apart: the overrides not shared by every run (all of them for a single run),
    else the folder."""
    common = set.intersection(*(set(r.overrides) for r in rows)) if len(rows) > 1 else set()
    return [" ".join(o for o in r.overrides if o not in common) or r.label for r in rows]


def read_row(summary_path: Path, metric: str, root: Path | None = None) -> RunRow:
    """The table row of one run; a summary that is not scrimp's is one sentence naming the file."""
    try:
        summary = json.loads(summary_path.read_text())
        metrics = summary["metrics"]
        memory = summary["memory_bytes"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{summary_path} is not a scrimp training summary ({type(err).__name__}: {err})") from None
    nan = float("nan")
    return RunRow(label=_folder_label(summary_path, root), overrides=_overrides(summary_path),
                  optimizer=str(summary.get("optimizer", {}).get("name", "?")),
                  status=str(summary.get("status", "?")),
                  steps=int(summary.get("steps", 0)),
                  metric=float(metrics.get(metric, nan)),
                  state_bytes=float(memory.get("optimizer_state", nan)),
                  adamw_state_bytes=float(summary.get("adamw_state_bytes") or nan),
                  tokens_per_s=float(metrics.get("train/tokens_per_s", nan)))


def collect(folders: list[str | Path], metric: str = DEFAULT_METRIC) -> list[RunRow]:
    """Rows for every run under ``folders``; labels are relative to the folder given."""
    rows = []
    for folder in map(Path, folders):
        for path in find_summaries([folder]):
            rows.append(read_row(path, metric, root=folder))
    return rows


def _mib(n: float) -> str:
    return "n/a" if not math.isfinite(n) else f"{n / 2**20:.2f} MiB"


def _num(x: float, fmt: str) -> str:
    return "n/a" if not math.isfinite(x) else format(x, fmt)


def format_table(rows: list[RunRow], metric: str = DEFAULT_METRIC) -> str:
    """A plain-text table (no rich needed), one line per run, in the order given."""
    header = [c.format(metric=metric) for c in COLUMNS]
    body = [[label, r.optimizer, r.status, str(r.steps), _num(r.metric, ".4f"), _mib(r.state_bytes),
             _num(r.state_bytes / r.adamw_state_bytes, ".3f"), _num(r.tokens_per_s, ".0f")]
            for label, r in zip(labels(rows), rows)]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, body)])


def write_plot(rows: list[RunRow], path: Path, metric: str = DEFAULT_METRIC) -> Path:
    """The metric against optimizer-state memory, one labelled point per run (PNG, Agg backend)."""
    from scrimp._extras import require

    matplotlib = require("matplotlib", "scrimp report's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, r in zip(labels(rows), rows):
        ax.scatter(r.state_bytes / 2**20, r.metric)
        ax.annotate(label, (r.state_bytes / 2**20, r.metric), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs optimizer-state memory, {len(rows)} runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_report_arguments(parser) -> None:
    parser.add_argument("folders", nargs="+", help="run folders (with summary.json) or sweep folders")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"metric column and plot axis (default {DEFAULT_METRIC})")
    parser.add_argument("--plot", default="report.png", help="where to write the plot (default ./report.png)")


def report_command(args) -> int:
    """``scrimp report``: print the table, write the plot; bad input is one sentence and exit status 2."""
    try:
        rows = collect(args.folders, args.metric)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    print(format_table(rows, args.metric))
    print(f"plot: {write_plot(rows, Path(args.plot), args.metric).resolve()}")
    return 0


class MultirunTable(_HydraCallback):
    """Hydra callback: at the end of a ``-m`` multirun, print the table across its jobs and save it
    as ``comparison.txt`` in the sweep folder."""

    def __init__(self, metric: str | None = None, filename: str = "comparison.txt") -> None:
        self.metric = metric
        self.filename = filename

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        metric = self.metric or _metric_of(config)
        paths = sorted(sweep_dir.rglob("summary.json")) if sweep_dir.is_dir() else []
        if not paths:
            print(f"no finished jobs under {sweep_dir}: nothing to compare")
            return
        table = format_table([read_row(p, metric, root=sweep_dir) for p in paths], metric)
        (sweep_dir / self.filename).write_text(table + "\n")
        print(table)
        print(f"comparison: {(sweep_dir / self.filename).resolve()}")


def _metric_of(config) -> str:
    """The sweep's own metric: ``optimized_metric`` (its first entry for multi-objective studies)."""
    chosen = config.get("optimized_metric")
    if isinstance(chosen, str) and chosen:
        return chosen
    if chosen:
        return str(list(chosen)[0])
    return DEFAULT_METRIC
