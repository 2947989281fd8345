"""scrimp.allocators.knapsack against brute force on random small instances, plus bad inputs."""

import itertools
import re

import numpy as np
import pytest

from scrimp.allocators import allocate_counts, solve
from scrimp.allocators.utility import coverage, majority


def brute_force(costs, values, budget, lo=None, hi=None):
    best, best_choice = -np.inf, None
    ranges = [range(len(c)) if lo is None else range(lo[i], hi[i] + 1) for i, c in enumerate(costs)]
    for choice in itertools.product(*ranges):
        cost = sum(costs[i][j] for i, j in enumerate(choice))
        if cost <= budget:
            value = sum(values[i][j] for i, j in enumerate(choice))
            if value > best:
                best, best_choice = value, choice
    return best, best_choice


def is_concave(costs, values) -> bool:
    """Independent check: every item's undominated options have non-increasing slopes."""
    for c, v in zip(costs, values):
        pts = sorted(set(zip(c, v)))
        front = [(ci, vi) for ci, vi in pts if not any((cj <= ci and vj >= vi) and (cj, vj) != (ci, vi) for cj, vj in pts)]
        for (c0, v0), (c1, v1), (c2, v2) in zip(front, front[1:], front[2:]):
            if (v1 - v0) / (c1 - c0) < (v2 - v1) / (c2 - c1) - 1e-12:
                return False
    return True


def random_instance(rng, concave: bool):
    costs, values = [], []
    for _ in range(int(rng.integers(1, 7))):
        m = int(rng.integers(1, 6))
        if concave:  # consecutive integer costs, decreasing increments (some negative: a peak)
            c = int(rng.integers(0, 3)) + np.arange(m)
            v = rng.random() + np.concatenate([[0.0], np.cumsum(np.sort(rng.random(m - 1) * 2 - 0.5)[::-1])])
        else:  # arbitrary costs (repeats allowed); values convex-ish plus noise, so usually non-concave
            c = rng.integers(0, 6, size=m)
            v = 0.2 * c**2 + rng.random(m)
        costs.append([int(x) for x in c])
        values.append([float(x) for x in v])
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    return costs, values, int(rng.integers(lo, hi + 2))


def test_500_random_instances_against_brute_force():
    rng = np.random.default_rng(1234)
    n_nonconcave = 0
    for trial in range(500):
        concave = trial % 2 == 0
        costs, values, budget = random_instance(rng, concave)
        opt, _ = brute_force(costs, values, budget)
        dp = solve(costs, values, budget, method="dp")
        greedy = solve(costs, values, budget, method="greedy")
        lagrange = solve(costs, values, budget, method="lagrange")
        auto = solve(costs, values, budget)
        for alloc in (dp, greedy, lagrange, auto):
            picked_cost = sum(costs[i][j] for i, j in enumerate(alloc.choice))
            picked_value = sum(values[i][j] for i, j in enumerate(alloc.choice))
            assert picked_cost == alloc.cost <= budget
            assert picked_value == pytest.approx(alloc.value, abs=1e-9)
            assert alloc.bound >= opt - 1e-9  # every bound is certified
            if alloc.optimal:
                assert alloc.value == pytest.approx(opt, abs=1e-9)
        assert dp.optimal and dp.value == pytest.approx(opt, abs=1e-9)
        if concave:
            assert is_concave(costs, values)
            assert greedy.optimal and greedy.value == pytest.approx(opt, abs=1e-9)
        elif not is_concave(costs, values):
            n_nonconcave += 1
            assert not greedy.optimal
        assert auto.value == pytest.approx(opt, abs=1e-9)
    assert n_nonconcave >= 100  # the random half is mostly non-concave: the check above is exercised


def test_greedy_claims_optimal_only_on_concave_items():
    # Two items; item 0 is convex (0 -> 0.1 -> 1.0): greedy's hull skips cost 1 and must not claim optimality.
    costs = [[0, 1, 2], [0, 1]]
    values = [[0.0, 0.1, 1.0], [0.0, 0.3]]
    greedy = solve(costs, values, 2, method="greedy")
    assert not greedy.optimal
    assert greedy.bound >= brute_force(costs, values, 2)[0]


def test_min_and_max_choice_restrict_the_options():
    rng = np.random.default_rng(7)
    for _ in range(60):
        costs, values, _ = random_instance(rng, concave=False)
        lo = [int(rng.integers(0, len(c))) for c in costs]
        hi = [int(rng.integers(lo_i, len(c))) for lo_i, c in zip(lo, costs)]
        need = sum(min(c[lo[i] : hi[i] + 1]) for i, c in enumerate(costs))
        budget = need + int(rng.integers(0, 6))
        opt, _ = brute_force(costs, values, budget, lo, hi)
        for method in ("dp", "auto"):
            alloc = solve(costs, values, budget, min_choice=lo, max_choice=hi, method=method)
            assert np.all(alloc.choice >= lo) and np.all(alloc.choice <= hi)
            assert alloc.value == pytest.approx(opt, abs=1e-9)


def test_dense_arrays_match_lists_and_methods_agree_on_a_medium_concave_instance():
    rng = np.random.default_rng(3)
    p = rng.random((300, 1))
    k = np.arange(1, 33)[None, :]
    values = coverage(k, p)
    costs = np.broadcast_to(k, values.shape)
    dp = solve(costs, values, 3000, method="dp")
    greedy = solve(costs, values, 3000, method="greedy")
    listed = solve(costs.tolist(), values.tolist(), 3000, method="greedy")
    assert greedy.optimal and greedy.value == pytest.approx(dp.value, rel=1e-12)
    assert listed.value == pytest.approx(dp.value, rel=1e-12)
    lag = solve(costs, values, 3000, method="lagrange")
    assert lag.bound >= dp.value - 1e-9 and lag.value <= dp.value + 1e-9


def test_allocate_counts_matches_brute_force_on_majority():
    probs = np.array([[0.5, 0.3, 0.2], [0.35, 0.4, 0.25], [0.7, 0.2, 0.1]])
    budget, k_max = 9, 5
    alloc = allocate_counts(lambda k, q: majority(k, q[:, None, :]), probs, budget, k_min=1, k_max=k_max)
    table = majority(np.arange(1, k_max + 1)[None, :], probs[:, None, :])
    opt, choice = brute_force([list(range(1, k_max + 1))] * 3, table.tolist(), budget)
    assert alloc.value == pytest.approx(opt, abs=1e-12)
    assert alloc.counts.sum() <= budget and np.all(alloc.counts >= 1)
    assert alloc.value == pytest.approx(table[np.arange(3), alloc.counts - 1].sum())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(costs=[[1, -2]], values=[[0.1, 0.2]], budget=3), ValueError, "non-negative integers"),
        (dict(costs=[[1, 2.5]], values=[[0.1, 0.2]], budget=3), ValueError, "non-negative integers"),
        (dict(costs=[[1, 2], [1]], values=[[0.1, 0.2], [0.1, 0.3]], budget=3), ValueError, "must match item by item"),
        (dict(costs=[[1, 2]], values=[[0.1, 0.2], [0.3]], budget=3), ValueError, "same number of items"),
        (dict(costs=[[3, 4], [2, 5]], values=[[0, 1], [0, 1]], budget=4), ValueError, "by 1"),
        (dict(costs=[[1, 2]], values=[[0.1, float("nan")]], budget=3), ValueError, "NaN"),
        (dict(costs=[[1, 2]], values=[[0.1, 0.2]], budget=3, method="magic"), ValueError, "method must be"),
        (dict(costs=[[1, 2]], values=[[0.1, 0.2]], budget=3, max_choice=[5]), ValueError, "max_choice"),
        (dict(costs=[[]], values=[[]], budget=3), ValueError, "no options"),
    ],
)
def test_bad_inputs_get_one_clear_sentence(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        solve(**kwargs)


def test_allocate_counts_rejects_transposed_parameters():
    p = np.array([0.2, 0.5, 0.9])  # (n,) instead of (n, 1): utility returns (1, n) for k of shape (1, 1)
    with pytest.raises(ValueError, match="n_items, 1"):
        allocate_counts(coverage, p, budget=10)


def test_lagrange_and_auto_on_a_medium_non_concave_instance():
    # Majority-vote values are not concave in k (parity); dp is exact, lagrange bounds it from above.
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(3), size=40)
    k = np.arange(1, 17)[None, :]
    values = majority(k, probs[:, None, :])
    costs = np.broadcast_to(k, values.shape)
    dp = solve(costs, values, 200, method="dp")
    lag = solve(costs, values, 200, method="lagrange")
    greedy = solve(costs, values, 200, method="greedy")
    auto = solve(costs, values, 200)
    assert lag.cost <= 200 and lag.value <= dp.value + 1e-12 <= lag.bound + 2e-12
    assert greedy.value <= dp.value + 1e-12 <= greedy.bound + 2e-12 and not greedy.optimal
    assert auto.method == "dp" and auto.value == pytest.approx(dp.value, abs=1e-12)


def test_allocate_counts_with_k_max_zero_gives_nothing():
    # The utility is only defined for k in [0, k_max] = [0, 0]: it must not be probed at k = 1.
    values = np.array([[0.3], [0.6]])
    alloc = allocate_counts(lambda k, v: v[:, k[0]], values, 5, k_min=0, k_max=0)
    assert list(alloc.counts) == [0, 0]


def test_costs_whose_int64_sum_would_wrap_around_are_refused():
    # 2**62 + 2**62 wrapped to -2**63 and the solver returned an infeasible choice
    with pytest.raises(ValueError, match=r"costs must add up to less than 2\*\*63"):
        solve([[2**62], [2**62]], [[0.2], [0.5]], 2**63 - 1)
    with pytest.raises(ValueError, match=r"costs must add up to less than 2\*\*63"):
        solve(np.array([[0, 2**63]], dtype=np.uint64), np.array([[0.1, 0.2]]), 5)
    alloc = solve([[2**61, 1], [2**61]], [[0.9, 0.1], [0.5]], 2**62)  # large but summable: still solved
    assert list(alloc.choice) == [0, 0] and alloc.cost == 2**62


def test_choice_bounds_of_the_wrong_length_are_one_sentence():
    with pytest.raises(ValueError, match=r"max_choice must be one option index or one per item, 2 in all; got shape \(3,\)"):
        solve([[1, 2], [1, 2]], [[0.1, 0.2], [0.1, 0.3]], 4, max_choice=[0, 1, 1])  # was a NumPy broadcast error


def test_allocate_counts_names_the_real_problem():
    p = np.array([[0.5], [0.2]])
    with pytest.raises(ValueError, match=r"budget 1 is below the sum of the items' minimum costs \(2"):
        allocate_counts(coverage, p, 1)  # said "k_max must be an integer >= k_min=1; got 0"
    # the default k_max is the budget: 10**9 samples per item tried to allocate 7.45 GiB
    with pytest.raises(ValueError, match="k_max was not given .* GiB; pass k_max"):
        allocate_counts(coverage, p, 10**9)
    assert list(allocate_counts(coverage, p, 10**9, k_max=4).counts) == [4, 4]
    with pytest.raises(ValueError, match="budget must be an integer >= 0, got True"):
        allocate_counts(coverage, p, True)
    with pytest.raises(ValueError, match=r"k_max must be an integer >= k_min=1 \(or None\), got 0"):
        allocate_counts(coverage, p, 5, k_max=0)
    assert allocate_counts(coverage, p, np.int64(6), k_max=np.int64(3)).counts.sum() == 6
