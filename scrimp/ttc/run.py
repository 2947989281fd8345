"""The test-time-compute job behind ``python -m experiments.ttc``: config in, comparison table and
``summary.json`` out (the counterpart of ``scrimp.training.run``; the entry point only parses and prints).

    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=".../conf/ttc", version_base="1.3"):
        cfg = compose("config", overrides=["data=replay_file", "data.path=ttc/pot_aqua_codex_sc30.jsonl"])
    summary = scrimp.ttc.run.run(cfg, out_dir)
    print("\\n".join(summary["table"]))

The data config is a ``_target_`` config: ``recorded_prompts`` reads a replay file (canonical JSONL, or
ESC's format converted on load). The policy's curve is cross-fitted (``crossfit.crossfit_curve``);
uniform is the exact expectation over sample subsets (maj@k, or pass@k for ``utility=coverage``); the
published baselines (``allocate.BASELINES`` at their published defaults) are replayed beside it, at every
budget and unbudgeted. Every interval is a bootstrap over prompts and, for replayed policies, over their
replay orders too (``evaluate.bootstrap_ci_orders``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from scrimp.checks import check_choice
from scrimp.ttc.allocate import BASELINES, POLICY_FUNCTIONS, UTILITIES, _keywords, published_params
from scrimp.ttc.crossfit import (
    candidate_params,
    crossfit_curve,
    replay_run,
    split_folds,
    uniform_exact,
    uniform_spend,
)
from scrimp.ttc.evaluate import (
    Savings,
    atomic_write,
    bootstrap_ci,
    bootstrap_ci_orders,
    plot_curves,
    savings_at_equal_accuracy,
    write_curves_csv,
)
from scrimp.ttc.generate import ReplayPrompt
from scrimp.ttc.replay import _json_lines, convert_esc, load_replay, replay_stats, shared_data_dir

# Policies whose answer under a verifier is a verified sample (the others are voting procedures, and
# compute_optimal's plan is fitted for voting).
COVERAGE_POLICIES = ("uniform", "oracle", "knapsack", "sequential", "stop_reallocate")
# The published defaults every comparison table shows (ESC's last-letters script; Adaptive-Consistency's
# library default), read from the policies' signatures (their one source). Never tuned: a baseline tuned on
# the data would no longer be the published one.
BASELINE_PARAMS = {name: published_params(name) for name in BASELINES}


def recorded_prompts(path: str, format: str = "replay", name: str | None = None) -> list[ReplayPrompt]:
    """The ``_target_`` of a recorded-samples data config: the prompts of ``path`` (relative paths are read
    from the shared data folder), ``format`` ``replay`` (canonical JSONL) or ``esc`` (converted on load)."""
    from scrimp.training.validate import TTC_RULES

    # The validation layer's rules, so that a direct call and a composed config are refused in the same words.
    TTC_RULES["data.path"].check("data.path", path)
    TTC_RULES["data.format"].check("data.format", format)
    file = Path(path)
    if not file.is_absolute():
        file = shared_data_dir() / file
    return convert_esc(file) if format == "esc" else load_replay(file)


def _prompt_lines(path: Path) -> list[tuple[str, str, str | None]]:
    """(id, prompt, reference) of each line of a prompts JSONL file (a replay file's samples are ignored)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    rows = []
    for lineno, obj in _json_lines(path):  # the replay reader's parser: bad JSON or UTF-8 named by file and line
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path.name} line {lineno}: each line must be an object with 'id' and a string 'prompt'")
        ref = obj.get("reference")
        if ref is not None and not isinstance(ref, str):
            raise ValueError(f"{path.name} line {lineno}: 'reference' must be a string or null")
        rows.append((str(obj["id"]), obj["prompt"], ref))
    if not rows:
        raise ValueError(f"prompts file {path} holds no prompts")
    return rows


def live_generator(model: str, backend: str = "transformers", **settings):
    """A generator from a local model folder: ``HFGenerator`` over transformers (CPU or GPU), or
    ``VLLMGenerator`` when ``backend="vllm"`` and vllm is installed. Nothing is downloaded."""
    from scrimp.ttc.generate import HFGenerator, VLLMGenerator

    check_choice("data.backend", backend, ("transformers", "vllm"))
    if not Path(model).is_dir():
        raise FileNotFoundError(f"data.model must be a local folder holding a transformers model and its "
                                f"tokenizer, got {model!r}")
    if backend == "vllm":
        try:
            return VLLMGenerator(model, **settings)
        except ImportError as err:
            raise ValueError(f"data.backend=vllm needs vllm installed ({err})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True).eval()
    settings.pop("seed", None)  # transformers sampling is seeded through torch (sampled_prompts)
    return HFGenerator(lm, tokenizer, **settings)


def sampled_prompts(path: str, model: str, samples: int = 16, backend: str = "transformers", seed: int = 0,
                    temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 8,
                    name: str | None = None) -> list[ReplayPrompt]:
    """The ``_target_`` of a live-generator data config: ``samples`` solutions for each prompt of ``path``
    (JSONL lines with ``id``, ``prompt``, ``reference``) from a local model, judged against the
    references, returned as recorded prompts. Every policy is then measured on them exactly as on a
    replay file (the same cross-fitting, orders and intervals), and the samples are drawn once."""
    import torch

    from scrimp.checks import check_integer
    from scrimp.ttc.generate import Sample
    from scrimp.ttc.verify import exact_match

    check_integer("data.samples", samples, 1)
    file = Path(path) if Path(path).is_absolute() else shared_data_dir() / path
    rows = _prompt_lines(file)
    torch.manual_seed(seed)
    generator = live_generator(model, backend, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               seed=seed, **({"batch_size": batch_size} if backend == "transformers" else {}))
    drawn = generator.sample([prompt for _, prompt, _ in rows], samples)
    return [ReplayPrompt(pid, prompt, ref, tuple(Sample(s.text, s.answer, s.tokens, s.score,
                                                        None if ref is None else exact_match(s.answer, ref))
                                                 for s in got))
            for (pid, prompt, ref), got in zip(rows, drawn)]


def load_data(cfg: DictConfig) -> list[ReplayPrompt]:
    """Instantiate the data config's ``_target_`` (a config without one is read by ``recorded_prompts``)."""
    if OmegaConf.is_missing(cfg, "path"):
        return recorded_prompts("???")
    if "_target_" not in cfg:
        return recorded_prompts(cfg.path, cfg.get("format", "replay"))
    from hydra.utils import get_method

    # Called directly rather than through hydra's instantiate, which wraps a bad-input ValueError into
    # its own exception and the command line would print a traceback hint instead of one sentence.
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
    return get_method(cfg._target_)(**kwargs)


def validate(cfg: DictConfig) -> None:
    """Every setting, the policy's parameters and candidates included, before any data is read: the keys by
    the validation layer's table (``scrimp.training.validate.TTC_RULES``), the policy's parameters by the
    policy's own ``candidate_params``."""
    from scrimp.training.validate import check_ttc_config

    check_ttc_config(cfg)
    check_choice("utility", cfg.get("utility", "majority"), UTILITIES)
    if cfg.get("utility", "majority") == "coverage" and cfg.policy.name not in COVERAGE_POLICIES:
        raise ValueError(f"utility=coverage needs a policy that selects with a verifier, one of {COVERAGE_POLICIES}; "
                         f"{cfg.policy.name} votes only")
    fixed, space = _policy_params(cfg)
    candidate_params(cfg.policy.name, {} if cfg.tune_only else space, fixed)


def _policy_params(cfg: DictConfig) -> tuple[dict, dict | list]:
    """(fixed parameters with the run's utility, candidate space) of the configured policy."""
    fixed = OmegaConf.to_container(cfg.policy.params, resolve=True) or {}
    space = OmegaConf.to_container(cfg.policy.space, resolve=True) or {}
    utility = cfg.get("utility", "majority")
    if utility != "majority" and "utility" in _keywords(POLICY_FUNCTIONS[cfg.policy.name]):
        fixed = {**fixed, "utility": utility}
    return fixed, space


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


def write_json(obj, path: Path) -> None:
    text = json.dumps(_strict_json(obj), indent=2, default=float, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def tune_only(cfg: DictConfig, prompts: list[ReplayPrompt], out_dir: Path) -> dict:
    """The objective of a sweep trial: the fixed ``policy.params`` on fold 0's calibration part only
    (never the reported fold)."""
    fixed, _ = _policy_params(cfg)
    calib_idx = np.setdiff1d(np.arange(len(prompts)), split_folds(len(prompts), cfg.folds, cfg.seed)[0])
    calib = [prompts[i] for i in calib_idx]
    acc, spent = replay_run(calib, cfg.policy.name, float(cfg.budget), fixed, repeats=cfg.tune_repeats,
                            seed=cfg.seed)
    measured = {"accuracy": float(acc.mean()), "spend": float(spent.mean())}
    unknown = set(cfg.objectives) - set(measured)
    if unknown:
        raise ValueError(f"objectives must be drawn from {sorted(measured)}, got {sorted(unknown)}")
    summary = {"objective": [measured[o] for o in cfg.objectives], **measured, "params": fixed,
               "table": [f"tuning split: accuracy {acc.mean():.4f} at mean spend {spent.mean():.2f} with {fixed}"]}
    write_json(summary, out_dir / "summary.json")
    return summary


def baseline_curves(prompts, budgets: list[float], *, repeats: int, seed: int) -> dict[str, tuple[list, np.ndarray,
                                                                                                 np.ndarray]]:
    """Each published baseline replayed at every budget and unbudgeted (budget = its cap, where it spends
    what it chooses): {name: (budgets, correct (prompts, points, orders), spent (same))}."""
    curves = {}
    for name in BASELINES:
        params = BASELINE_PARAMS[name]
        points = sorted({*budgets, float(params["k_max"])})
        runs = [replay_run(prompts, name, b, params, repeats=repeats, seed=seed + 3000, per_order=True)
                for b in points]
        curves[f"{name} (published)"] = (points, np.stack([c for c, _ in runs], 1), np.stack([s for _, s in runs], 1))
    return curves


def savings_words(s: Savings, k: int) -> str:
    """A savings figure with its interval, and in plain words what an end marked "<=" means."""
    words = str(s)
    if math.isnan(s.ratio):
        return words
    if not s.reached:
        words += f" (the policy never reaches uniform@{k}'s accuracy within its largest budget; the savings are " \
                 f"below the printed value)"
    elif s.low_is_upper_bound or s.high_is_upper_bound:
        words += (f" (an end marked '<=' is only an upper bound: in {s.censored:.0%} of the bootstrap resamples the "
                  f"policy never reaches uniform@{k}'s accuracy within its largest budget)")
    return words


def _row(policy, budget, spend, est, lo, hi, diff=None) -> dict:
    return {"policy": policy, "budget": budget, "spend": float(spend), "accuracy": est, "low": lo, "high": hi,
            "diff": None if diff is None else diff[0], "diff_low": None if diff is None else diff[1],
            "diff_high": None if diff is None else diff[2]}


def _budget_label(budget: float, chosen: float, cap: float | None = None) -> str:
    if cap is not None and budget == cap:
        return f"none (cap {budget:g})"
    return f"**{budget:g} (chosen)**" if budget == chosen else f"{budget:g}"


def comparison_table(rows: list[dict], chosen: float, caps: dict[str, float]) -> list[str]:
    """Markdown lines: one block per budget (uniform, the baselines, the policy), the chosen budget marked."""
    lines = ["| policy | budget | mean spend | accuracy [95% CI] | minus uniform at the same budget, paired [95% CI] |",
             "|---|---|---|---|---|"]
    order = {b: i for i, b in enumerate(sorted({r["budget"] for r in rows}))}
    for r in sorted(rows, key=lambda r: (order[r["budget"]], r["policy"] != "uniform")):
        diff = "-" if r["diff"] is None else f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]"
        label = _budget_label(r["budget"], chosen, caps.get(r["policy"]))
        lines.append(f"| {r['policy']} | {label} | {r['spend']:.2f} | {r['accuracy']:.3f} [{r['low']:.3f}, "
                     f"{r['high']:.3f}] | {diff} |")
    return lines


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Run the experiment described by ``cfg``; returns the summary (also written to ``out_dir``), whose
    ``table`` holds the lines to print."""
    validate(cfg)
    prompts = load_data(cfg.data)
    out_dir = Path(out_dir)
    if cfg.tune_only:
        return tune_only(cfg, prompts, out_dir)
    name, utility = cfg.policy.name, cfg.get("utility", "majority")
    fixed, space = _policy_params(cfg)
    budgets = sorted({float(b) for b in cfg.curve_budgets} | {float(cfg.budget)})
    curve = crossfit_curve(prompts, name, budgets, space=space, fixed=fixed, folds=cfg.folds,
                           repeats=cfg.repeats, tune_repeats=cfg.tune_repeats, seed=cfg.seed)
    boot = {"n_boot": cfg.n_boot, "seed": cfg.seed}
    uniform = {k: uniform_exact(prompts, k, utility) for k in sorted({int(b) for b in budgets if b == int(b)}
                                                                      | {int(cfg.baseline_budget)})}
    curves = {name: (budgets, curve.correct_orders, curve.spent_orders)}
    if utility == "majority":  # the baselines vote; a verifier-based run has no voting baseline to show
        curves.update(baseline_curves(prompts, budgets, repeats=cfg.repeats, seed=cfg.seed))
    rows = [_row("uniform", float(k), uniform_spend(prompts, k).mean(), *bootstrap_ci(u, **boot))
            for k, u in uniform.items()]
    for policy, (points, correct, spent) in curves.items():
        for b, budget in enumerate(points):
            paired = None
            if int(budget) in uniform and budget == int(budget):
                paired = bootstrap_ci_orders(correct[:, b] - uniform[int(budget)][:, None], **boot)
            rows.append(_row(policy, budget, spent[:, b].mean(), *bootstrap_ci_orders(correct[:, b], **boot), paired))
    k = int(cfg.baseline_budget)
    base, base_spend = uniform[k], uniform_spend(prompts, k)
    savings = {policy: savings_at_equal_accuracy(base, base_spend, spent, correct, **boot)
               for policy, (_, correct, spent) in curves.items()}
    below = [r for r in rows if r["policy"] == name and r["diff_high"] is not None and r["diff_high"] < 0]
    caps = {f"{b} (published)": float(BASELINE_PARAMS[b]["k_max"]) for b in BASELINES}
    table = comparison_table(rows, float(cfg.budget), caps)
    table.append("")
    table += [f"savings at equal accuracy vs uniform@{k} ({'pass' if utility == 'coverage' else 'maj'}@{k} = "
              f"{base.mean():.3f}), {policy}: {savings_words(s, k)}" for policy, s in savings.items()]
    where = ", ".join(f"{r['budget']:g}" for r in below) or "no budget"
    table.append(f"{name} is below uniform by more than the paired 95% interval at {where}")
    write_curves_csv(rows, out_dir / "curve.csv")
    plot_curves(rows, out_dir / "curve.png", title=f"{cfg.data.name}: {name} vs uniform (cross-fitted)",
                bands=["uniform"], target=float(base.mean()))
    head = next(r for r in rows if r["policy"] == name and r["budget"] == float(cfg.budget))
    summary = {
        "data": cfg.data.name, "policy": name, "utility": utility, "budget": float(cfg.budget),
        "stats": replay_stats(prompts), "accuracy": head["accuracy"], "accuracy_ci": [head["low"], head["high"]],
        "spend": head["spend"],
        "savings_vs_uniform": {"baseline_budget": float(k), "baseline_spend": base_spend.mean(),
                               **savings[name]._asdict()},
        "baselines": {b: savings[b]._asdict() for b in savings if b != name},
        "never_below_uniform": not below, "curve": rows, "chosen": curve.chosen, "table": table,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(summary, out_dir / "summary.json")
    return summary
