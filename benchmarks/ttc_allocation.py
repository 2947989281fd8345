# Test-time-compute allocation on every canonical recorded-samples file, cross-fitted, goals side by side:
#   flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/ttc_allocation.py
"""Savings at equal accuracy against uniform, per recorded-samples file, for the policies and the
published baselines, and the issue-18 goals side by side.

Voting files (last letters, AQuA, CRUXEval-I/O): ``stop_reallocate``, ``sequential`` and ``knapsack``
are cross-fitted (2 folds; candidates from ``conf/ttc/policy/<name>.yaml``, chosen per budget on the
other fold) and replayed in 20 orders; ESC and Adaptive-Consistency run at their published defaults
(not tuned) at every budget and unbudgeted. Uniform is the exact maj@k. The target is uniform maj@k
with k = 16, or the samples per prompt when fewer (CRUXEval: 10). Intervals: percentile bootstrap over
prompts of each prompt's mean over its orders (which carries the order noise).

Game of 24 (coverage, a verifier): uniform pass@k exactly; stop-at-first-success exactly (the
closed form ``evaluate.first_success_spend``), and ``stop_reallocate`` with a budget pool, cross-fitted.

Prints markdown tables; writes ``outputs/ttc_allocation/<file>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from scrimp.ttc.crossfit import crossfit_curve, replay_run, uniform_exact, uniform_spend
from scrimp.ttc.evaluate import bootstrap_ci_orders, first_success_spend, pass_at_k, savings_at_equal_accuracy
from scrimp.ttc.replay import convert_esc, load_replay, shared_data_dir
from scrimp.ttc.run import BASELINE_PARAMS

ROOT = Path(__file__).resolve().parents[1]
# (label, file, format, savings goal at the target)
VOTING = [
    ("last letters (GPT-3.5)", "esc_gpt35_last_letters_t0.7.jsonl", "esc", 4.0),
    ("AQuA (Codex)", "pot_aqua_codex_sc30.jsonl", "replay", 1.2),
    ("CRUXEval-I (CodeLlama-7B)", "cruxeval_codellama7b_t0.2_input.jsonl", "replay", 1.2),
    ("CRUXEval-O (CodeLlama-7B)", "cruxeval_codellama7b_t0.2_output.jsonl", "replay", 1.2),
]
GAME24 = ("Game of 24 (GPT-4)", "game24_gpt4_cot_t0.7.jsonl")
TUNED = ["stop_reallocate", "sequential", "knapsack"]
BUDGETS = [2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 12, 16]


def policy_space(name: str) -> tuple[dict | list, dict]:
    cfg = OmegaConf.load(ROOT / "conf" / "ttc" / "policy" / f"{name}.yaml")
    return OmegaConf.to_container(cfg.space), OmegaConf.to_container(cfg.params)


def voting_file(label: str, file: str, fmt: str, goal: float, args, previous: dict | None = None) -> dict:
    """Curves, savings and the never-below-uniform check of every policy on one voting file (only those
    in ``args.policies`` when given; the others are taken from ``previous``, an earlier run's result)."""
    path = shared_data_dir() / "ttc" / file
    prompts = convert_esc(path) if fmt == "esc" else load_replay(path)
    n = min(len(p.samples) for p in prompts)
    k = min(16, n)
    budgets = [b for b in BUDGETS if b <= n]
    uniform = {b: uniform_exact(prompts, b) for b in range(1, n + 1)}
    base, base_spend = uniform[k], uniform_spend(prompts, k)
    boot = {"n_boot": args.n_boot, "seed": args.seed}
    result = {"label": label, "file": file, "prompts": len(prompts), "samples": n, "k": k,
              "target": float(base.mean()), "goal": goal, "policies": {}}
    for name in [*TUNED, *BASELINE_PARAMS]:
        if args.policies and name not in args.policies and previous and name in previous["policies"]:
            result["policies"][name] = previous["policies"][name]
            continue
        start = time.perf_counter()
        if name in BASELINE_PARAMS:  # published defaults, not tuned: every budget and unbudgeted
            points = sorted({*map(float, budgets), float(BASELINE_PARAMS[name]["k_max"])})
            runs = [replay_run(prompts, name, b, BASELINE_PARAMS[name], repeats=args.repeats, seed=args.seed + 3000,
                               per_order=True) for b in points]
            correct, spent = np.stack([c for c, _ in runs], 1), np.stack([s for _, s in runs], 1)
            chosen = BASELINE_PARAMS[name]
        else:
            space, fixed = policy_space(name)
            curve = crossfit_curve(prompts, name, [float(b) for b in budgets], space=space, fixed=fixed,
                                   folds=2, repeats=args.repeats, tune_repeats=args.tune_repeats, seed=args.seed)
            points, correct, spent, chosen = curve.budgets, curve.correct_orders, curve.spent_orders, curve.chosen
        seconds = time.perf_counter() - start
        savings = savings_at_equal_accuracy(base, base_spend, spent, correct, **boot)
        rows, below = [], []
        for b, budget in enumerate(points):
            acc = bootstrap_ci_orders(correct[:, b], **boot)
            diff = None
            if budget == int(budget) and int(budget) in uniform:
                diff = bootstrap_ci_orders(correct[:, b] - uniform[int(budget)][:, None], **boot)
                if diff[2] < 0:
                    below.append(budget)
            rows.append({"budget": budget, "spend": float(spent[:, b].mean()), "accuracy": acc, "minus_uniform": diff})
        result["policies"][name] = {"savings": savings._asdict(), "savings_text": str(savings), "rows": rows,
                                    "below_uniform_at": below, "seconds": seconds, "chosen": chosen}
        print(f"  {label}: {name} {savings} ({seconds:.0f} s)", flush=True)
    return result


def game24(args) -> dict:
    """Coverage with a verifier: exact uniform pass@k and exact stop-at-first-success, plus the
    budget-pooled ``stop_reallocate`` (cross-fitted, hopeless rule tuned)."""
    prompts = load_replay(shared_data_dir() / "ttc" / GAME24[1])
    counts = [(len(p.samples), sum(bool(s.correct) for s in p.samples)) for p in prompts]
    ks = [1, 2, 4, 8, 16, 32, 64]
    exact = {k: {"uniform_spend": float(k), "coverage": float(np.mean([pass_at_k(n, c, k) for n, c in counts])),
                 "first_success_spend": float(np.mean([first_success_spend(n, c, k) for n, c in counts]))}
             for k in ks}
    start = time.perf_counter()
    curve = crossfit_curve(prompts, "stop_reallocate", [2.0, 4.0, 8.0, 16.0],
                           space={"hopeless": [0, 8, 16]}, fixed={"utility": "coverage", "k_max": 100}, folds=2,
                           repeats=args.repeats, tune_repeats=args.tune_repeats, seed=args.seed)
    seconds = time.perf_counter() - start
    base = np.array([pass_at_k(n, c, 16) for n, c in counts])
    savings = savings_at_equal_accuracy(base, 16.0, curve.spent_orders, curve.correct_orders,
                                        n_boot=args.n_boot, seed=args.seed)
    rows = [{"budget": b, "spend": float(curve.spent[:, i].mean()),
             "coverage": bootstrap_ci_orders(curve.correct_orders[:, i], n_boot=args.n_boot, seed=args.seed)}
            for i, b in enumerate(curve.budgets)]
    return {"label": GAME24[0], "exact": exact, "pooled": rows, "repeats": args.repeats, "savings": savings._asdict(),
            "savings_text": str(savings), "seconds": seconds, "chosen": curve.chosen}


def speed(args) -> dict:
    """Seconds for one 20-order replay of each policy on the last-letters file at B = 8 (defaults)."""
    prompts = convert_esc(shared_data_dir() / "ttc" / VOTING[0][1])
    out = {}
    for name in ["uniform", *TUNED, *BASELINE_PARAMS]:
        start = time.perf_counter()
        replay_run(prompts, name, 8, BASELINE_PARAMS.get(name, {}), repeats=20, seed=args.seed)
        out[name] = time.perf_counter() - start
    return out


def print_tables(results: list[dict], g24: dict | None, seconds: dict | None) -> None:
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{len(__import__('os').sched_getaffinity(0))} CPU cores")
    names = [*TUNED, *BASELINE_PARAMS]
    print("\n| data | target: uniform maj@k | goal | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in results:
        cells = []
        for name in names:
            p = r["policies"][name]
            s = p["savings"]
            mark = " ✓" if s["reached"] and s["ratio"] >= r["goal"] else ""
            cells.append(f"{p['savings_text']}{mark}")
        print(f"| {r['label']} | maj@{r['k']} = {r['target']:.3f} | ≥ {r['goal']:g}x | " + " | ".join(cells) + " |")
    print("\n✓: the point estimate meets the goal. '<=': that end of the interval is only an upper bound (some "
          "bootstrap resamples never reach the target within the largest budget); 'not reached': the policy's "
          "curve stays below the target.")
    print("\n| data | policy | below uniform (paired 95% interval) at budgets | cross-fitting + 20-order replay (s) |")
    print("|---|---|---|---|")
    for r in results:
        for name in names:
            p = r["policies"][name]
            print(f"| {r['label']} | {name} | {', '.join(f'{b:g}' for b in p['below_uniform_at']) or 'none'} | "
                  f"{p['seconds']:.0f} |")
    if g24:
        print(f"\n{g24['label']}: coverage with a verifier (exact over sample orders)")
        print("| k | uniform pass@k spend | stop at first success: mean spend | coverage (both) | savings |")
        print("|---|---|---|---|---|")
        for k, e in g24["exact"].items():
            print(f"| {k} | {k} | {e['first_success_spend']:.2f} | {e['coverage']:.3f} | "
                  f"{k / e['first_success_spend']:.2f}x |")
        print(f"stop_reallocate with a budget pool (cross-fitted, {g24['repeats']} orders) vs uniform pass@16: {g24['savings_text']}")
        for row in g24["pooled"]:
            c = row["coverage"]
            print(f"  B={row['budget']:g}: spend {row['spend']:.2f}, coverage {c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]")
    if seconds:
        print("\nspeed, last letters, one 20-order replay at B=8 (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description="test-time-compute allocation on every canonical recorded file")
    parser.add_argument("--only", nargs="*", default=None, help="labels' first words to run (e.g. AQuA CRUXEval-I)")
    parser.add_argument("--policies", nargs="*", default=None,
                        help="rerun only these policies; the others come from the earlier run's results")
    parser.add_argument("--repeats", type=int, default=20, help="replay orders per prompt on the evaluation fold")
    parser.add_argument("--tune-repeats", type=int, default=2, help="replay orders per prompt when tuning")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "ttc_allocation"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def wanted(label: str) -> bool:
        return args.only is None or label.split()[0] in args.only

    results = []
    for label, file, fmt, goal in VOTING:
        cached = out / f"{file}.json"
        if wanted(label):
            previous = json.loads(cached.read_text()) if cached.is_file() else None
            results.append(voting_file(label, file, fmt, goal, args, previous))
            cached.write_text(json.dumps(results[-1], default=float, indent=1))
        elif cached.is_file():  # an earlier run's result, so that the goal table stays whole
            results.append(json.loads(cached.read_text()))
    g24 = None
    if wanted(GAME24[0]):
        g24 = game24(args)
        (out / f"{GAME24[1]}.json").write_text(json.dumps(g24, default=float, indent=1))
    elif (out / f"{GAME24[1]}.json").is_file():
        g24 = json.loads((out / f"{GAME24[1]}.json").read_text())
        g24["exact"] = {int(k): v for k, v in g24["exact"].items()}
    seconds = speed(args) if wanted("speed") else None
    print_tables(results, g24, seconds)
    if any(math.isnan(r["target"]) for r in results):
        print("a target is NaN: a file without correctness flags")


if __name__ == "__main__":
    main()
