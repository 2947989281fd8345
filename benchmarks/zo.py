# flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/zo.py            (about 5 minutes on 2 CPU cores)
# flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/zo.py --quick    (llama_tiny only, fewer steps)
"""Zeroth-order optimizers on the CPU, side by side in one run; prints markdown tables.

1. Memory: peak live tensor bytes (``scrimp.profiling.track_live_bytes``) of an inference forward,
   a ZO-SGD step (MeZO, Malladi et al. 2023) and an AdamW step, for llama_tiny and llama_60m.
2. Step time: ZO-SGD with the exact hook perturbation vs MeZO's in-place +eps/-2eps/+eps, vs
   AdamW; and whether an lr=0 step leaves the weights bit-identical.
3. Queries at equal forward passes (arXiv 2509.15552; FLOPS): from a llama_tiny checkpoint
   pre-trained with AdamW on stdlib bytes, validation loss after the same number of
   example-forwards for q=1, q=4 plain averaging, and q=4-per-example allocated by
   ``scrimp.allocators`` (variance utility), each at its best lr of a grid, averaged over two seeds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import track

from scrimp.optim.offload.stream import causal_lm_loss
from scrimp.optim.zeroth_order import ZOSGD, VarianceQueryAllocator
from scrimp.profiling import track_live_bytes
from scrimp.training.models import build_model


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def memory_and_time(name: str, batch: int, length: int, repeats: int) -> tuple[list[str], list[str]]:
    model = build_model(name, seed=0)
    x = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    closure = lambda: causal_lm_loss(model(x).logits, x)
    zo = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3)
    zo.step(closure)  # warm-up
    with torch.no_grad(), track_live_bytes() as forward:
        closure()
    with track_live_bytes() as zo_mem:
        zo.step(closure)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-6)
    closure().backward()
    adamw.step()
    adamw.zero_grad(set_to_none=True)  # moments now exist: measure a steady-state step
    with track_live_bytes() as adam_mem:
        closure().backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    memory_row = [
        name, f"{batch}x{length}", _mib(param_bytes), _mib(forward.peak_bytes), _mib(zo_mem.peak_bytes),
        _mib(adam_mem.peak_bytes), f"{zo_mem.peak_bytes / forward.peak_bytes:.3f}",
        f"{adam_mem.peak_bytes / forward.peak_bytes:.2f}",
    ]

    def timed(step) -> float:
        step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def adam_step():
        closure().backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    with torch.no_grad():
        t_forward = timed(closure)
    hook = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3, perturbation="hook")
    t_hook = timed(lambda: hook.step(closure))
    inplace = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3, perturbation="inplace")
    t_inplace = timed(lambda: inplace.step(closure))
    t_adam = timed(adam_step)
    exact = {}
    for mode in ("hook", "inplace"):
        before = [p.detach().clone() for p in model.parameters()]
        ZOSGD(model.parameters(), lr=0.0, eps=1e-3, perturbation=mode).step(closure)
        changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        exact[mode] = f"{changed}/{len(before)}"
    time_row = [
        name, f"{1e3 * t_forward:.0f}", f"{1e3 * t_hook:.0f}", f"{1e3 * t_inplace:.0f}", f"{1e3 * t_adam:.0f}",
        f"{t_hook / t_adam:.2f}", f"{t_hook / t_inplace:.2f}", exact["hook"], exact["inplace"],
    ]
    return memory_row, time_row


def _stdlib_bytes(files) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8).long()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence (shape: batch)."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    return losses.mean(dim=1)


def queries_at_equal_forwards(
    forwards: int, lrs: list[float], seeds: list[int], batch: int = 16, length: int = 48
) -> list[list[str]]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, val = _stdlib_bytes(files[:12]), _stdlib_bytes(files[12:15])

    def sampler(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda data, size: torch.stack(
            [data[s : s + length] for s in torch.randint(0, len(data) - length, (size,), generator=g).tolist()]
        )

    val_batch = sampler(123)
    val_batches = [val_batch(val, 32) for _ in range(4)]
    model = build_model("llama_tiny", vocab_size=256, seed=0)
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3)
    draw = sampler(0)
    for _ in range(100):
        x = draw(train, 8)
        causal_lm_loss(model(x).logits, x).backward()
        adamw.step()
        adamw.zero_grad()
    checkpoint = copy.deepcopy(model.state_dict())

    def val_loss():
        with torch.no_grad():
            return sum(causal_lm_loss(model(x).logits, x).item() for x in val_batches) / len(val_batches)

    start_loss = val_loss()
    methods = {
        "q=1 (default)": dict(n_queries=1),
        "q=4, plain average": dict(n_queries=4),
        "q=4/example, allocated (variance utility)": dict(query_allocator=VarianceQueryAllocator(budget_per_example=4)),
    }
    rows = []
    for label, kwargs in methods.items():
        per_step = 2 * batch * (4 if kwargs.get("n_queries", 1) == 4 or "query_allocator" in kwargs else 1)
        steps = forwards // per_step
        results = []
        for lr in track(lrs, description=f"{label}"):
            per_seed = []
            for seed in seeds:  # the ZO seeds and the data order both change with the seed
                model.load_state_dict(checkpoint)
                opt = ZOSGD(model.parameters(), lr=lr, eps=1e-3, seed=seed, **kwargs)
                draw = sampler(1 + seed)
                for _ in range(steps):
                    x = draw(train, batch)
                    if "query_allocator" in kwargs:
                        opt.step(lambda idx, x=x: per_example_loss(model(x if idx is None else x[idx]).logits,
                                                                    x if idx is None else x[idx]))
                    else:
                        opt.step(lambda x=x: causal_lm_loss(model(x).logits, x))
                per_seed.append(val_loss())
            results.append((statistics.mean(per_seed), lr, per_seed))
        best, best_lr, per_seed = min(results)
        edge = " (grid edge)" if len(lrs) > 1 and best_lr in (min(lrs), max(lrs)) else ""
        rows.append([label, str(steps), str(forwards), f"{best_lr:g}{edge}", f"{start_loss:.4f}", f"{best:.4f}",
                     " / ".join(f"{v:.4f}" for v in per_seed), f"{start_loss - best:+.4f}"])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    """Run the three comparisons and print markdown tables (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="llama_tiny only, fewer forwards")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--queries-only", action="store_true", help="only the query-allocation comparison")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the query comparison (full run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [("llama_tiny", 8, 128, 10)] if args.quick else [("llama_tiny", 8, 128, 10), ("llama_60m", 4, 128, 3)]
    if args.queries_only:
        sizes = []
    memory_rows, time_rows = [], []
    for name, batch, length, repeats in track(sizes, description="memory and time"):
        memory_row, time_row = memory_and_time(name, batch, length, repeats)
        memory_rows.append(memory_row)
        time_rows.append(time_row)
    if sizes:
        print("\n### Peak live CPU tensor bytes (MiB)\n")
        print(_table(["model", "batch x seq", "params", "forward", "ZO-SGD step", "AdamW step",
                      "ZO / forward", "AdamW / forward"], memory_rows))
        print("\n### Step time (ms, median)\n")
        print(_table(["model", "forward", "ZO hook", "ZO in-place (MeZO)", "AdamW", "ZO hook / AdamW",
                      "hook / in-place", "params changed by lr=0 step (hook)", "(in-place)"], time_rows))
    forwards = 2 * 16 * (60 if args.quick else 200)
    # The grid reaches below q=1's best lr of an earlier run (1e-3, then the grid's lower edge), so no
    # method's optimum sits on an edge of it.
    lrs = [1e-3, 4e-3] if args.quick else [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 16e-3]
    seeds = [0] if args.quick else list(range(args.seeds))
    print(f"\n### Validation loss after {forwards} example-forwards (llama_tiny, stdlib bytes, lr grid "
          f"{lrs}, mean over seeds {seeds})\n")
    print(_table(["method", "steps", "example-forwards", "best lr", "val loss before", "val loss after (mean)",
                  "per seed", "change"], queries_at_equal_forwards(forwards, lrs, seeds)))


if __name__ == "__main__":
    main()
