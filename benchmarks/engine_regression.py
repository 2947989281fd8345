# Run: flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/engine_regression.py --baseline 1be3094 --steps 60
"""Step time of this checkout against an earlier commit, side by side in one run, interleaved.

Two versions of one package cannot live in one interpreter, so each runs in its own worker process
(``PYTHONPATH`` = this checkout, or an export of ``--baseline`` made with ``git archive``). The
parent asks the workers for one step at a time, alternating which goes first, so a load change on
a shared machine hits both alike. Each worker is pinned to one thread and builds the same
optimizer on the same LLaMA-60M weight shapes (GaLore, Zhao et al., 2024, Table 8: d 512, 8 layers,
FFN 1376, rank 128; embeddings, head and norms plain AdamW) with the same seeded gradients. Only
non-refresh steps count (``update_proj_gap`` is set above the number of steps, so the one refresh
is the first step, which is left out).

The table prints each optimizer's median step for both versions and their ratio (goal: within 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from scrimp.optim import FrugalAdamW, GaLoreAdamW
d, layers, ffn, vocab, rank = 512, 8, 1376, 32000, 128
projected, plain = [], [(vocab, d), (vocab, d), (d,)]
for _ in range(layers):
    projected += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn)]
    plain += [(d,), (d,)]
gen = torch.Generator().manual_seed(0)
weights = [torch.randn(s, generator=gen) * 0.02 for s in projected + plain]
grads = [[torch.randn(s, generator=gen) * 1e-3 for s in projected + plain] for _ in range(2)]
k = len(projected)
name, gap = sys.argv[1], int(sys.argv[2])
if name == "galore":
    opt = GaLoreAdamW([{"params": weights[:k], "rank": rank, "update_proj_gap": gap, "scale": 0.25},
                       {"params": weights[k:]}], lr=1e-3)
else:
    opt = FrugalAdamW([{"params": weights[:k], "density": rank / d, "update_gap": gap},
                       {"params": weights[k:]}], lr=1e-3, proj_type="randk")
step = 0
for line in sys.stdin:
    for w, g in zip(weights, grads[step % 2]):
        w.grad = g
    start = time.perf_counter()
    opt.step()
    print(json.dumps(time.perf_counter() - start), flush=True)
    step += 1
"""


def export(commit: str, into: Path) -> Path:
    """``git archive`` of ``commit`` unpacked into ``into`` (the baseline's import root)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def start(root: Path, name: str, gap: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WORKER, name, str(gap)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=str(root))


def ask(worker: subprocess.Popen) -> float:
    worker.stdin.write("step\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker stopped (exit code {worker.wait()}); run it by hand to see why")
    return json.loads(line)


def compare(name: str, roots: dict[str, Path], steps: int) -> dict[str, float]:
    workers = {label: start(root, name, gap=steps + 10) for label, root in roots.items()}
    times: dict[str, list[float]] = {label: [] for label in workers}
    labels = list(workers)
    try:
        for t in range(steps):
            for label in (labels if t % 2 == 0 else labels[::-1]):
                times[label].append(ask(workers[label]))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return {label: 1e3 * statistics.median(ts[1:]) for label, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare against (e.g. 1be3094)")
    parser.add_argument("--steps", type=int, default=60, help="steps per optimizer and version (>= 3)")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error(f"--steps must be at least 3 (the first step is left out), got {args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        roots = {args.baseline: export(args.baseline, Path(tmp)), "this checkout": REPO}
        print(f"| optimizer (LLaMA-60M shapes, 1 thread) | {args.baseline} median ms | this checkout median ms "
              "| ratio |")
        print("|---|---:|---:|---:|")
        for name in ("galore", "frugal"):
            medians = compare(name, roots, args.steps)
            base, new = medians[args.baseline], medians["this checkout"]
            print(f"| {name} | {base:.1f} | {new:.1f} | {new / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
