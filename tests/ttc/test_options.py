"""Options (strategy, n) as knapsack items: brute force over every combination on small cases, exact
values, token pricing, and an end-to-end run through the strategies with exact costs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from scrimp.ttc.options import (
    Option,
    choose_options,
    majority_values,
    option_costs,
    run_options,
    verifier_values,
)
from scrimp.ttc.verify import ExactMatchScorer

from .synthetic import SyntheticGenerator

OPTIONS = [Option("majority", 1), Option("majority", 3), Option("majority", 5), Option("best_of_n", 2),
           Option("best_of_n", 4)]


def _brute_force(values, costs, budget):
    best = -np.inf
    for pick in itertools.product(*[range(values.shape[1])] * values.shape[0]):
        rows = range(values.shape[0])
        if any(np.isnan(values[i, j]) for i, j in zip(rows, pick)):
            continue
        if sum(costs[i, j] for i, j in zip(rows, pick)) <= budget:
            best = max(best, sum(values[i, j] for i, j in zip(rows, pick)))
    return best


def _values(probs, p_verified):
    v = majority_values(OPTIONS, probs)
    w = verifier_values(OPTIONS, p_verified)
    return np.where(np.isnan(v), w, v)


@pytest.mark.parametrize("budget", [3, 6, 9, 14, 40])
def test_chosen_options_are_the_brute_force_optimum(budget):
    probs = np.array([[0.6, 0.4, 0.0], [0.45, 0.35, 0.2], [0.9, 0.1, 0.0]])
    values = _values(probs, probs[:, 0])
    tokens = np.array([10.0, 30.0, 5.0])  # the second prompt's solutions run three times longer
    # priced in samples, and in tokens (units of 5 tokens, with three times the budget)
    for costs, cap in ((option_costs(OPTIONS, prompts=3), budget), (option_costs(OPTIONS, tokens) // 5, 3 * budget)):
        plan = choose_options(values, costs, cap)
        chosen = values[np.arange(3), plan.choice].sum()
        assert costs[np.arange(3), plan.choice].sum() <= cap
        assert chosen == pytest.approx(_brute_force(values, costs, cap), abs=1e-12)


def test_majority_values_are_exact_enumerations():
    # maj@3 with answers a (correct, 0.5), b (0.3), c (0.2), ties split: enumerate all 27 draws.
    probs = np.array([[0.5, 0.3, 0.2]])
    exact = 0.0
    for draw in itertools.product(range(3), repeat=3):
        counts = np.bincount(draw, minlength=3)
        top = counts.max()
        if counts[0] == top:
            exact += np.prod(probs[0, list(draw)]) / np.sum(counts == top)
    assert majority_values([Option("majority", 3)], probs)[0, 0] == pytest.approx(exact, abs=1e-12)


def test_token_pricing_moves_compute_away_from_long_solutions():
    # Two prompts of equal value curves; the long one pays 4x per sample, so it gets the cheaper option.
    values = _values(np.array([[0.55, 0.45, 0.0]] * 2), np.array([0.55, 0.55]))
    costs = option_costs(OPTIONS, np.array([100.0, 400.0]))
    plan = choose_options(values, costs, 2000)
    assert OPTIONS[plan.choice[0]].n >= OPTIONS[plan.choice[1]].n


def test_run_options_spends_exactly_what_it_priced():
    gen = SyntheticGenerator({"42": 0.5, "7": 0.3, "8": 0.2}, seed=0)
    chosen = [Option("majority", 3), Option("best_of_n", 4)]
    results = run_options(gen, ["q1", "q2"], chosen, scorer=ExactMatchScorer({"q1": "42", "q2": "42"}),
                          rng=np.random.default_rng(0))
    assert [r.cost.samples for r in results] == [3, 4] and gen.calls["samples"] == 7
    assert sum(r.cost.tokens for r in results) == gen.calls["tokens"]
    assert results[1].cost.verifier_calls == 4


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Option("beam", 4), "strategy must be one of"),
    (lambda: Option("majority", 0), "n must be an integer >= 1"),
    (lambda: option_costs(OPTIONS, np.array([10.0, -1.0])), "tokens_per_sample must hold"),
    (lambda: choose_options(np.full((1, 2), np.nan), np.ones((1, 2), dtype=int), 5), "every prompt needs"),
    (lambda: run_options(SyntheticGenerator({"a": 1.0}), ["q"], [Option("best_of_n", 2)]), "need a scorer"),
])
def test_bad_options_are_one_sentence(make, message):
    with pytest.raises(ValueError, match=message):
        make()
