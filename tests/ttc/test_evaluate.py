import itertools
import math
from collections import Counter

import numpy as np
import pytest

from scrimp.ttc.evaluate import bootstrap_ci, budget_to_reach, maj_at_k, pass_at_k, savings_at_equal_accuracy


def _brute_maj(answers, correct, k):
    total = 0.0
    subsets = list(itertools.combinations(range(len(answers)), k))
    for s in subsets:
        c = Counter(answers[i] for i in s if answers[i] is not None)
        if c:
            top = max(c.values())
            winners = [a for a, v in c.items() if v == top]
            total += (correct in winners) / len(winners)
    return total / len(subsets)


def test_maj_at_k_equals_enumeration():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n = int(rng.integers(1, 10))
        answers = [[None, "a", "b", "c"][int(i)] for i in rng.integers(0, 4, n)]
        k = int(rng.integers(1, n + 1))
        assert maj_at_k(answers, "a", k) == pytest.approx(_brute_maj(answers, "a", k), abs=1e-12)


def test_maj_at_k_with_several_correct_answers_equals_enumeration():
    # A grader may accept several strings ("0.5" and "1/2"): the vote is right when it elects any.
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = int(rng.integers(1, 9))
        answers = [[None, "a", "b", "c", "d"][int(i)] for i in rng.integers(0, 5, n)]
        k = int(rng.integers(1, n + 1))
        brute = 0.0
        subsets = list(itertools.combinations(range(n), k))
        for sub in subsets:
            c = Counter(answers[i] for i in sub if answers[i] is not None)
            if c:
                winners = [a for a, v in c.items() if v == max(c.values())]
                brute += sum(w in {"a", "b"} for w in winners) / len(winners)
        assert maj_at_k(answers, {"a", "b"}, k) == pytest.approx(brute / len(subsets), abs=1e-12)


def test_pass_at_k_equals_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                flags = [1] * c + [0] * (n - c)
                brute = np.mean([any(flags[i] for i in s) for s in itertools.combinations(range(n), k)])
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_bootstrap_interval_covers_and_shrinks():
    x = np.random.default_rng(1).random(400) < 0.7
    est, lo, hi = bootstrap_ci(x, n_boot=500)
    se = math.sqrt(0.21 / 400)
    assert lo < est < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_budget_to_reach_and_savings():
    assert budget_to_reach(np.array([1, 2, 4]), np.array([0.5, 0.7, 0.9]), 0.8) == pytest.approx(3.0)
    assert budget_to_reach(np.array([1, 2]), np.array([0.5, 0.6]), 0.8) == math.inf
    base = np.full(50, 0.8)
    spend = np.tile([1.0, 2.0, 4.0], (50, 1))
    corr = np.tile([0.6, 0.8, 0.9], (50, 1))
    s = savings_at_equal_accuracy(base, 16, spend, corr, n_boot=50)
    assert s.ratio == pytest.approx(8.0) and s.low == pytest.approx(8.0) and s.high == pytest.approx(8.0)
    assert s.reached and s.censored == 0.0 and not s.low_is_upper_bound


def test_savings_interval_with_censored_resamples():
    # The policy's last point has exactly the baseline's accuracy, on other prompts: about half of the
    # paired resamples reach their target, the others do not (censored).
    rng = np.random.default_rng(3)
    n = 60
    base = rng.random(n) < 0.8
    other = rng.permutation(base).astype(float)
    spend = np.tile([1.0, 2.0, 4.0], (n, 1))
    corr = np.stack([0.5 * other, 0.9 * other, other], axis=1)
    got = savings_at_equal_accuracy(base.astype(float), 16, spend, corr, n_boot=300, seed=5)
    # reference: the same resamples, each solved by interpolating the resampled curve by hand
    draws = np.random.default_rng(5)
    values, hit = [], []
    for _ in range(300):
        idx = draws.integers(0, n, n)
        target, curve = base[idx].mean(), corr[idx].mean(0)
        reach = [j for j in range(3) if curve[j] >= target - 1e-12]
        if not reach:
            values.append(16 / 4.0)
            hit.append(False)
            continue
        j = reach[0]
        need = 1.0 if j == 0 else np.interp(target, curve[j - 1 : j + 1], spend[0, j - 1 : j + 1])
        values.append(16 / need)
        hit.append(True)
    values, hit = np.array(values), np.array(hit)
    assert 0.2 < got.censored == pytest.approx(1 - hit.mean()) and got.reached and got.ratio == pytest.approx(4.0)
    assert got.low == pytest.approx(np.quantile(values, 0.025)) and got.high == pytest.approx(np.quantile(values, 0.975))
    assert got.low_is_upper_bound == bool(np.any(~hit & (values >= got.low - 1e-12)))
    assert got.low >= 16 / 4.0 - 1e-12  # never the meaningless 0x
    never = savings_at_equal_accuracy(np.ones(n), 16, spend, corr * 0.5, n_boot=50)
    assert not never.reached and never.ratio == pytest.approx(4.0) and never.low_is_upper_bound
    assert str(never).startswith("<4.00x")


def test_savings_use_the_baseline_s_real_spend_and_are_undefined_at_zero_accuracy():
    rng = np.random.default_rng(0)
    base = rng.random(50)
    spend = np.tile([2.0, 4.0, 8.0], (50, 1))
    correct = np.column_stack([base * 0.5, base, base])  # reaches the baseline's accuracy at spend 4
    per_prompt = np.where(np.arange(50) < 25, 16.0, 4.0)  # half the prompts recorded only 4 samples
    ragged = savings_at_equal_accuracy(base, per_prompt, spend, correct, n_boot=50)
    assert ragged.reached and ragged.ratio == pytest.approx(per_prompt.mean() / 4)
    assert savings_at_equal_accuracy(base, 10.0, spend, correct, n_boot=50).ratio == pytest.approx(10 / 4)
    never = savings_at_equal_accuracy(np.zeros(50), 16.0, spend, correct, n_boot=50)
    assert math.isnan(never.ratio) and "n/a" in str(never)


def test_savings_interval_leaves_out_resamples_whose_baseline_is_never_right():
    base = np.zeros(100)
    base[0] = 1.0  # one prompt right: many bootstrap resamples miss it and have no accuracy to match
    spend = np.tile([2.0, 4.0], (100, 1))
    correct = np.column_stack([base, base])
    got = savings_at_equal_accuracy(base, 8.0, spend, correct, n_boot=200)
    assert got.ratio == pytest.approx(4.0) and math.isfinite(got.low) and math.isfinite(got.high)


def test_n_boot_must_be_a_positive_integer():
    x = np.linspace(0, 1, 20)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1, got 0"):
        bootstrap_ci(x, n_boot=0)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1, got 0"):  # "not enough values to unpack"
        savings_at_equal_accuracy(x, 4, np.ones((20, 2)), np.ones((20, 2)), n_boot=0)
