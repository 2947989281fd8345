"""scrimp.allocators.posterior: closed forms against numeric integration and Monte Carlo."""

import numpy as np
import pytest

from scrimp.allocators import allocate_counts
from scrimp.allocators.posterior import BetaPosterior, DirichletPosterior
from scrimp.allocators.utility import coverage, nonzero_gradient


def beta_expectation_by_midpoint_rule(fn, a, b, n=200_000):
    """Independent reference: p = (1 - cos(pi t)) / 2 removes the endpoint singularities, then a midpoint rule."""
    t = (np.arange(n) + 0.5) / n
    p = 0.5 * (1.0 - np.cos(np.pi * t))
    jac = 0.5 * np.pi * np.sin(np.pi * t)
    density = np.exp((a - 1) * np.log(p) + (b - 1) * np.log1p(-p)) * jac
    return float(np.sum(fn(p) * density) / np.sum(density))


@pytest.mark.parametrize(("s", "f"), [(0, 4), (3, 1), (10, 0), (2, 30), (0, 0)])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_expected_coverage_matches_numeric_integration(s, f, k):
    post = BetaPosterior(s, f)  # Jeffreys prior: singular density at an end for s = 0 or f = 0
    closed = float(post.expected_coverage(k))
    reference = beta_expectation_by_midpoint_rule(lambda p: coverage(k, p), post.alpha, post.beta)
    assert closed == pytest.approx(reference, abs=2e-6)
    assert float(post.expected(coverage, k)) == pytest.approx(closed, abs=1e-10)  # Gauss-Jacobi, exact here


def test_expected_weighted_nonzero_gradient_matches_numeric_integration():
    post = BetaPosterior(np.array([1, 5]), np.array([3, 2]), prior=(1.0, 1.0))
    quad = post.expected(lambda k, p: nonzero_gradient(k, p, weighted=True), 8)
    for i in range(2):
        ref = beta_expectation_by_midpoint_rule(
            lambda p: nonzero_gradient(8, p, weighted=True), post.alpha[i], post.beta[i]
        )
        assert quad[i] == pytest.approx(ref, abs=1e-7)


def test_expected_coverage_matches_posterior_monte_carlo():
    post = BetaPosterior(np.array([0, 2, 7]), np.array([5, 2, 1]))
    rng = np.random.default_rng(0)
    p = rng.beta(post.alpha, post.beta, size=(200_000, 3))
    draws = 1 - (1 - p) ** 6
    se = draws.std(axis=0, ddof=1) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(draws.mean(axis=0) - post.expected_coverage(6)) <= 3 * se)


def multinomial_rows(rng, k, p):
    """One multinomial draw of k per row of p, vectorized by sequential binomials."""
    counts = np.zeros(p.shape, dtype=np.int64)
    left = np.full(p.shape[0], k)
    rest = np.ones(p.shape[0])
    for j in range(p.shape[1] - 1):
        q = np.clip(p[:, j] / np.maximum(rest, 1e-300), 0.0, 1.0)
        counts[:, j] = rng.binomial(left, q)
        left -= counts[:, j]
        rest -= p[:, j]
    counts[:, -1] = left
    return counts


def test_dirichlet_expected_majority_matches_monte_carlo():
    post = DirichletPosterior(np.array([3, 2, 1]))
    rng = np.random.default_rng(1)
    p = rng.dirichlet(post.alpha, size=200_000)  # posterior draw, then the k votes: 200k draws in all
    for k in (1, 2, 5, 9):
        counts = multinomial_rows(rng, k, p)
        top = counts.max(axis=1, keepdims=True)
        win = np.where(counts[:, 0] == top[:, 0], 1.0 / (counts == top).sum(axis=1), 0.0)
        value = float(post.expected_majority(k))
        assert abs(win.mean() - value) <= 3 * win.std(ddof=1) / np.sqrt(win.size)


def test_posterior_allocation_gives_unsolved_items_samples_without_special_cases():
    # 0/8 and 8/8 pilots: a point estimate gives them zero value (p=0 or 1); the posterior does not.
    post = BetaPosterior(np.array([0, 8, 4]), np.array([8, 0, 4])).as_column()
    alloc = allocate_counts(lambda k, q: q.expected_coverage(k), post, budget=30, k_min=1, k_max=20)
    assert alloc.counts[0] > alloc.counts[1]  # the never-solved item is worth more samples than the solved one
    values = post.expected_coverage(np.arange(1, 21)[None, :])
    assert alloc.value == pytest.approx(values[np.arange(3), alloc.counts - 1].sum())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: BetaPosterior(-1, 2), "successes must be finite non-negative"),
        (lambda: BetaPosterior(1, float("nan")), "failures must be finite non-negative"),
        (lambda: BetaPosterior(1, 2, prior=(0.0, 1.0)), "prior must be positive"),
        (lambda: DirichletPosterior([1, 2], prior=-1), "prior must be positive"),
    ],
)
def test_bad_inputs_get_one_clear_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(("call", "message"), [
    (lambda: BetaPosterior(1, 2, prior=0.5), r"prior must be a pair \(a0, b0\)"),  # "'float' object is not iterable"
    (lambda: BetaPosterior(1, 2, prior=(1, 1, 1)), r"prior must be a pair \(a0, b0\)"),
    (lambda: BetaPosterior("x", 2), "successes must be finite non-negative counts"),
    (lambda: DirichletPosterior([1, 2], prior="x"), "prior must be positive"),
    (lambda: BetaPosterior(1, 2).expected(coverage, 3, n_nodes=0), "n_nodes must be an integer >= 1, got 0"),
    (lambda: DirichletPosterior(np.ones(3)).expected_majority(np.array([100]), exact_max_k=10, n_draws=0),
     "n_draws must be an integer >= 1, got 0"),  # was [nan]
    (lambda: DirichletPosterior(np.ones(3)).expected_majority(3, correct_index=0.5), "correct_index must be an integer"),
])
def test_more_bad_inputs_get_one_clear_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_one_quadrature_node_is_the_posterior_mean():
    # n_nodes=1 raised an IndexError; one Gauss-Jacobi node is exact for polynomials of degree 1
    post = BetaPosterior(np.array([3.0, 0.0]), np.array([1.0, 5.0]))
    assert post.expected(coverage, np.ones(2, dtype=int), n_nodes=1) == pytest.approx(post.mean, abs=1e-12)
