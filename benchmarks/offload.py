# Run: flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/offload.py --steps 10
"""Optimizer-state offload on the CPU (issue 15): step time, resident optimizer bytes and disk bandwidth of
``OffloadedOptimizer`` against the same optimizer in RAM, side by side in one run.

Setup: the LLaMA-60M weight shapes of the GaLore paper (Zhao et al., 2024, Table 8; d 512, 8 blocks,
FFN 1376, vocab 32000, rank 128) as bare tensors with fixed Gaussian gradients (``optim_step.py``'s
``llama_shapes``): only the optimizer step runs. Optimizers: scrimp GaLoreAdamW, FrugalAdamW (RandK,
rank-many state entries) and AdamW as ``SubspaceAdamW`` with no projected group (torch's AdamW cannot be
wrapped), each in RAM, with ``tier="cpu"`` and with ``tier="disk"`` (files under ``--dir``, ``--prefetch``
states read ahead, page cache I/O: the tier has no O_DIRECT path yet).

- **Step time**: all nine optimizers live at once and step in rotating round-robin order, so a load change
  on the shared machine hits each alike; the median over ``--steps`` steps after one warm-up step (which
  holds every projector refresh, stagger off, and the files' first touch). A disk-tier step is timed until its
  write-behind is flushed, so it is an upper bound: in training the last writes overlap the next backward.
- **Resident optimizer bytes**, measured with ``scrimp.profiling.track_live_bytes`` (the profiler's
  allocation events) around building each optimizer and taking 3 steps, the others idle: the peak above
  the parameters and gradients (step temporaries included) and what is still held after the steps.
- **Disk bandwidth**: the tier's reads and writes are timed inside the tier's I/O calls (the benchmark
  wraps ``tiers.read_into``/``write_from``), against the same disk's sequential bandwidth measured in this
  run with the same file sizes: write (page cache), write + fsync, read from the page cache, and read
  after ``posix_fadvise(DONTNEED)`` evicted the file (from the disk).

Goals (issue 15): disk-tier resident bytes <= (prefetch + 1) x the largest parameter's state; step time
<= 1.3x in RAM while the state fits the page cache; achieved bandwidth >= 70% of the disk's own.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optim_step import SIZES, llama_shapes  # noqa: E402  (the benchmarks folder is not a package)

from scrimp.optim import FrugalAdamW, GaLoreAdamW, SubspaceAdamW  # noqa: E402
from scrimp.optim.memory import state_bytes  # noqa: E402
from scrimp.optim.offload import OffloadedOptimizer  # noqa: E402
from scrimp.optim.offload import tiers as tier_module  # noqa: E402
from scrimp.profiling import live_tensor_bytes, track_live_bytes  # noqa: E402

TIERS = ("in RAM", "cpu", "disk")
MiB = 2**20


# -- the disk tier's own I/O, timed --------------------------------------------------------------------
class IoMeter:
    """Bytes and seconds spent inside the disk tier's ``read_into``/``write_from`` (any thread)."""

    def __init__(self) -> None:
        self.totals = {"read": [0, 0.0], "write": [0, 0.0]}
        self._lock = threading.Lock()

    def wrap(self, kind: str, function: Callable) -> Callable:
        def timed(fd, t, offset):
            start = time.perf_counter()
            function(fd, t, offset)
            with self._lock:
                self.totals[kind][0] += t.numel() * t.element_size()
                self.totals[kind][1] += time.perf_counter() - start
        return timed

    def install(self) -> None:
        tier_module.read_into = self.wrap("read", tier_module.read_into)
        tier_module.write_from = self.wrap("write", tier_module.write_from)

    def snapshot(self) -> dict[str, tuple[int, float]]:
        with self._lock:
            return {k: (v[0], v[1]) for k, v in self.totals.items()}


def sequential_bandwidth(directory: Path, sizes: list[int]) -> dict[str, float]:
    """MiB/s of writing (page cache), writing + fsync, reading warm and reading cold, one file per size."""
    seconds = dict.fromkeys(("write", "write+fsync", "read (page cache)", "read (disk)"), 0.0)
    for i, size in enumerate(sizes):
        buffer = torch.randn(size // 4 + 1).view(torch.uint8)[:size].numpy()
        path = directory / f"floor_{i}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for kind, seconds_taken in file_round_trip(fd, buffer).items():
                seconds[kind] += seconds_taken
        finally:
            os.close(fd)
            path.unlink()
    total = sum(sizes)
    return {k: total / s / MiB for k, s in seconds.items()}


def file_round_trip(fd: int, buffer) -> dict[str, float]:
    """Seconds of one write, one write + fsync, one warm read and one read after evicting the file's pages."""
    taken, start = {}, time.perf_counter()
    os.pwrite(fd, buffer, 0)
    taken["write"], start = time.perf_counter() - start, time.perf_counter()
    os.pwrite(fd, buffer, 0)
    os.fsync(fd)
    taken["write+fsync"], start = time.perf_counter() - start, time.perf_counter()
    os.preadv(fd, [buffer], 0)
    taken["read (page cache)"] = time.perf_counter() - start
    os.posix_fadvise(fd, 0, len(buffer), os.POSIX_FADV_DONTNEED)  # the pages are clean (fsynced): evicted
    start = time.perf_counter()
    os.preadv(fd, [buffer], 0)
    taken["read (disk)"] = time.perf_counter() - start
    return taken


# -- the optimizers --------------------------------------------------------------------------------
def inner_factories(rank: int, gap: int) -> dict[str, Callable]:
    """name -> factory(projected, plain) of the wrapped optimizer, at the optim_step benchmark's settings."""
    # stagger off: every projector refreshes in the untimed warm-up step, so each timed step is a plain one
    galore = dict(rank=rank, update_proj_gap=gap, scale=0.25, proj_type="std", stagger=False)
    return {
        "GaLoreAdamW": lambda a, b: GaLoreAdamW([{"params": a, **galore}, {"params": b}], lr=1e-3),
        "FrugalAdamW (randk)": lambda a, b: FrugalAdamW([{"params": a, "rank": rank}, {"params": b}], lr=1e-3,
                                                        weight_decay=0.0, update_gap=gap, proj_type="randk",
                                                        stagger=False),
        "AdamW (SubspaceAdamW, no projection)": lambda a, b: SubspaceAdamW([{"params": a + b}], lr=1e-3),
    }


def make(factory: Callable, tier: str, projected, plain, directory: Path, prefetch: int):
    inner = factory(projected, plain)
    if tier == "in RAM":
        return inner
    path = directory / f"state-{os.urandom(4).hex()}" if tier == "disk" else None
    return OffloadedOptimizer(inner, tier=tier, path=path, prefetch=prefetch)


def timed_step(opt, params, grads) -> float:
    for p, g in zip(params, grads):
        p.grad = g
    start = time.perf_counter()
    opt.step()
    if isinstance(opt, OffloadedOptimizer):
        opt.tier.flush()  # the write-behind belongs to this step's cost
    return time.perf_counter() - start


@dataclass
class Row:
    name: str
    tier: str
    times: list[float]
    io: dict[str, list[float]]
    peak: int = 0
    held: int = 0

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)


def run_interleaved(built: dict, params, grads, steps: int, meter: IoMeter) -> dict:
    """Every optimizer one step per round, the order rotating each round; step 0 is the untimed warm-up."""
    keys = list(built)
    rows = {key: Row(*key, times=[], io={"read": [0, 0.0], "write": [0, 0.0]}) for key in keys}
    for t in range(steps + 1):
        for i in range(len(keys)):
            key = keys[(i + t) % len(keys)]
            before = meter.snapshot()
            elapsed = timed_step(built[key], params, grads[t % len(grads)])
            if t == 0:
                continue
            rows[key].times.append(elapsed)
            after = meter.snapshot()
            for kind in ("read", "write"):
                rows[key].io[kind][0] += after[kind][0] - before[kind][0]
                rows[key].io[kind][1] += after[kind][1] - before[kind][1]
    return rows


def profile_memory(factory, tier, projected, plain, grads, directory, prefetch) -> tuple[int, int]:
    """Bytes above what was live before building the optimizer and taking 3 steps: the peak (the profiler's
    allocation events, step temporaries included) and what the optimizer holds after them (the storages
    reachable then, ``live_tensor_bytes``: the state, the tier's tensors, the buffer pool)."""
    params = projected + plain
    gc.collect()
    before = live_tensor_bytes()
    with track_live_bytes() as report:
        opt = make(factory, tier, projected, plain, directory, prefetch)
        for t in range(3):
            timed_step(opt, params, grads[t % len(grads)])
    gc.collect()
    held = live_tensor_bytes() - before
    if isinstance(opt, OffloadedOptimizer):
        opt.close()
    return report.peak_delta_bytes, held


def largest_state(opt, params) -> int:
    """Bytes of the largest single parameter's state in an in-RAM optimizer."""
    return max(state_bytes(_Single(opt.state.get(p, {})))["total"] for p in params)


class _Single:
    """``state_bytes`` reads ``.state``: one parameter's state as an optimizer-like object."""

    def __init__(self, state: dict) -> None:
        self.state = {0: state}


# -- the table ---------------------------------------------------------------------------------------
def markdown(rows: dict, largest: dict, floor: dict, prefetch: int, steps: int) -> str:
    lines = ["| optimizer | state in | median step ms | / in RAM | peak optimizer MiB (step) | held MiB between "
             "steps | disk read MiB/s | disk write MiB/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (name, tier), row in rows.items():
        ram = rows[(name, "in RAM")]
        bw = {k: (f"{b / s / MiB:.0f}" if s > 0 else "-") for k, (b, s) in row.io.items()}
        lines.append(f"| {name} | {tier} | {row.median_ms:.1f} | {row.median_ms / ram.median_ms:.2f}x | "
                     f"{row.peak / MiB:.1f} | {row.held / MiB:.1f} | {bw['read']} | {bw['write']} |")
    lines += ["", "Sequential bandwidth of the same disk, same file sizes: "
              + ", ".join(f"{k} {v:.0f} MiB/s" for k, v in floor.items()), ""]
    for name in largest:
        disk, ram = rows[(name, "disk")], rows[(name, "in RAM")]
        bound = (prefetch + 1) * largest[name]
        lines.append(f"- {name}: disk-tier peak {disk.peak / MiB:.1f} MiB vs (prefetch + 1) x largest state "
                     f"{bound / MiB:.1f} MiB ({'met' if disk.peak <= bound else 'not met'}); held between steps "
                     f"{disk.held / MiB:.1f} MiB; disk step / in RAM {disk.median_ms / ram.median_ms:.2f}x "
                     f"(goal <= 1.3x: {'met' if disk.median_ms <= 1.3 * ram.median_ms else 'not met'})")
    lines.append(f"- medians of {steps} interleaved steps after one warm-up step; prefetch {prefetch}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer (after 1 warm-up)")
    parser.add_argument("--prefetch", type=int, default=2, help="states the disk tier reads ahead")
    parser.add_argument("--dir", default=None, help="directory for the disk tier's files (default: a temporary "
                        "folder under $TMPDIR; put it on the disk to measure)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    d, layers, ffn, vocab, rank = SIZES["60m"]
    proj_shapes, plain_shapes = llama_shapes(d, layers, ffn, vocab)
    gen = torch.Generator().manual_seed(0)
    projected = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in proj_shapes]
    plain = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in plain_shapes]
    params = projected + plain
    grads = [[torch.randn(p.shape, generator=gen) * 1e-3 for p in params] for _ in range(2)]
    meter = IoMeter()
    meter.install()
    factories = inner_factories(rank, gap=200)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="scrimp-offload-bench-") as tmp:
        directory = Path(tmp)
        built = {(name, tier): make(f, tier, projected, plain, directory, args.prefetch)
                 for name, f in factories.items() for tier in TIERS}
        rows = run_interleaved(built, params, grads, args.steps, meter)
        largest = {name: largest_state(built[(name, "in RAM")], params) for name in factories}
        file_sizes = [f.stat().st_size for f in sorted(directory.glob("state-*/state_*.bin"))]  # all three tiers
        for opt in built.values():
            if isinstance(opt, OffloadedOptimizer):
                opt.close()
        del built
        for (name, tier), row in rows.items():
            row.peak, row.held = profile_memory(factories[name], tier, projected, plain, grads, directory,
                                                args.prefetch)
        floor = sequential_bandwidth(directory, file_sizes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, LLaMA-60M shapes (rank {rank})\n")
    print(markdown(rows, largest, floor, args.prefetch, args.steps))


if __name__ == "__main__":
    main()
