"""scrimp.allocators.utility against 200k-draw Monte Carlo (within 3 standard errors), plus bad inputs."""

import numpy as np
import pytest

from scrimp.allocators.utility import (
    coverage,
    majority,
    majority_poissonized,
    nonzero_gradient,
    variance_reduction,
)

DRAWS = 200_000


def assert_within_3se(estimate_samples, value):
    mean = estimate_samples.mean()
    se = estimate_samples.std(ddof=1) / np.sqrt(estimate_samples.size)
    assert abs(mean - value) <= 3 * se + 1e-12, (mean, value, se)


@pytest.mark.parametrize(("k", "p"), [(1, 0.3), (4, 0.1), (8, 0.05), (16, 0.02), (3, 0.9)])
def test_coverage_and_nonzero_gradient_match_monte_carlo(k, p):
    rng = np.random.default_rng(k)
    successes = rng.binomial(k, p, size=DRAWS)
    assert_within_3se((successes > 0).astype(float), float(coverage(k, p)))
    mixed = ((successes > 0) & (successes < k)).astype(float)
    assert_within_3se(mixed, float(nonzero_gradient(k, p)))
    assert_within_3se(mixed * p * (1 - p) ** 2, float(nonzero_gradient(k, p, weighted=True)))


@pytest.mark.parametrize(("k", "sigma2"), [(1, 2.0), (2, 0.5), (10, 3.0)])
def test_variance_reduction_matches_monte_carlo(k, sigma2):
    rng = np.random.default_rng(k)
    means = rng.normal(0.0, np.sqrt(sigma2), size=(DRAWS, k)).mean(axis=1)
    assert_within_3se(sigma2 - means**2, float(variance_reduction(k, sigma2)))


def monte_carlo_majority(k, probs, correct, rng):
    counts = rng.multinomial(k, probs, size=DRAWS)
    top = counts.max(axis=1, keepdims=True)
    tied = (counts == top).sum(axis=1)
    return np.where(counts[:, correct] == top[:, 0], 1.0 / tied, 0.0)  # uniform tie-break, in expectation


@pytest.mark.parametrize(
    ("k", "probs", "correct"),
    [(2, [0.5, 0.3, 0.2], 0), (5, [0.4, 0.35, 0.25], 0), (8, [0.3, 0.4, 0.2, 0.1], 0), (12, [0.3, 0.4, 0.2, 0.1], 2)],
)
def test_majority_exact_matches_monte_carlo(k, probs, correct):
    rng = np.random.default_rng(k)
    value = float(majority(k, np.array(probs), correct_index=correct))
    assert_within_3se(monte_carlo_majority(k, np.array(probs), correct, rng), value)


def test_majority_is_not_concave_in_k():
    values = majority(np.arange(1, 7), np.array([0.6, 0.4]))
    steps = np.diff(values)
    assert np.any(steps[1:] > steps[:-1] + 1e-9)  # parity: k=2 adds nothing over k=1, k=3 does


def test_majority_large_k_approximation_error_is_small():
    # Measured documented error of the Poissonized approximation: Monte Carlo at k = 150 (above the exact range),
    # and the exact table at k = 64 (where both are available).
    probs = np.array([0.4, 0.35, 0.25])
    rng = np.random.default_rng(0)
    samples = monte_carlo_majority(150, probs, 0, rng)
    se = samples.std(ddof=1) / np.sqrt(DRAWS)
    assert abs(samples.mean() - float(majority(150, probs))) <= 3 * se + 0.005
    exact64 = float(majority(64, probs))
    assert abs(float(majority_poissonized(np.array([64.0]), probs[None], 0)[0]) - exact64) <= 0.005


def test_utilities_broadcast_over_items_and_k():
    p = np.array([0.1, 0.5, 0.9])[:, None]
    k = np.arange(0, 5)[None, :]
    assert coverage(k, p).shape == (3, 5)
    assert nonzero_gradient(k, p).shape == (3, 5)
    probs = np.array([[0.6, 0.4], [0.2, 0.8]])
    out = majority(k, probs[:, None, :])
    assert out.shape == (2, 5) and np.all(out[:, 0] == 0)
    # Each row agrees with the scalar evaluation.
    assert out[1, 3] == pytest.approx(float(majority(3, probs[1])))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: coverage(2, 1.5), r"p must be probabilities in \[0, 1\]"),
        (lambda: nonzero_gradient(2, -0.1), r"p must be probabilities in \[0, 1\]"),
        (lambda: coverage(2, float("nan")), "no NaN"),
        (lambda: coverage(-1, 0.5), "k must be integer sample counts >= 0"),
        (lambda: variance_reduction(0, 1.0), "k must be integer sample counts >= 1"),
        (lambda: majority(3, np.array([0.5, 0.2])), "sum to 1"),
        (lambda: majority(3, np.array([0.5, 0.5]), correct_index=4), "correct_index"),
    ],
)
def test_bad_inputs_get_one_clear_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def enumerated_majority(k, probs, correct):
    """Independent reference: sum over every multinomial count vector, ties split uniformly."""
    import itertools
    import math

    total = 0.0
    for counts in itertools.product(range(k + 1), repeat=len(probs)):
        if sum(counts) != k:
            continue
        pmf = math.factorial(k)
        for c, q in zip(counts, probs):
            pmf *= q**c / math.factorial(c)
        top = max(counts)
        if counts[correct] == top:
            total += pmf / counts.count(top)
    return total


@pytest.mark.parametrize("k", [1, 2, 3, 6, 9])
def test_majority_equals_enumeration_over_count_vectors(k):
    probs = [0.35, 0.3, 0.2, 0.15, 0.0]
    for correct in (0, 2, 4):
        assert float(majority(k, np.array(probs), correct_index=correct)) == pytest.approx(
            enumerated_majority(k, probs, correct), abs=1e-12
        )


@pytest.mark.parametrize(("call", "message"), [
    (lambda: majority(3, np.array([0.5, 0.5]), correct_index=0.5), "correct_index must be an integer index"),
    (lambda: majority(3, np.array([0.5, 0.5]), correct_index=True), "correct_index must be an integer index"),
    (lambda: variance_reduction([[2]], [[np.inf]]), "sigma2 must be finite non-negative variances"),  # was nan
    (lambda: majority(3, np.array([0.5, 0.5]), exact_max_k=-1), "exact_max_k must be an integer >= 0"),
])
def test_more_bad_inputs_get_one_clear_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call()
