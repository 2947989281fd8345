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
    ratio, lo, hi = savings_at_equal_accuracy(base, 16, spend, corr, n_boot=50)
    assert ratio == pytest.approx(8.0) and lo == pytest.approx(8.0) and hi == pytest.approx(8.0)
