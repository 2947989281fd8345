"""The published baselines (ESC, Adaptive-Consistency) and the stop-and-reallocate policy, each against
an independent brute force over every sample order of small prompts, and the exact estimators."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from scrimp.ttc.allocate import decision_gain, gain_per_sample, run_policy
from scrimp.ttc.evaluate import first_success_spend, pass_at_k
from scrimp.ttc.generate import Sample


class FixedOrderGenerator:
    """Hands out each prompt's samples in exactly the given order, so that every order can be enumerated."""

    def __init__(self, orders: dict[str, list[Sample]]):
        self.orders = orders
        self.drawn = dict.fromkeys(orders, 0)

    def remaining(self, key: str) -> int:
        return len(self.orders[key]) - self.drawn[key]

    def sample(self, ids, n):
        counts = [n] * len(ids) if isinstance(n, int) else list(n)
        out = []
        for key, c in zip(ids, counts):
            start = self.drawn[key]
            assert start + c <= len(self.orders[key]), "a policy asked for more samples than were recorded"
            out.append(self.orders[key][start:start + c])
            self.drawn[key] += c
        return out


def _samples(answers, correct=None):
    correct = correct or [a == "a" for a in answers]
    return [Sample(f"t{i}", a, correct=c) for i, (a, c) in enumerate(zip(answers, correct))]


def _orders(items):
    """Every distinct order of a multiset (as tuples)."""
    return sorted(set(itertools.permutations(items)), key=repr)


def _plurality_set(answers):
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return {None}
    top = max(counts.values())
    return {a for a, v in counts.items() if v == top}


def _run_one(policy, order, budget, **params):
    gen = FixedOrderGenerator({"p": list(order)})
    return run_policy(policy, gen, ["p"], budget, seed=0, **params)


# ------------------------------------------------------------------------------------- ESC brute force


def _esc_reference(answers, window, cap):
    """ESC as its authors' code runs it (``for index in range(sc_num // slice)``): whole windows of w, at
    most floor(cap / w) of them, until one window agrees on an answer; the vote is over all drawn. The
    remainder of a cap that is not a multiple of w is never drawn."""
    drawn = 0
    for _ in range(cap // window):
        chunk = answers[drawn:drawn + window]
        drawn += window
        if chunk[0] is not None and all(a == chunk[0] for a in chunk):
            break
    return drawn, _plurality_set(answers[:drawn])


# (window, cap): caps that are multiples of the window, and caps that leave a short remainder (6 = 4 + 2,
# 5 = 2 + 2 + 1, 7 = 3 + 3 + 1), which ESC never draws.
@pytest.mark.parametrize(("window", "cap"), [(2, 6), (3, 6), (4, 6), (2, 5), (3, 7)])
def test_esc_matches_brute_force_over_every_order(window, cap):
    multiset = ("a", "a", "a", "b", "b", None, "c")[:cap]
    for order in _orders(multiset):
        out = _run_one("esc", _samples(order), cap, window=window, k_max=cap)
        spent, winners = _esc_reference(list(order), window, cap)
        assert out.spent[0] == spent and out.answers[0] in winners, order


def test_esc_refuses_a_cap_below_one_window():
    # ESC draws whole windows only: k_max=3 with windows of 5 holds none (it drew 3 and judged them).
    with pytest.raises(ValueError, match=r"k_max must be an integer >= window=5 \(or None\), got 3"):
        _run_one("esc", _samples(("a", "a", "a")), 3, k_max=3)


def test_esc_draws_a_prompt_recorded_below_one_window_whole():
    # Recorded data, not a parameter: a prompt with 3 samples and windows of 5 spends its 3 and has an answer.
    out = _run_one("esc", _samples(("b", "a", "b")), 5, window=5, k_max=40)
    assert out.spent.tolist() == [3] and out.answers == ["b"]


# -------------------------------------------------------------------------- Adaptive-Consistency brute force


def _beta_tail_exact(a: int, b: int) -> Fraction:
    """P(Beta(a, b) > 1/2) for integers: P(Binomial(a + b - 1, 1/2) <= a - 1), exactly."""
    m = a + b - 1
    return Fraction(sum(math.comb(m, j) for j in range(a)), 2**m)


def _ac_reference(answers, threshold, cap):
    """Adaptive-Consistency with a uniform prior: one sample at a time until the Beta confidence of the
    leader over the runner-up reaches the threshold (exact rational arithmetic)."""
    for drawn in range(1, cap + 1):
        top = Counter(a for a in answers[:drawn] if a is not None).most_common(2)
        v1 = top[0][1] if top else 0
        v2 = top[1][1] if len(top) > 1 else 0
        if _beta_tail_exact(v1 + 1, v2 + 1) >= Fraction(threshold):
            return drawn, _plurality_set(answers[:drawn])
    return cap, _plurality_set(answers[:cap])


def test_adaptive_consistency_matches_brute_force_over_every_order():
    multiset = ("a", "a", "a", "a", "a", "b", "b", None)
    for order in _orders(multiset):
        out = _run_one("adaptive_consistency", _samples(order), 8, threshold=0.95, k_max=8)
        spent, winners = _ac_reference(list(order), 0.95, 8)
        assert out.spent[0] == spent and out.answers[0] in winners, order


def test_baselines_are_capped_by_the_total_budget():
    # Two prompts that never agree would draw 6 each; a budget of 2 per prompt stops them at 4 in total,
    # shared equally (whole windows of 5 to one prompt would leave the other without a sample).
    orders = {k: _samples(("a", "b", "c", "d", "e", "f")) for k in ("p", "q")}
    for policy in ("esc", "adaptive_consistency"):
        out = run_policy(policy, FixedOrderGenerator(orders), ["p", "q"], 2, seed=0, k_max=6)
        assert out.spent.tolist() == [2, 2]  # an equal share each, not whole windows to one of them


# ------------------------------------------------------------------ stop_reallocate: coverage, exact


@pytest.mark.parametrize(("n", "c", "cap"), [(6, 2, 6), (6, 2, 3), (5, 1, 5), (5, 0, 4), (5, 5, 2)])
def test_stop_at_first_success_matches_the_exact_expectation_over_every_order(n, c, cap):
    # Every order of c successes among n samples: the policy spends up to its first verified success, its
    # coverage is whether one came within the cap, and the mean over all orders is the closed form.
    multiset = (True,) * c + (False,) * (n - c)
    spends, covered = [], []
    for order in _orders(multiset):
        samples = _samples(["x" if ok else f"w{i}" for i, ok in enumerate(order)], list(order))
        out = _run_one("stop_reallocate", samples, cap, utility="coverage", k_max=cap)
        first = order.index(True) + 1 if True in order[:cap] else cap
        assert out.spent[0] == first
        spends.append(out.spent[0])
        covered.append(out.answers[0] == "x")
    assert float(np.mean(spends)) == pytest.approx(first_success_spend(n, c, cap), rel=1e-12)
    assert float(np.mean(covered)) == pytest.approx(pass_at_k(n, c, cap), rel=1e-12)


def test_first_success_spend_is_refused_outside_its_domain():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        first_success_spend(5, 1, 6)
    with pytest.raises(ValueError, match="c \\(correct samples\\)"):
        first_success_spend(5, 6, 2)


# ------------------------------------------------------------- stop_reallocate: the gain and its knapsack


def _decision_gain_exact(v1: int, v2: int, lookahead: int) -> float:
    """Value of information of ``lookahead`` votes between the top two, uniform prior, in rationals."""
    a, b = v1 + 1, v2 + 1

    def beta_fn(p, q):  # B(p, q) for integers
        return Fraction(math.factorial(p - 1) * math.factorial(q - 1), math.factorial(p + q - 1))

    def right(p, q):
        c = _beta_tail_exact(p, q)
        return max(c, 1 - c)

    after = sum(math.comb(lookahead, x) * beta_fn(a + x, b + lookahead - x) / beta_fn(a, b)
                * right(a + x, b + lookahead - x) for x in range(lookahead + 1))
    return float(after - right(a, b))


@pytest.mark.parametrize(("v1", "v2"), [(0, 0), (1, 0), (1, 1), (2, 1), (3, 0), (5, 4), (7, 2), (10, 10)])
@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_decision_gain_matches_exact_rational_arithmetic(v1, v2, lookahead):
    # The quadrature of the Beta tail is accurate to ~1e-12 (stopping.beta_tail_above_half).
    assert decision_gain(v1, v2, 1.0, lookahead) == pytest.approx(_decision_gain_exact(v1, v2, lookahead), abs=1e-10)


def test_the_pool_goes_to_the_highest_gains_as_the_brute_force_knapsack_chooses():
    # Three prompts after a pilot of 2; two samples left. The round's choice must be the subset of at most
    # two open prompts with the largest summed gain, found here by trying every subset.
    pilots = {"tied": ("a", "b"), "agreed": ("a", "a"), "abstained": ("a", None)}
    orders = {k: _samples(v + ("a", "a", "a", "a")) for k, v in pilots.items()}
    ids = list(orders)
    gains = {k: gain_per_sample(orders[k][:2], 1.0) for k in ids}
    best = max((s for r in range(3) for s in itertools.combinations(ids, r)), key=lambda s: sum(gains[k] for k in s))
    out = run_policy("stop_reallocate", FixedOrderGenerator(orders), ids, 8 / 3, seed=0, threshold=0.9999, k_max=6)
    extra = {k for k, spent in zip(ids, out.spent) if spent > 2}
    assert extra == set(best) and out.spent.sum() == 8


def test_hopeless_prompts_stop_and_leave_their_budget_to_the_others():
    # "never" names a new answer every time: given up after 4 samples; "close" is contested and gets the rest.
    orders = {"never": _samples(tuple("abcdefgh")), "close": _samples(("a", "b", "a", "b", "a", "b", "a", "a"))}
    out = run_policy("stop_reallocate", FixedOrderGenerator(orders), ["never", "close"], 6, seed=0,
                     hopeless=4, threshold=0.9999, k_max=8)
    assert out.spent.tolist() == [4, 8] and out.info["stopped"].get("hopeless") == 1


@pytest.mark.parametrize("bad", [{"price": -0.1}, {"hopeless": -1}, {"hopeless": 2.5}, {"threshold": 1.0}])
def test_stop_reallocate_refuses_bad_parameters_in_one_sentence(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{key} must be"):
        run_policy("stop_reallocate", FixedOrderGenerator({"p": _samples(("a",) * 4)}), ["p"], 4, **bad)


def test_published_baseline_defaults_have_one_source():
    # The papers' values (ESC: windows of 5, cap 40 in its last-letters script; Adaptive-Consistency: Beta
    # rule with a uniform prior, threshold 0.95, cap 40), written once: the signatures. The run and the
    # policy configs read them there, so a config that restated them could drift from the policy.
    from pathlib import Path

    import yaml

    from scrimp.ttc.allocate import published_params
    from scrimp.ttc.run import BASELINE_PARAMS

    papers = {"esc": {"window": 5, "k_max": 40}, "adaptive_consistency": {"threshold": 0.95, "prior": 1.0, "k_max": 40}}
    assert {name: published_params(name) for name in papers} == papers == BASELINE_PARAMS
    conf = Path(__file__).resolve().parents[2] / "conf" / "ttc" / "policy"
    for name in papers:
        assert yaml.safe_load((conf / f"{name}.yaml").read_text())["params"] == {}, name
