# Per-prompt sampling budgets on recorded GPT-3.5 samples (ESC last letters), cross-fitted:
#   flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/ttc_allocation.py
"""Accuracy vs budget for uniform / knapsack / sequential / compute_optimal (oracle as a ceiling, and
the plain ESC window rule with its fixed published setting as a reference),
B in {2, 4, 8, 16, 32} mean samples per prompt, 95% bootstrap intervals over prompts, and compute
savings at equal accuracy against uniform majority voting at B = 16.

Every policy's hyper-parameters (and the compute-optimal plan) are chosen per budget on calibration
folds and reported on the disjoint fold (2-fold cross-fitting, ``scrimp.ttc.crossfit``); candidates
come from the policy's own config, ``conf/ttc/policy/<name>.yaml``. Uniform is the exact expectation
maj@B over all B-subsets of the recorded samples. Extra budgets between 2 and 12 only refine the
curve used for the savings ratio. Prints markdown tables; writes ``outputs/ttc_allocation/curve.csv``
and the plot ``docs/ttc_budget_curve.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf
from rich.progress import Progress

from scrimp.ttc.crossfit import crossfit_curve, uniform_exact
from scrimp.ttc.evaluate import bootstrap_ci, plot_curves, savings_at_equal_accuracy, write_curves_csv
from scrimp.ttc.replay import convert_esc, replay_stats, shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
TABLE_BUDGETS = [2, 4, 8, 16, 32]
CURVE_BUDGETS = [2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 8, 12, 16, 32]
POLICIES = ["knapsack", "sequential", "compute_optimal", "oracle", "esc_w3_cap16"]
# The plain ESC window rule with the paper's fixed setting (window 3, cap 16): the 3.7x anchor.
FIXED = {"esc_w3_cap16": ("sequential", {"rule": "window", "window": 3, "pilot": 3, "k_max": 16})}


def policy_space(name: str):
    """(policy, candidate parameters, fixed parameters): from conf/ttc/policy/<name>.yaml, or FIXED."""
    if name in FIXED:
        return FIXED[name][0], {}, FIXED[name][1]
    cfg = OmegaConf.load(ROOT / "conf" / "ttc" / "policy" / f"{name}.yaml")
    return name, OmegaConf.to_container(cfg.space), OmegaConf.to_container(cfg.params)


def main() -> None:
    """Run the benchmark and print its tables (see the module docstring)."""
    parser = argparse.ArgumentParser(description="ESC replay: per-prompt sampling budgets, cross-fitted")
    parser.add_argument("--data", default=str(shared_data_dir() / "ttc" / "esc_gpt35_last_letters_t0.7.jsonl"))
    parser.add_argument("--repeats", type=int, default=16, help="replay orders per prompt on the evaluation fold")
    parser.add_argument("--tune-repeats", type=int, default=8, help="replay orders per prompt when tuning")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "ttc_allocation"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "ttc_budget_curve.png"))
    args = parser.parse_args()

    prompts = convert_esc(args.data)
    stats = replay_stats(prompts)
    print(f"data: {Path(args.data).name}: {stats['prompts']} prompts x {stats['samples'] // stats['prompts']} "
          f"samples, extraction rate {stats['extraction_rate']:.4f}, sample accuracy {stats['sample_accuracy']:.4f}")

    uniform = {k: uniform_exact(prompts, k) for k in TABLE_BUDGETS}
    curves, seconds = {}, {}
    with Progress(transient=True) as progress:
        task = progress.add_task("policies x folds x budgets", total=len(POLICIES) * args.folds * len(CURVE_BUDGETS))
        for name in POLICIES:
            policy, space, fixed = policy_space(name)
            start = time.perf_counter()
            # a fixed setting cannot run below its own pilot cost: its curve starts there
            budgets = [b for b in CURVE_BUDGETS if b >= fixed.get("pilot", 0)]
            progress.advance(task, args.folds * (len(CURVE_BUDGETS) - len(budgets)))
            curves[name] = crossfit_curve(
                prompts, policy, budgets, space=space, fixed=fixed, folds=args.folds,
                repeats=args.repeats, tune_repeats=args.tune_repeats, seed=args.seed,
                progress=lambda: progress.advance(task),
            )
            seconds[name] = time.perf_counter() - start

    rows = []
    for k, corr in uniform.items():
        est, lo, hi = bootstrap_ci(corr, n_boot=args.n_boot, seed=args.seed)
        rows.append({"policy": "uniform", "budget": k, "spend": float(k), "accuracy": est, "low": lo, "high": hi})
    for name, curve in curves.items():
        for b, budget in enumerate(curve.budgets):
            est, lo, hi = bootstrap_ci(curve.correct[:, b], n_boot=args.n_boot, seed=args.seed)
            rows.append({"policy": name, "budget": budget, "spend": float(curve.spent[:, b].mean()),
                         "accuracy": est, "low": lo, "high": hi})
    write_curves_csv(rows, Path(args.out) / "curve.csv")
    plot_curves(rows, args.plot, title="ESC last letters (GPT-3.5), cross-fitted; band: uniform 95% CI",
                bands=["uniform"], target=float(uniform[16].mean()))

    print("\n| policy | B | mean spend | accuracy [95% CI] | minus uniform@B, paired [95% CI] |")
    print("|---|---|---|---|---|")
    for k in TABLE_BUDGETS:
        u = uniform[k]
        est, lo, hi = bootstrap_ci(u, n_boot=args.n_boot, seed=args.seed)
        print(f"| uniform (exact maj@{k}) | {k} | {k:.2f} | {est:.3f} [{lo:.3f}, {hi:.3f}] | - |")
        for name, curve in curves.items():
            if k not in curve.budgets:
                continue
            b = curve.budgets.index(k)
            est, lo, hi = bootstrap_ci(curve.correct[:, b], n_boot=args.n_boot, seed=args.seed)
            d, dlo, dhi = bootstrap_ci(curve.correct[:, b] - u, n_boot=args.n_boot, seed=args.seed)
            label = f"{name} (ceiling)" if name == "oracle" else name
            print(f"| {label} | {k} | {curve.spent[:, b].mean():.2f} | {est:.3f} [{lo:.3f}, {hi:.3f}] | "
                  f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}] |")

    print("\n| policy | savings at equal accuracy vs uniform@16 [95% CI] | mean spend to reach it | "
          "resamples not reaching it | run time (s) |")
    print("|---|---|---|---|---|")
    for name, curve in curves.items():
        savings = savings_at_equal_accuracy(uniform[16], 16, curve.spent, curve.correct,
                                            n_boot=args.n_boot, seed=args.seed)
        reach = f"{16 / savings.ratio:.2f}" if savings.reached else f"not reached by {16 / savings.ratio:.2f}"
        label = f"{name} (ceiling)" if name == "oracle" else name
        print(f"| {label} | {savings} | {reach} | {savings.censored:.3f} | {seconds[name]:.1f} |")
    print(f"\nuniform@16 accuracy {uniform[16].mean():.4f}; curve budgets {CURVE_BUDGETS}; "
          f"{args.folds}-fold cross-fitting, {args.repeats} replay orders (eval), {args.tune_repeats} (tuning); "
          "paired bootstrap over prompts (target and curve from the same resample); a resample that never "
          "reaches its target counts at its upper value 16 / largest spend, and an interval end marked '<=' "
          "is only known as an upper bound")
    print(f"wrote {Path(args.out) / 'curve.csv'} and {args.plot}")


if __name__ == "__main__":
    main()
