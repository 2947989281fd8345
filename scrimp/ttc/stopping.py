"""Early-stopping rules for sampling-based voting (pure functions of the answers drawn so far).

- Beta rule: Adaptive-Consistency (Aggarwal et al., EMNLP 2023, "Let's Sample Step by Step"): with
  v1 votes for the leading answer and v2 for the runner-up, the posterior share of the leader among
  the two, p ~ Beta(v1 + a, v2 + a), gives the confidence P(p > 1/2) that the leader is the mode;
  stop once it exceeds a threshold.
- Window rule: ESC (Li et al., ICLR 2024, "Escape Sky-high Cost"): sample in windows of w; stop when
  all w answers of a window agree.
- Cap-majority rule (``dirichlet``): the Bayesian version of "more samples will not change the vote".
  Under a Dirichlet posterior over the answer distribution (all answers seen, plus one class for the
  answers not seen yet), the probability that the current leader still wins the plurality vote once
  the prompt is sampled up to its cap; stop once it exceeds a threshold. It generalizes the Beta rule
  of Adaptive-Consistency (all answers, not only the top two; the vote at the cap, which is what a
  uniform budget would report, rather than the mode of the distribution) and ESC's intuition (a
  window that agrees makes a change of the final vote unlikely), and is exact (no Monte Carlo): the
  Dirichlet-multinomial predictive of the remaining samples factors over answers, so
  ``scrimp.allocators.utility.majority_table`` sums it.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from scrimp.checks import check_integer, check_number

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(64)

RULES = ("beta", "window", "either", "dirichlet")


@functools.lru_cache(maxsize=65536)  # voting revisits the same (v1, v2) counts in every round and replay order
def beta_tail_above_half(a: float, b: float) -> float:
    """P(X > 1/2) for X ~ Beta(a, b), a, b > 0, by Gauss-Legendre quadrature.

    Written as I_{1/2}(b, a) with the substitution u = y**b when b < 1 (it removes the y**(b-1) endpoint
    singularity), so that 64 nodes are accurate to ~1e-12 for the counts seen in voting.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be positive, got a={a}, b={b}")
    if b < 1:
        upper = 0.5**b
        u = 0.5 * upper * (_NODES + 1.0)
        y = u ** (1.0 / b)
        integral = 0.5 * upper * float(_WEIGHTS @ np.exp((a - 1.0) * np.log1p(-y))) / b
    else:  # smooth on [0, 1/2] already
        y = 0.25 * (_NODES + 1.0)
        integral = 0.25 * float(_WEIGHTS @ np.exp((b - 1.0) * np.log(y) + (a - 1.0) * np.log1p(-y)))
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return min(1.0, integral * math.exp(-log_beta))


def leader_counts(answers: Sequence[str | None]) -> tuple[int, int]:
    """Votes of the leading and runner-up answers (None answers do not vote)."""
    top = Counter(a for a in answers if a is not None).most_common(2)
    v1 = top[0][1] if top else 0
    v2 = top[1][1] if len(top) > 1 else 0
    return v1, v2


def beta_confidence(answers: Sequence[str | None], prior: float = 1.0) -> float:
    """Adaptive-Consistency confidence that the current leader is the mode: P(Beta(v1+a, v2+a) > 1/2)."""
    check_number("prior", prior, low=0, open_low=True)
    v1, v2 = leader_counts(answers)
    return beta_tail_above_half(v1 + prior, v2 + prior)


def window_agrees(answers: Sequence[str | None], window: int, start: int = 0) -> bool:
    """ESC window rule: True when the number drawn since ``start`` is a positive multiple of ``window``
    and the last ``window`` answers are the same non-None answer."""
    check_integer("window", window, 1)
    drawn = len(answers) - start
    if drawn <= 0 or drawn % window:
        return False
    last = answers[-window:]
    return last[0] is not None and all(a == last[0] for a in last)


def answer_counts(answers: Sequence[str | None]) -> tuple[int, ...]:
    """Votes per distinct answer, largest first (None answers do not vote)."""
    return tuple(sorted(Counter(a for a in answers if a is not None).values(), reverse=True))


def cap_majority_probability(counts: Sequence[int], drawn: int, horizon: int, prior: float = 0.5) -> float:
    """P(the answer leading ``counts`` wins the plurality vote once the prompt holds ``horizon`` samples).

    ``counts``: votes per distinct answer so far, leader first (``answer_counts``); ``drawn``: samples
    drawn so far (None answers included, they spend budget without voting); the remaining
    m = horizon - drawn samples follow the Dirichlet-multinomial predictive of a Dirichlet(counts + prior)
    posterior over the seen answers plus one class for all unseen answers (prior pseudo-count
    ``prior``; Dirichlet-process-style). Ties at the horizon are split evenly, as ``plurality`` breaks
    them at random. Exact: the predictive pmf is m!/(A)_m prod_j (alpha_j)_{x_j}/x_j!, so the final
    counts y_j = c_j + x_j have factored weights and ``allocators.utility.majority_table`` sums the
    vote over them. With no vote yet the leader is undefined and the value is 0.
    """
    if prior <= 0 or not math.isfinite(prior):
        raise ValueError(f"prior must be a positive finite pseudo-count, got {prior}")
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if c.size == 0:
        return 0.0
    if np.any(c < 0) or np.any(c[1:] > c[0]):
        raise ValueError(f"counts must be non-negative vote counts with the leader first, got {counts!r}")
    votes = int(c.sum())
    if votes == 0:
        return 0.0
    if drawn < votes:
        raise ValueError(f"drawn ({drawn}) must be at least the number of votes ({votes})")
    m = max(int(horizon) - int(drawn), 0)
    if m == 0:  # nothing left to draw: the vote is the current one
        return 1.0 / int(np.sum(c == c[0]))
    return _cap_majority_exact(tuple(int(x) for x in c), m, float(prior))


_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])


def _log_weight(alpha, x):
    """log((alpha)_x / x!), elementwise for x >= 0: a class's factor in the Dirichlet-multinomial pmf."""
    return _lgamma(alpha + x) - _lgamma(alpha) - _lgamma(x + 1.0)


def _log_normalizer(m: int, a_sum: float) -> float:
    """log(m! / (A)_m): the rest of the Dirichlet-multinomial pmf of m draws, A the summed pseudo-counts."""
    return math.lgamma(m + 1.0) + math.lgamma(a_sum) - math.lgamma(a_sum + m)


@functools.lru_cache(maxsize=65536)
def _cap_majority_exact(counts: tuple[int, ...], m: int, prior: float) -> float:
    from scrimp.allocators.utility import majority_table

    c = np.array([*counts, 0], dtype=np.float64)  # the last class lumps the answers not seen yet
    alpha = c + prior
    top = int(c.sum()) + m
    y = np.arange(top + 1, dtype=np.float64)
    x = y[None, :] - c[:, None]  # new votes a class needs to end at y; a final count below c is impossible
    log_w = np.where(x >= 0, _log_weight(alpha[:, None], np.maximum(x, 0.0)), -np.inf)
    log_norm = np.full((1, top + 1), -np.inf)
    log_norm[0, top] = _log_normalizer(m, float(alpha.sum()))
    table = majority_table(log_w[None, 0], log_w[None, 1:], log_norm, top)
    return float(min(1.0, table[0, top]))


def leader_vs_runner_up_bound(counts: Sequence[int], drawn: int, horizon: int, prior: float = 0.5) -> float:
    """An upper bound on ``cap_majority_probability``, from the leader and the runner-up alone.

    The leader cannot win when the runner-up ends ahead of it, and gets at most half when they end
    level, so P(win) <= P(y_1 > y_2) + P(y_1 = y_2) / 2. Under the same Dirichlet-multinomial
    predictive, with every other class (seen or not) lumped into one (the Dirichlet aggregation
    property), that is a sum over the (x_1, x_2) grid: O(m^2) against the exact value's sum over all
    classes, which dominates the sequential policy's run time when a hard task spreads the votes.
    """
    c = [int(v) for v in counts]
    m = max(int(horizon) - int(drawn), 0)
    if len(c) < 2 or m == 0:
        return 1.0
    rest = float(sum(c[2:])) + (len(c) - 2) * prior + prior  # the other seen answers plus the unseen class
    return _pairwise_bound(c[0], c[1], rest, m, float(prior))


@functools.lru_cache(maxsize=65536)
def _pairwise_bound(c1: int, c2: int, a_rest: float, m: int, prior: float) -> float:
    a1, a2 = c1 + prior, c2 + prior
    x = np.arange(m + 1)
    draws = x.astype(np.float64)
    left = m - x[:, None] - x[None, :]  # draws that go to the lumped class
    log_p = np.where(left >= 0, _log_weight(a1, draws)[:, None] + _log_weight(a2, draws)[None, :]
                     + _log_weight(a_rest, draws)[np.clip(left, 0, m)], -np.inf)
    p = np.exp(log_p + _log_normalizer(m, a1 + a2 + a_rest))
    lead = (c1 + x)[:, None] - (c2 + x)[None, :]
    return float(min(1.0, p[lead > 0].sum() + 0.5 * p[lead == 0].sum()))


def should_stop(answers: Sequence[str | None], rule: str, *, threshold: float, prior: float, window: int,
                horizon: int | None = None) -> bool:
    """Whether to stop sampling this prompt under ``rule`` in ``RULES`` (``horizon``: the prompt's cap,
    needed by the ``dirichlet`` rule)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "dirichlet":
        if horizon is None:
            raise ValueError("the dirichlet rule needs horizon (the most samples this prompt may get)")
        counts = answer_counts(answers)
        # The bound decides most open prompts of a hard task (votes spread over many answers) at a
        # fraction of the exact cost; the margin keeps its rounding from ever changing a decision.
        if len(counts) > 2 and leader_vs_runner_up_bound(counts, len(answers), horizon, prior) < threshold - 1e-9:
            return False
        return cap_majority_probability(counts, len(answers), horizon, prior) >= threshold
    if rule in ("beta", "either") and answers and beta_confidence(answers, prior) >= threshold:
        return True
    return rule in ("window", "either") and window_agrees(answers, window)
