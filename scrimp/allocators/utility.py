"""Value of giving an item k samples (or queries), vectorized with numpy broadcasting over k and p.

    from scrimp.allocators.utility import coverage
    coverage(np.arange(1, 9)[None, :], p[:, None])      # (n_items, 8)

Each function's value is what ``scrimp.allocators.allocate_counts`` maximizes; each is checked
against Monte Carlo in tests/allocators/test_utility.py.
"""

from __future__ import annotations

import math

import numpy as np

from scrimp.checks import check_integer, is_integer

# Default largest k computed exactly by `majority`; above it, the Poissonized approximation.
MAJORITY_EXACT_MAX_K = 64


def _probability(p, name: str = "p") -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} must be probabilities in [0, 1] (no NaN); got NaN")
    if np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{name} must be probabilities in [0, 1] (no NaN); got values in [{arr.min()}, {arr.max()}]")
    return arr


def _counts(k, low: int = 0) -> np.ndarray:
    arr = np.asarray(k)
    if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise ValueError(f"k must be integer sample counts >= {low}; got a non-integer")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"k must be integer sample counts; got dtype {arr.dtype}")
    if arr.size and arr.min() < low:
        raise ValueError(f"k must be integer sample counts >= {low}; got {arr.min()}")
    return arr.astype(np.int64)


def coverage(k, p) -> np.ndarray:
    """pass@k = 1 - (1-p)^k: chance that at least one of k samples is correct (best-of-N, perfect verifier).

    The utility of Brown et al. (2024, "Large Language Monkeys") and of Knapsack RL's success
    allocation; here as a plain vectorized function of (k, p) for any allocator.
    """
    k, p = _counts(k), _probability(p)
    return -np.expm1(k * np.log1p(-np.minimum(p, 1.0))) if np.all(p < 1) else 1.0 - (1.0 - p) ** k


def nonzero_gradient(k, p, weighted: bool = False) -> np.ndarray:
    """1 - p^k - (1-p)^k: chance that k rollouts hold both a success and a failure (a non-zero GRPO gradient).

    As in Knapsack RL (Li et al., 2025, liziniu/KnapsackRL); ``weighted=True`` multiplies by p(1-p)^2,
    the per-prompt gradient-value weight that paper uses. Unlike the paper's code, p = 0 and p = 1 need
    no special case here (the value is 0 there), and posteriors handle unseen prompts.
    """
    k, p = _counts(k), _probability(p)
    value = 1.0 - p**k - (1.0 - p) ** k
    value = np.where(k == 0, 0.0, value)
    return value * p * (1.0 - p) ** 2 if weighted else value


def variance_reduction(k, sigma2) -> np.ndarray:
    """sigma2 - sigma2/k: variance removed by averaging k noisy queries instead of taking one.

    The value of extra queries in zeroth-order gradient estimation (MeZO's n-query SPSA average,
    Malladi et al., 2023); here per example, so queries can be allocated where the noise is largest.
    Needs k >= 1.
    """
    k = _counts(k, low=1)
    s = np.asarray(sigma2, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("sigma2 must be finite non-negative variances (no NaN or infinity)")
    return s - s / k


# ------------------------------------------------------------------------------------- majority


def _gauss_legendre_01(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


def majority_table(log_weight_correct, log_weight_others, log_norm, k_max: int) -> np.ndarray:
    """P(the correct answer wins a plurality vote, ties broken uniformly) for every k in 0..k_max.

    For count distributions that factor as ``norm(k) * prod_j weight_j(n_j)`` over the categories'
    counts n_j summing to k: the multinomial (weight p^n/n!, norm k!) and the Dirichlet-multinomial
    (weight (alpha)_n/n!, norm k!/(A)_k). Exact: for each count a of the correct answer, the product
    over the other answers of their weight polynomials truncated at a (an exponential generating
    function), with the tie factor 1/(1+t) = int_0^1 u^t du taken by Gauss-Legendre, exact because the
    integrand is a polynomial of degree C-1 in u.

    Generalizes the majority-vote accuracy curves of self-consistency (Wang et al., 2023), usually
    estimated by resampling, to an exact value, and covers the Dirichlet posterior with the same code.
    log_weight_correct: (R, k_max+1); log_weight_others: (R, C-1, k_max+1); log_norm: (R, k_max+1).
    Returns (R, k_max+1); entry 0 is 0 (no sample, no answer).
    """
    rows, n_other, size = log_weight_others.shape
    nodes, node_w = _gauss_legendre_01(max(1, (n_other + 2) // 2))
    # Scale each answer's weights to a maximum of 1 so products stay in floating range; undone at the end.
    shift = np.max(log_weight_others, axis=2, keepdims=True)
    w_other = np.exp(log_weight_others - shift)  # (R, C-1, D)
    a = np.arange(size)
    n = np.arange(size)
    # factor[a, u, n] = 1 for n < a, u for n == a, 0 for n > a (the truncated weight polynomial).
    below = (n[None, :] < a[:, None]).astype(np.float64)[:, None, :]
    at = (n[None, :] == a[:, None]).astype(np.float64)[:, None, :] * nodes[None, :, None]
    factor = below + at  # (A, U, D)
    prod = np.zeros((rows, size, nodes.size, size))
    prod[..., 0] = 1.0
    for j in range(n_other):
        g = w_other[:, j, None, None, :] * factor[None]  # (R, A, U, D)
        new = np.zeros_like(prod)
        for d in range(size):
            coef = g[..., d]
            if not coef.any():
                continue
            new[..., d:] += coef[..., None] * prod[..., : size - d]
        prod = new
    integrated = np.einsum("raud,u->rad", prod, node_w)  # coefficient of x^d at correct count a
    table = np.zeros((rows, size))
    total_shift = shift.sum(axis=1)[:, 0]  # (R,)
    for k in range(1, size):
        aa = np.arange(1, k + 1)
        coef = integrated[:, aa, k - aa]  # (R, k)
        # Undo the per-category rescaling of the other answers' weights.
        log_terms = log_weight_correct[:, aa] + log_norm[:, k : k + 1] + total_shift[:, None]
        table[:, k] = np.sum(coef * np.exp(log_terms), axis=1)
    return table


def _poisson_log_pmf(n: np.ndarray, mean: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = n * np.log(mean) - mean - _lgamma(n + 1.0)
    return np.where(mean > 0, out, np.where(n == 0, 0.0, -np.inf))


def _lgamma(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.lgamma(torch.as_tensor(np.asarray(x, dtype=np.float64))).numpy()


def majority_poissonized(k: np.ndarray, probs: np.ndarray, correct_index: int) -> np.ndarray:
    """Large-k approximation of ``majority``: counts as independent Poisson(k p_j) instead of multinomial.

    Classical Poissonization (as in balls-into-bins analyses): the counts decouple, so the vote is a
    sum over the correct count of a product of Poisson cdfs, O(C k) per item instead of O(C k^3).
    The total count becomes Poisson(k) instead of exactly k, which smooths the parity
    effects of small k and slightly widens the vote margin's spread; tests/allocators/test_utility.py
    measures its error against Monte Carlo. k: (N,), probs: (N, C).
    """
    mean = k[:, None] * probs  # (N, C)
    top = int(np.ceil(mean.max() + 12.0 * np.sqrt(mean.max()) + 20.0))
    counts = np.arange(top + 1, dtype=np.float64)
    log_pmf = _poisson_log_pmf(counts[None, None, :], mean[:, :, None])  # (N, C, A)
    pmf = np.exp(log_pmf)
    cdf_below = np.cumsum(pmf, axis=2) - pmf  # P(N_j < a)
    others = np.delete(np.arange(probs.shape[1]), correct_index)
    nodes, node_w = _gauss_legendre_01(max(1, (len(others) + 2) // 2))
    # E over u of prod_j [P(N_j < a) + u P(N_j = a)] gives the uniform tie-break.
    terms = cdf_below[:, others, :, None] + pmf[:, others, :, None] * nodes  # (N, C-1, A, U)
    tie_avg = np.prod(terms, axis=1) @ node_w  # (N, A)
    win = pmf[:, correct_index, :] * tie_avg
    win[:, 0] = 0.0  # a count of zero never wins
    return win.sum(axis=1)


def majority(k, probs, correct_index: int = 0, exact_max_k: int = MAJORITY_EXACT_MAX_K) -> np.ndarray:
    """P(majority vote over k samples picks the correct answer), ties broken uniformly; 0 at k = 0.

    probs: (..., C) a categorical distribution over C distinct answers (summing to 1), of which
    ``probs[..., correct_index]`` is the correct one; k broadcasts with ``probs[..., 0]``.
    Exact for k <= exact_max_k (``majority_table``: an exponential-generating-function sum over the
    correct answer's count, cost ~ C k^3 per distinct distribution); above, the Poissonized
    approximation ``majority_poissonized``. Not concave in k (ties at even k), which is why the
    exact DP exists. Generalizes self-consistency (Wang et al., 2023) accuracy curves from a fitted
    law to the exact value for a given answer distribution.
    """
    probs = _probability(probs, "probs")
    if probs.ndim < 1 or probs.shape[-1] < 1:
        raise ValueError("probs must have a last axis over the distinct answers")
    correct_index = answer_index(correct_index, probs.shape[-1])
    if not np.allclose(probs.sum(axis=-1), 1.0, atol=1e-6):
        raise ValueError("probs must sum to 1 over the last axis (put the mass of unlisted answers in its own entry)")
    return tabulated_in_k(
        k, probs, exact_max_k,
        exact=lambda rows, k_top: _multinomial_majority_table(rows, correct_index, k_top),
        approximate=lambda kk, rows: majority_poissonized(kk.astype(np.float64), rows, correct_index),
    )


def answer_index(correct_index, n_cat: int) -> int:
    """``correct_index`` as an index in 0..n_cat-1 (negative ones count from the end), or one sentence."""
    if not is_integer(correct_index) or not -n_cat <= correct_index < n_cat:
        raise ValueError(f"correct_index must be an integer index of the {n_cat} answers (-{n_cat}..{n_cat - 1}); "
                         f"got {correct_index!r}")
    return int(correct_index) % n_cat


def tabulated_in_k(k, params: np.ndarray, exact_max_k: int, exact, approximate) -> np.ndarray:
    """Evaluate a utility of k samples for categorical parameters ``params`` (..., C), k broadcast
    with ``params[..., 0]``: ``exact(rows, k_top)`` tabulates k = 0..k_top once per distinct row for
    every k <= exact_max_k, ``approximate(kk, rows)`` handles the larger k element-wise.

    Shared by the majority utility and its Dirichlet expectation, which differ only in the table and
    the large-k approximation.
    """
    check_integer("exact_max_k", exact_max_k, 0)
    k = _counts(k)
    n_cat = params.shape[-1]
    shape = np.broadcast_shapes(k.shape, params.shape[:-1])
    flat = params.reshape(-1, n_cat)
    which = np.broadcast_to(np.arange(flat.shape[0]).reshape(params.shape[:-1]), shape).ravel()
    kk = np.broadcast_to(k, shape).ravel()
    out = np.zeros(kk.shape)
    small = kk <= exact_max_k
    if small.any():
        rows = np.unique(which[small])
        k_top = int(kk[small].max())
        table = np.zeros((flat.shape[0], k_top + 1))
        table[rows] = exact(flat[rows], k_top)
        out[small] = table[which[small], kk[small]]
    if (~small).any():
        out[~small] = approximate(kk[~small], flat[which[~small]])
    return out.reshape(shape)


def _multinomial_majority_table(probs: np.ndarray, correct_index: int, k_max: int, chunk: int = 64) -> np.ndarray:
    n = np.arange(k_max + 1, dtype=np.float64)
    log_fact = np.array([math.lgamma(x + 1.0) for x in n])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_w = n[None, None, :] * np.log(probs)[:, :, None] - log_fact  # p^n / n!
    log_w[:, :, 0] = 0.0  # 0^0 = 1
    others = np.delete(np.arange(probs.shape[1]), correct_index)
    out = np.empty((probs.shape[0], k_max + 1))
    for s in range(0, probs.shape[0], chunk):
        sl = slice(s, s + chunk)
        norm = np.broadcast_to(log_fact, (log_w[sl].shape[0], k_max + 1))
        out[sl] = majority_table(log_w[sl, correct_index], log_w[sl][:, others], norm, k_max)
    return out
