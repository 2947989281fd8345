"""Honest estimates: uniform replayed against its own exact curve, intervals that carry the replay-order
noise, and the comparison table of the run (uniform, the published baselines and the policy)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from scrimp.ttc.crossfit import replay_run, uniform_exact, uniform_spend
from scrimp.ttc.evaluate import bootstrap_ci_orders, savings_at_equal_accuracy
from scrimp.ttc.replay import load_replay, shared_data_dir
from scrimp.ttc.run import run

AQUA = shared_data_dir() / "ttc" / "pot_aqua_codex_sc30.jsonl"
GAME24 = shared_data_dir() / "ttc" / "game24_gpt4_cot_t0.7.jsonl"


def _cfg(*overrides):
    conf = Path(__file__).resolve().parents[2] / "conf" / "ttc"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_uniform_replayed_against_its_own_exact_curve_saves_1x_within_its_interval():
    # The hard regime (AQuA, flat curve between 8 and 30 samples), where a noisy replay made uniform appear
    # to save 1.26x against itself. 20 orders; the interval must hold 1.00.
    prompts = load_replay(AQUA)
    budgets = [4, 8, 12, 16, 20, 24]
    runs = [replay_run(prompts, "uniform", b, {}, repeats=20, seed=0, per_order=True) for b in budgets]
    correct, spent = np.stack([c for c, _ in runs], 1), np.stack([s for _, s in runs], 1)
    savings = savings_at_equal_accuracy(uniform_exact(prompts, 16), uniform_spend(prompts, 16), spent, correct,
                                        n_boot=500, seed=0)
    assert savings.reached and savings.low <= 1.0 <= savings.high, savings


def test_interval_over_prompts_of_order_means_carries_the_order_noise():
    # Every prompt has the same true accuracy 1/2, so all the spread is replay-order noise: the true standard
    # error of the mean of 200 prompts x 20 orders is 0.5 / sqrt(4000). The interval's half-width must be
    # 1.96 of it, within 20% (the sampling error of a standard deviation from 200 prompts is 5%, that of the
    # bootstrap quantiles with 2000 resamples about 3%: 20% is over three of their combined sigmas).
    rng = np.random.default_rng(0)
    per_order = rng.integers(0, 2, size=(200, 20)).astype(float)
    est, lo, hi = bootstrap_ci_orders(per_order, n_boot=2000, seed=1)
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.5 / np.sqrt(4000), rel=0.2)
    assert lo <= est <= hi


def test_the_run_table_shows_uniform_and_the_published_baselines_with_the_chosen_budget(tmp_path):
    cfg = _cfg("data=replay_file", f"data.path={AQUA}", "policy=stop_reallocate", "budget=4", "curve_budgets=[2,4,8]",
               "repeats=2", "tune_repeats=1", "n_boot=100", "policy.space={threshold:[0.9]}")
    summary = run(cfg, tmp_path)
    table = "\n".join(summary["table"])
    for policy in ("uniform", "esc (published)", "adaptive_consistency (published)", "stop_reallocate"):
        assert f"| {policy} | **4 (chosen)** |" in table
    assert "| esc (published) | none (cap 40) |" in table and "savings at equal accuracy vs uniform@16" in table
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["baselines"]) == {"esc (published)", "adaptive_consistency (published)"}
    assert saved["spend"] <= 4


def test_game_of_24_runs_as_coverage_with_a_verifier(tmp_path):
    # Verifier-based selection: uniform is pass@k, exactly; the policy stops each puzzle at its first success.
    # With the cap at the budget (k_max=8) nothing is reallocated, so the mean spend must match the exact
    # E[min(T, 8)] within four standard errors computed from the exact per-puzzle variances.
    from scrimp.ttc.evaluate import first_success_spend

    repeats = 8
    cfg = _cfg("data=replay_file", f"data.path={GAME24}", "policy=stop_reallocate", "utility=coverage", "budget=8",
               "curve_budgets=[4,8]", "baseline_budget=8", f"repeats={repeats}", "tune_repeats=1", "n_boot=100",
               "policy.space={hopeless:[0]}", "+policy.params.k_max=8")
    summary = run(cfg, tmp_path)
    prompts = load_replay(GAME24)
    uniform8 = next(r for r in summary["curve"] if r["policy"] == "uniform" and r["budget"] == 8)
    assert uniform8["accuracy"] == pytest.approx(uniform_exact(prompts, 8, "coverage").mean(), abs=1e-12)
    mean, var = 0.0, 0.0
    for p in prompts:
        n, c = len(p.samples), sum(bool(s.correct) for s in p.samples)
        tail = [math.comb(n - c, t) / math.comb(n, t) for t in range(8)]  # P(T > t)
        first, second = sum(tail), sum((2 * t + 1) * q for t, q in enumerate(tail))  # E[X], E[X^2]
        assert first == pytest.approx(first_success_spend(n, c, 8), rel=1e-12)
        mean += first / len(prompts)
        var += (second - first**2) / len(prompts) ** 2
    assert summary["spend"] == pytest.approx(mean, abs=4 * math.sqrt(var / repeats))
    assert not any("published" in r["policy"] for r in summary["curve"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["utility=bogus"], "utility must be one of"),
    (["policy=compute_optimal", "utility=coverage"], "utility=coverage needs a policy that selects with a verifier"),
    (["policy=esc", "utility=coverage"], "esc votes only"),
    (["policy=stop_reallocate", "policy.space={price:[-1]}"], "price must be a finite number >= 0, got -1"),
])
def test_bad_run_settings_are_one_sentence_before_any_data_is_read(tmp_path, overrides, message):
    cfg = _cfg("data=replay_file", "data.path=/nonexistent/never_read.jsonl", *overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path)
