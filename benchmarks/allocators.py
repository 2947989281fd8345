# Run: flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/allocators.py
"""Speed of scrimp.allocators, side by side with a straightforward Knapsack RL-style DP, in one run.

Prints a markdown table:
- greedy on 100,000 items x 64 counts, budget 1,000,000 (target < 1 s);
- exact DP on 1,000 items x 64 counts, budget 16,000 (target < 2 s), and the certified greedy on it,
  side by side with the Knapsack RL DP recurrence (liziniu/KnapsackRL, its per-(item, budget, k) loop)
  reimplemented in plain Python (numba is not installed here) on the same instance: same optimum,
  measured speedup;
- estimate_peak for llama_60m (target < 10 s) and plan_arena on its trace.
Values are Knapsack RL's: (1 - p^k - (1-p)^k) * p (1-p)^2 with random success rates p.
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch

from scrimp.allocators import solve
from scrimp.allocators.memory_plan import estimate_peak, plan_arena
from scrimp.allocators.utility import nonzero_gradient
from scrimp.training.models import build_model


def instance(n_items: int, k_max: int, seed: int):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, size=(n_items, 1))
    k = np.arange(1, k_max + 1)[None, :]
    values = nonzero_gradient(k, p, weighted=True)
    return np.broadcast_to(k, values.shape), values


def knapsack_rl_recurrence(costs: np.ndarray, values: np.ndarray, budget: int) -> float:
    """The straightforward DP: best[i][w] = max_k best[i-1][w-k] + v_i(k), plain Python loops."""
    n, m = values.shape
    c = costs.tolist()
    v = values.tolist()
    prev = [0.0] * (budget + 1)  # "cost at most w"
    for i in range(n):
        row = [-float("inf")] * (budget + 1)
        ci, vi = c[i], v[i]
        for w in range(budget + 1):
            best = row[w]
            for j in range(m):
                if ci[j] <= w:
                    cand = prev[w - ci[j]] + vi[j]
                    if cand > best:
                        best = cand
            row[w] = best
        prev = row
    return prev[budget]


def timed(fn, repeat: int = 1):
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    torch.set_num_threads(2)
    rows = []

    costs, values = instance(100_000, 64, seed=0)
    t, g = timed(lambda: solve(costs, values, 1_000_000, method="greedy"), repeat=3)
    rows.append(("greedy", "100,000 x 64, budget 1,000,000", f"{t:.3f}", f"{g.value:.4f}", str(g.optimal), "< 1 s"))

    # Knapsack RL's instance size: 1,000 items, up to 64 rollouts each, budget 16,000. The plain-Python
    # recurrence does ~10^9 inner steps here (minutes), so it runs once; ours take the best of 3.
    n, k_max, budget = 1_000, 64, 16_000
    costs, values = instance(n, k_max, seed=1)
    t_ref, ref = timed(lambda: knapsack_rl_recurrence(costs, values, budget))
    t_dp, dp = timed(lambda: solve(costs, values, budget, method="dp"), repeat=3)
    t_g, g = timed(lambda: solve(costs, values, budget, method="greedy"), repeat=3)
    size = f"{n:,} x {k_max}, budget {budget:,}"
    rows.append(("Knapsack RL recurrence, plain Python", size, f"{t_ref:.1f}", f"{ref:.6f}", "True", "reference"))
    rows.append(
        ("dp (exact)", size, f"{t_dp:.3f}", f"{dp.value:.6f}", str(dp.optimal),
         f"< 2 s; {t_ref / t_dp:.0f}x faster, same optimum: {abs(dp.value - ref) <= 1e-9 * abs(ref)}")
    )
    rows.append(
        ("greedy (certified)", size, f"{t_g:.4f}", f"{g.value:.6f}", str(g.optimal),
         f"{t_ref / t_g:.0f}x faster, same optimum: {abs(g.value - ref) <= 1e-9 * abs(ref)}")
    )

    model_fn = lambda: build_model("llama_60m", seed=0)  # noqa: E731
    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)  # noqa: E731
    batch_fn = lambda: torch.randint(0, 32000, (4, 256))  # noqa: E731
    t_est, est = timed(lambda: estimate_peak(model_fn, adamw, batch_fn, device="cuda"))
    gib = 2**30
    cats = ", ".join(f"{k} {v / gib:.2f}" for k, v in est.by_category.items())
    rows.append(
        ("estimate_peak (AdamW, batch 4x256, cuda)", "llama_60m", f"{t_est:.2f}", f"{est.peak_bytes / gib:.3f} GiB",
         "-", f"at {est.peak_phase}; GiB: {cats}")
    )
    t_arena, arena = timed(lambda: plan_arena(est.trace))
    rows.append(
        ("plan_arena (best-fit decreasing)", f"llama_60m trace, {len(est.trace)} tensors", f"{t_arena:.2f}",
         f"{arena.arena_bytes / gib:.3f} GiB", "-",
         f"live peak {arena.live_peak_bytes / gib:.3f} GiB; fragmentation {arena.fragmentation:.2%} "
         f"vs online best-fit {arena.online_arena_bytes / gib:.3f} GiB ({arena.online_fragmentation:.2%})")
    )

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; numpy {np.__version__}\n")
    print("| case | size | time (s) | result | optimal | note |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0]).parse_args()  # --help, and no stray args
    main()
