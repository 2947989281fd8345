"""Posteriors over per-item success rates and answer distributions, and expected utilities under them.

    from scrimp.allocators import allocate_counts
    from scrimp.allocators.posterior import BetaPosterior
    post = BetaPosterior(successes[:, None], failures[:, None])       # Jeffreys prior by default
    alloc = allocate_counts(lambda k, q: q.expected_coverage(k), post, budget=4 * len(successes))

Knapsack RL (liziniu/KnapsackRL) plugs the pilot success rate in as a point estimate and needs special
cases for p = 0 and p = 1 (never solved / always solved in the pilot). Allocating on the expected
utility under a posterior removes those cases: an item with 0/4 pilot successes still has a posterior
mass on small p and gets samples in proportion to what they are worth.
"""

from __future__ import annotations

import numpy as np

from scrimp.allocators.utility import (
    MAJORITY_EXACT_MAX_K,
    _counts,
    _lgamma,
    answer_index,
    majority_poissonized,
    majority_table,
    tabulated_in_k,
)
from scrimp.checks import check_integer


def _non_negative(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be finite non-negative counts; got {x!r}") from None
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite non-negative counts; got a value outside that")
    return arr


def jacobi_rule(alpha: np.ndarray, beta: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Jacobi nodes on [0, 1] and weights summing to 1 for the Beta(alpha, beta) density.

    Golub-Welsch on the Jacobi three-term recurrence (weight (1-x)^(beta-1) (1+x)^(alpha-1) on [-1, 1]),
    batched over items with ``np.linalg.eigh``. Exact for polynomial utilities of degree < 2 n_nodes
    (coverage and nonzero_gradient are polynomials in p of degree k and k+3), and free of the endpoint
    singularity that ruins Gauss-Legendre for Jeffreys-like densities. Returns (..., n_nodes) arrays.
    """
    check_integer("n_nodes", n_nodes, 1)
    a = np.asarray(beta, dtype=np.float64)[..., None] - 1.0  # (1-x) exponent
    b = np.asarray(alpha, dtype=np.float64)[..., None] - 1.0  # (1+x) exponent
    n = np.arange(n_nodes, dtype=np.float64)
    s = 2.0 * n + a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        diag = (b * b - a * a) / (s * (s + 2.0))
    diag[..., 0] = ((b - a) / (a + b + 2.0))[..., 0]
    m = n[1:]
    sm = 2.0 * m + a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        off2 = 4.0 * m * (m + a) * (m + b) * (m + a + b) / (sm * sm * (sm + 1.0) * (sm - 1.0))
    # m = 1 in closed form: the generic expression is 0/0 when a + b = -1 (the Jeffreys prior).
    if n_nodes > 1:
        off2[..., 0] = (4.0 * (1.0 + a) * (1.0 + b) / ((2.0 + a + b) ** 2 * (3.0 + a + b)))[..., 0]
    shape = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    jac = np.zeros(shape + (n_nodes, n_nodes))
    idx = np.arange(n_nodes)
    jac[..., idx, idx] = np.broadcast_to(diag, shape + (n_nodes,))
    off = np.sqrt(np.broadcast_to(off2, shape + (n_nodes - 1,)))
    jac[..., idx[:-1], idx[1:]] = off
    jac[..., idx[1:], idx[:-1]] = off
    x, vec = np.linalg.eigh(jac)
    return np.clip(0.5 * (x + 1.0), 0.0, 1.0), vec[..., 0, :] ** 2


class BetaPosterior:
    """Beta posterior over per-item success probabilities from observed successes and failures.

    prior: (a0, b0) pseudo-counts, default Jeffreys (0.5, 0.5). Arrays broadcast with numpy rules;
    for ``allocate_counts`` give per-item arrays of shape (n_items, 1) (or call ``as_column()``).
    Generalizes Knapsack RL's point estimate p = successes / n (liziniu/KnapsackRL) to its posterior.
    """

    def __init__(self, successes, failures, prior=(0.5, 0.5)):
        s, f = _non_negative(successes, "successes"), _non_negative(failures, "failures")
        try:
            a0, b0 = (np.asarray(x, dtype=np.float64) for x in prior)
        except (TypeError, ValueError):
            raise ValueError(f"prior must be a pair (a0, b0) of positive finite pseudo-counts; got {prior!r}") from None
        if not (np.all(a0 > 0) and np.all(b0 > 0) and np.all(np.isfinite(a0)) and np.all(np.isfinite(b0))):
            raise ValueError(f"prior must be positive finite pseudo-counts (a0, b0); got {prior!r}")
        self.alpha, self.beta = np.broadcast_arrays(s + a0, f + b0)

    @property
    def mean(self) -> np.ndarray:
        return self.alpha / (self.alpha + self.beta)

    def as_column(self) -> BetaPosterior:
        """The same posterior with arrays flattened to shape (n_items, 1), as ``allocate_counts`` wants."""
        out = object.__new__(BetaPosterior)
        out.alpha, out.beta = self.alpha.reshape(-1, 1), self.beta.reshape(-1, 1)
        return out

    def expected_coverage(self, k) -> np.ndarray:
        """E_p[1 - (1-p)^k] = 1 - B(alpha, beta+k) / B(alpha, beta), in closed form via lgamma.

        The posterior-predictive pass@k; with a point mass it reduces to ``utility.coverage``. Replaces
        the plug-in value of Knapsack RL (liziniu/KnapsackRL), which is 0 for a prompt never solved in
        the pilot; here such a prompt keeps the value its remaining posterior mass on p > 0 gives it.
        """
        k = _counts(k).astype(np.float64)
        a, b = self.alpha, self.beta
        log_ratio = _lgamma(b + k) + _lgamma(a + b) - _lgamma(b) - _lgamma(a + b + k)
        return -np.expm1(log_ratio)

    def expected(self, utility_fn, k, n_nodes: int | None = None) -> np.ndarray:
        """E_p[utility_fn(k, p)] by Gauss-Jacobi quadrature under this Beta.

        Generalizes Knapsack RL's plug-in utility V(k, p_hat) to E[V(k, p)] for any vectorized V.
        utility_fn(k, p) must broadcast like the functions of ``scrimp.allocators.utility``. n_nodes
        defaults to enough for polynomials of degree max(k) + 4 (exact for coverage and nonzero_gradient).
        """
        k = _counts(k)
        if n_nodes is None:
            n_nodes = int(min(max(8, (int(k.max(initial=0)) + 6) // 2 + 1), 200))
        nodes, weights = jacobi_rule(self.alpha, self.beta, n_nodes)
        values = np.asarray(utility_fn(k[..., None], nodes), dtype=np.float64)
        return np.sum(values * weights, axis=-1)


class DirichletPosterior:
    """Dirichlet posterior over a categorical answer distribution, from observed answer counts.

    counts: (..., C) how often each distinct answer was seen; prior: pseudo-count per answer (scalar
    or (C,)), default 0.5 (Jeffreys). Extends the Beta posterior to majority voting over C answers,
    where self-consistency (Wang et al., 2023) and its adaptive variants use empirical answer frequencies.
    """

    def __init__(self, counts, prior=0.5):
        c = _non_negative(counts, "counts")
        if c.ndim < 1 or c.shape[-1] < 1:
            raise ValueError("counts must have a last axis over the distinct answers")
        try:
            p0 = np.asarray(prior, dtype=np.float64)
        except (TypeError, ValueError):
            p0 = np.array(np.nan)
        if not (np.all(p0 > 0) and np.all(np.isfinite(p0))):
            raise ValueError(f"prior must be positive finite pseudo-counts; got {prior!r}")
        self.alpha = c + p0

    @property
    def mean(self) -> np.ndarray:
        return self.alpha / self.alpha.sum(axis=-1, keepdims=True)

    def expected_majority(
        self, k, correct_index: int = 0, exact_max_k: int = MAJORITY_EXACT_MAX_K, n_draws: int = 512, seed: int = 0
    ) -> np.ndarray:
        """E_p[majority(k, p)] under the Dirichlet, k broadcast with ``alpha[..., 0]``.

        Exact for k <= exact_max_k: integrating p out turns the multinomial into the
        Dirichlet-multinomial, whose pmf factors over answers like the multinomial's (weights
        (alpha_j)_n / n!, norm k! / (A)_k), so ``utility.majority_table`` applies unchanged.
        Above exact_max_k: the Poissonized majority averaged over ``n_draws`` seeded Dirichlet draws
        (Monte Carlo; standard error about 0.5 / sqrt(n_draws)).
        """
        correct_index = answer_index(correct_index, self.alpha.shape[-1])
        check_integer("n_draws", n_draws, 1)

        def monte_carlo(kk: np.ndarray, alpha: np.ndarray) -> np.ndarray:
            rng = np.random.default_rng(seed)
            acc = np.zeros(kk.size)
            for _ in range(n_draws):
                draws = rng.gamma(alpha)
                acc += majority_poissonized(kk.astype(np.float64), draws / draws.sum(axis=1, keepdims=True), correct_index)
            return acc / n_draws

        return tabulated_in_k(
            k, self.alpha, exact_max_k,
            exact=lambda rows, k_top: _dirichlet_majority_table(rows, correct_index, k_top),
            approximate=monte_carlo,
        )


def _dirichlet_majority_table(alpha: np.ndarray, correct_index: int, k_max: int, chunk: int = 64) -> np.ndarray:
    n = np.arange(k_max + 1, dtype=np.float64)
    log_fact = _lgamma(n + 1.0)
    log_w = _lgamma(alpha[:, :, None] + n) - _lgamma(alpha)[:, :, None] - log_fact  # (alpha)_n / n!
    total = alpha.sum(axis=1, keepdims=True)
    log_norm = log_fact[None, :] + _lgamma(total) - _lgamma(total + n[None, :])  # k! / (A)_k
    others = np.delete(np.arange(alpha.shape[1]), correct_index)
    out = np.empty((alpha.shape[0], k_max + 1))
    for s in range(0, alpha.shape[0], chunk):
        sl = slice(s, s + chunk)
        out[sl] = majority_table(log_w[sl, correct_index], log_w[sl][:, others], log_norm[sl], k_max)
    return out
