"""Table and plot of a ``paper_scripts/galore_table2.sh`` run: validation perplexity vs optimizer state.

    .venv/bin/python paper_scripts/galore_table2_report.py results/galore_table2

Reads ``<out>/runs/<optimizer>/summary.json`` (written by ``scrimp.training.run.train``) for every
optimizer present and writes ``<out>/table.md`` (the GaLore paper's Table 2 columns, Zhao et al. 2024:
validation perplexity and optimizer-state memory, here measured exactly from ``optimizer.state``) and
``<out>/plot.png`` (perplexity against optimizer-state MiB, one point per optimizer).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ORDER = ("adamw", "galore", "frugal")


def load_rows(out: Path) -> list[dict]:
    """One row per run found under ``out/runs``: optimizer, model, steps, val ppl, state bytes."""
    rows = []
    names = sorted((p.name for p in (out / "runs").iterdir() if (p / "summary.json").is_file()),
                   key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    if not names:
        raise ValueError(f"no runs/<optimizer>/summary.json under {str(out)!r}; run galore_table2.sh first")
    for name in names:
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        rows.append({
            "optimizer": name,
            "model": summary["config"]["model"]["name"],
            "steps": summary["steps"],
            "val_ppl": summary["metrics"]["val/ppl"],
            "state_bytes": summary["memory_bytes"]["optimizer_state"],
            "adamw_state_bytes": summary["adamw_state_bytes"],
            "tokens_per_s": summary["metrics"].get("train/tokens_per_s", float("nan")),
            "data": {k: summary["config"]["data"].get(k)
                     for k in ("source", "max_documents", "vocab_size", "block_size", "batch_size")},
            "accelerator": summary["config"]["trainer"].get("accelerator"),
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table; state also as a fraction of what AdamW holds for the same model."""
    first = rows[0]
    data = ", ".join(f"{k}={v}" for k, v in first["data"].items() if v is not None)
    lines = [f"Settings: {first['model']}, {first['steps']} steps, data {data}, accelerator "
             f"{first['accelerator']}. A reduced-size run, not the paper's setting.", "",
             "| optimizer | model | steps | val perplexity | optimizer state (MiB) | vs AdamW state | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['model']} | {r['steps']} | {r['val_ppl']:.2f} "
                     f"| {r['state_bytes'] / 2**20:.2f} | {r['state_bytes'] / r['adamw_state_bytes']:.2f}x "
                     f"| {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Validation perplexity against optimizer-state MiB, one labelled point per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for r in rows:
        x, y = r["state_bytes"] / 2**20, r["val_ppl"]
        ax.scatter([x], [y])
        ax.annotate(r["optimizer"], (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{rows[0]['model']}, {rows[0]['steps']} steps")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(out: str) -> None:
    """Write ``table.md`` and ``plot.png`` into ``out`` from the runs under ``out/runs``."""
    out_dir = Path(out)
    rows = load_rows(out_dir)
    tmp = out_dir / ".table.md.tmp"
    tmp.write_text(markdown_table(rows))
    os.replace(tmp, out_dir / "table.md")
    plot(rows, out_dir / "plot.png")
    print(markdown_table(rows))
    print(f"wrote {out_dir / 'table.md'} and {out_dir / 'plot.png'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: galore_table2_report.py OUT_DIR (e.g. results/galore_table2)")
    main(sys.argv[1])
