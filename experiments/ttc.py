"""Test-time-compute allocation on recorded samples, with honest (cross-fitted) evaluation.

    python -m experiments.ttc                                   # defaults: ESC last letters, sequential, B=8
    python -m experiments.ttc data=esc_last_letters policy=sequential budget=8
    python -m experiments.ttc policy=compute_optimal curve_budgets=[2,4,8,16,32]
    python -m experiments.ttc -m hparams_search=sequential_optuna   # sweep (tuning split only)

Prints a table (policy vs uniform, 95% bootstrap intervals over prompts) and writes, in the Hydra run
folder, ``summary.json``, ``curve.csv`` and ``curve.png``. With ``tune_only=true`` it evaluates the
fixed ``policy.params`` on the calibration split (never the reported one) and returns the accuracy,
the objective for Optuna sweeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from scrimp.checks import check_choice, check_integer
from scrimp.ttc.allocate import POLICIES, check_budget
from scrimp.ttc.crossfit import (
    candidate_params,
    crossfit_curve,
    replay_run,
    split_folds,
    uniform_exact,
    uniform_spend,
)
from scrimp.ttc.evaluate import (
    atomic_write,
    bootstrap_ci,
    plot_curves,
    savings_at_equal_accuracy,
    write_curves_csv,
)
from scrimp.ttc.replay import convert_esc, load_replay, replay_stats, shared_data_dir


def load_data(cfg: DictConfig):
    """Replay prompts from the data config (``format``: esc or replay; ``path`` relative to shared data)."""
    if OmegaConf.is_missing(cfg, "path") or not cfg.path:
        raise ValueError("data.path must name a recorded-samples file (canonical replay JSONL or ESC format), "
                         "e.g. data=replay_file data.path=/abs/path/samples.jsonl")
    path = Path(cfg.path)
    if not path.is_absolute():
        path = shared_data_dir() / path
    if cfg.format not in ("esc", "replay"):
        raise ValueError(f"data.format must be 'esc' or 'replay', got {cfg.format!r}")
    return convert_esc(path) if cfg.format == "esc" else load_replay(path)


def _validate(cfg: DictConfig) -> None:
    """Every setting, the policy's parameters and candidates included, before any data is read."""
    check_choice("policy.name", cfg.policy.name, POLICIES)
    check_budget(cfg.budget)
    if int(check_budget(cfg.baseline_budget, "baseline_budget")) != cfg.baseline_budget:
        raise ValueError(f"baseline_budget must be an integer (uniform maj@k), got {cfg.baseline_budget}")
    if not isinstance(cfg.curve_budgets, Sequence) or isinstance(cfg.curve_budgets, str):
        raise ValueError(f"curve_budgets must be a list of samples per prompt, got {cfg.curve_budgets!r}")
    for budget in cfg.curve_budgets:
        check_budget(budget, "every curve_budgets entry")
    check_integer("folds", cfg.folds, 2)
    for key in ("repeats", "tune_repeats", "n_boot"):
        check_integer(key, cfg[key], 1)
    fixed = OmegaConf.to_container(cfg.policy.params, resolve=True) or {}
    space = {} if cfg.tune_only else OmegaConf.to_container(cfg.policy.space, resolve=True)
    candidate_params(cfg.policy.name, space, fixed)


def _strict_json(obj):
    """``obj`` with NaN and infinities as null: strict JSON readers reject the bare NaN Python writes."""
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer | np.bool_):
        return obj.item()
    return obj


def _atomic_json(obj, path: Path) -> None:
    text = json.dumps(_strict_json(obj), indent=2, default=float, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Run the experiment described by ``cfg``; returns the summary (also written to ``out_dir``)."""
    _validate(cfg)
    prompts = load_data(cfg.data)
    name = cfg.policy.name
    fixed = OmegaConf.to_container(cfg.policy.params, resolve=True) or {}
    space = OmegaConf.to_container(cfg.policy.space, resolve=True) or {}

    if cfg.tune_only:
        # Objective for sweeps: the first fold's calibration part only; never the reported fold.
        calib_idx = np.setdiff1d(np.arange(len(prompts)), split_folds(len(prompts), cfg.folds, cfg.seed)[0])
        calib = [prompts[i] for i in calib_idx]
        acc, spent = replay_run(calib, name, float(cfg.budget), fixed, repeats=cfg.tune_repeats, seed=cfg.seed)
        measured = {"accuracy": float(acc.mean()), "spend": float(spent.mean())}
        unknown = set(cfg.objectives) - set(measured)
        if unknown:
            raise ValueError(f"objectives must be drawn from {sorted(measured)}, got {sorted(unknown)}")
        summary = {"objective": [measured[o] for o in cfg.objectives], **measured, "params": fixed}
        _atomic_json(summary, out_dir / "summary.json")
        print(f"tuning split: accuracy {acc.mean():.4f} at mean spend {spent.mean():.2f} with {fixed}")
        return summary

    budgets = sorted({float(b) for b in cfg.curve_budgets} | {float(cfg.budget)})
    curve = crossfit_curve(prompts, name, budgets, space=space, fixed=fixed, folds=cfg.folds,
                           repeats=cfg.repeats, tune_repeats=cfg.tune_repeats, seed=cfg.seed)
    rows = []
    for b, budget in enumerate(budgets):
        est, lo, hi = bootstrap_ci(curve.correct[:, b], n_boot=cfg.n_boot, seed=cfg.seed)
        rows.append({"policy": name, "budget": budget, "spend": curve.spent[:, b].mean(), "accuracy": est,
                     "low": lo, "high": hi})
    for k in sorted({int(b) for b in budgets if b == int(b)} | {int(cfg.baseline_budget)}):
        est, lo, hi = bootstrap_ci(uniform_exact(prompts, k), n_boot=cfg.n_boot, seed=cfg.seed)
        rows.append({"policy": "uniform (exact maj@k)", "budget": k, "spend": uniform_spend(prompts, k).mean(),
                     "accuracy": est, "low": lo, "high": hi})
    base = uniform_exact(prompts, int(cfg.baseline_budget))
    # What uniform@k really spends: prompts with fewer than k recorded samples vote over all of them.
    base_spend = uniform_spend(prompts, int(cfg.baseline_budget))
    savings = savings_at_equal_accuracy(base, base_spend, curve.spent, curve.correct,
                                        n_boot=cfg.n_boot, seed=cfg.seed)
    write_curves_csv(rows, out_dir / "curve.csv")
    plot_curves(rows, out_dir / "curve.png", title=f"{cfg.data.name}: {name} vs uniform (cross-fitted)",
                target=float(base.mean()))
    head = next(r for r in rows if r["policy"] == name and r["budget"] == float(cfg.budget))
    summary = {
        "data": cfg.data.name, "policy": name, "budget": float(cfg.budget), "stats": replay_stats(prompts),
        "accuracy": head["accuracy"], "accuracy_ci": [head["low"], head["high"]], "spend": head["spend"],
        "savings_vs_uniform": {"baseline_budget": float(cfg.baseline_budget), "baseline_spend": base_spend.mean(),
                               **savings._asdict()},
        "curve": rows, "chosen": curve.chosen, "config": OmegaConf.to_container(cfg, resolve=True),
    }
    _atomic_json(summary, out_dir / "summary.json")
    print("| policy | budget | mean spend | accuracy [95% CI] |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['budget']:g} | {r['spend']:.2f} | {r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}] |")
    print(f"savings at equal accuracy vs uniform@{cfg.baseline_budget}: {savings} (95% CI; '<=': an end known only "
          "as an upper bound, because some bootstrap resamples never reach the target)")
    print(f"wrote {out_dir / 'summary.json'}, curve.csv, curve.png")
    return summary


@hydra.main(version_base="1.3", config_path="../conf/ttc", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    """Hydra entry point; returns the objective(s) for sweepers (accuracy, or [accuracy, spend])."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, out_dir)
    except (ValueError, FileNotFoundError) as err:  # bad input: one sentence, before any work
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # the sweeper records the failed trial and goes on
        raise SystemExit(f"error: {err}") from None
    if "objective" in summary:
        values = summary["objective"]
        return values[0] if len(values) == 1 else values
    return float(summary["accuracy"])


if __name__ == "__main__":
    main()
