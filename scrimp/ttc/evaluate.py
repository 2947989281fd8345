"""Honest evaluation: unbiased pass@k / maj@k, bootstrap intervals over prompts, accuracy-vs-budget
curves (CSV + PNG), and compute savings at equal accuracy.

- pass@k: the combinatorial estimator of Chen et al. (2021, "Evaluating Large Language Models Trained
  on Code"), 1 - C(n-c, k) / C(n, k), exact expectation over k-subsets of the n recorded samples.
- maj@k: the same idea for majority voting: the exact probability, over all k-subsets drawn without
  replacement from the n recorded samples, that the plurality answer is correct, ties split evenly
  (computed by a dynamic program over answer classes instead of enumerating C(n, k) subsets).
- Bootstrap: percentile intervals over prompts (Efron & Tibshirani, 1993).
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from scrimp.checks import check_integer


def _check_nk(n: int, k: int) -> None:
    if not (isinstance(n, int) and isinstance(k, int)) or k < 1 or n < k:
        raise ValueError(f"need integers 1 <= k <= n (k samples drawn from n recorded), got n={n}, k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    _check_nk(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in [0, n={n}], got {c}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def maj_at_k(answers: Sequence[str | None], correct: str | None | Collection[str], k: int) -> float:
    """Exact probability that plurality voting over k of these n answers (drawn without replacement)
    picks ``correct`` (one answer, or a collection of answers that all count as right: the chances of
    electing each add up, as the winner is one answer); None answers cast no vote, ties are split
    evenly, an all-None draw is wrong.

    Dynamic program: for j copies of the correct answer drawn, count the draws of the other k - j
    samples in which every other answer appears at most j times, weighted by 1 / (1 + #answers tied at j).
    """
    n = len(answers)
    _check_nk(n, k)
    if correct is not None and not isinstance(correct, str):
        return sum(maj_at_k(answers, c, k) for c in set(correct))
    counts = Counter(a for a in answers if a is not None)
    c = counts.pop(correct, 0) if correct is not None else 0
    others = list(counts.values())
    abstain = n - c - sum(others)
    total = 0.0
    for j in range(1, min(c, k) + 1):
        rest = k - j
        # dp[t][ties] = number of ways to draw t samples from the classes seen so far
        dp = np.zeros((rest + 1, len(others) + 1))
        dp[0, 0] = 1.0
        for ci in others:
            new = np.zeros_like(dp)
            for x in range(0, min(ci, j, rest) + 1):
                ways = math.comb(ci, x)
                tie = 1 if x == j else 0
                if tie:
                    new[x:, 1:] += ways * dp[: rest + 1 - x, :-1]
                else:
                    new[x:, :] += ways * dp[: rest + 1 - x, :]
            dp = new
        ways_abstain = np.array([math.comb(abstain, rest - t) for t in range(rest + 1)], dtype=float)
        share = 1.0 / (1.0 + np.arange(len(others) + 1))
        total += math.comb(c, j) * float(ways_abstain @ dp @ share)
    return total / math.comb(n, k)


def plurality(answers: Sequence[str | None], rng: np.random.Generator | None = None) -> str | None:
    """The most frequent non-None answer; ties broken uniformly at random with ``rng`` (first seen
    without one); None when every answer is None."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    winners = [a for a, v in counts.items() if v == top]
    if len(winners) == 1 or rng is None:
        return winners[0]
    return winners[int(rng.integers(len(winners)))]


def bootstrap_ci(
    per_prompt: np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): percentile bootstrap interval of ``statistic`` over prompts (axis 0)."""
    check_integer("n_boot", n_boot, 1)
    values = np.asarray(per_prompt, dtype=float)
    if values.ndim < 1 or values.shape[0] < 2:
        raise ValueError("per_prompt must hold at least two prompts along axis 0")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
    stats = np.array([statistic(values[i]) for i in idx])
    alpha = (1 - level) / 2
    return float(statistic(values)), float(np.nanquantile(stats, alpha)), float(np.nanquantile(stats, 1 - alpha))


def budget_to_reach(spend: np.ndarray, accuracy: np.ndarray, target: float) -> float:
    """Smallest spend at which an accuracy-vs-spend curve reaches ``target`` (linear interpolation
    between measured points, the curve taken in increasing spend); inf when it never does."""
    spend, accuracy = np.asarray(spend, float), np.asarray(accuracy, float)
    order = np.argsort(spend, kind="stable")
    spend, accuracy = spend[order], accuracy[order]
    hits = np.nonzero(accuracy >= target - 1e-12)[0]
    if hits.size == 0:
        return math.inf
    i = int(hits[0])
    if i == 0:
        return float(spend[0])
    s0, s1, a0, a1 = spend[i - 1], spend[i], accuracy[i - 1], accuracy[i]
    return float(s0 + (target - a0) * (s1 - s0) / (a1 - a0))


class Savings(NamedTuple):
    """Compute savings at equal accuracy with its bootstrap interval (see ``savings_at_equal_accuracy``).

    ``ratio``/``low``/``high``: baseline budget / budget the policy needs. ``reached``: whether the
    policy's curve reaches the target at all; when it does not, ``ratio`` is B / (largest mean spend
    tried), an upper value: the true savings is below it. ``censored``: fraction of bootstrap resamples
    whose curve never reaches their target (each counted at its own upper value B / largest spend).
    ``low_is_upper_bound``: the lower percentile falls among those resamples, so the interval's lower
    end is only known to be at most ``low`` (printed as "<=").
    """

    ratio: float
    low: float
    high: float
    reached: bool
    censored: float
    low_is_upper_bound: bool
    high_is_upper_bound: bool

    def __str__(self) -> str:
        if math.isnan(self.ratio):
            return "n/a (the baseline is never right, so there is no accuracy to match)"
        point = f"{self.ratio:.2f}x" if self.reached else f"<{self.ratio:.2f}x (not reached)"
        low = f"<={self.low:.2f}" if self.low_is_upper_bound else f"{self.low:.2f}"
        high = f"<={self.high:.2f}" if self.high_is_upper_bound else f"{self.high:.2f}"
        return f"{point} [{low}, {high}]"


def savings_at_equal_accuracy(
    baseline_correct: np.ndarray,
    baseline_budget: float | np.ndarray,
    policy_spend: np.ndarray,
    policy_correct: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Savings:
    """Compute savings at equal accuracy: ``baseline_budget / b*`` where b* is the smallest mean spend
    at which the policy's curve (linear between its measured points) reaches the baseline's accuracy at
    ``baseline_budget`` (the "savings at equal accuracy" of Snell et al., 2024, and ESC).

    ``baseline_correct``: (prompts,) per-prompt expected correctness of the baseline at its budget.
    ``baseline_budget``: its mean spend, or (prompts,) per-prompt spends (uniform@k spends fewer than k
    on a prompt with fewer recorded samples); each resample then uses its own prompts' mean.
    A baseline that is never right has no accuracy to match: every ratio is then NaN.
    ``policy_spend``/``policy_correct``: (prompts, points) per-prompt samples spent / correctness at
    each point of the policy's curve. The interval is a paired percentile bootstrap over prompts: each
    resample recomputes the baseline's target AND the policy's curve on the same resampled prompts.
    A resample whose curve never reaches its target has savings below B / (its largest mean spend);
    it is counted at that upper value (replacing a value by a larger one can only raise a quantile), and
    when such a resample lies at or above a percentile, that end is reported as an upper bound
    (``Savings.low_is_upper_bound``, printed "<=") instead of the meaningless 0x of counting it as "no
    savings". The point estimate follows the same rule (``Savings.reached``).
    """
    check_integer("n_boot", n_boot, 1)
    base = np.asarray(baseline_correct, float)
    spend, corr = np.asarray(policy_spend, float), np.asarray(policy_correct, float)
    if spend.ndim == 2:  # one result per prompt and point: a single "order"
        spend, corr = spend[..., None], corr[..., None]
    if spend.shape != corr.shape or spend.ndim != 3 or spend.shape[0] != base.shape[0]:
        raise ValueError("policy_spend and policy_correct must both be (prompts, points) or (prompts, points, "
                         "orders) with the baseline's prompts")
    base_spend = np.broadcast_to(np.asarray(baseline_budget, float), base.shape)
    if not (np.all(base_spend >= 0) and base_spend.mean() > 0):
        raise ValueError(f"baseline_budget must be a positive number of samples, got {baseline_budget!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = base.shape[0]

    # Each prompt's value is the mean over its replay orders, whose noise (variance / orders) is part of
    # the spread between prompts: resampling the prompts carries it (Davison & Hinkley, 1997, sec. 3.8:
    # for two-stage data, resample the first stage only; resampling the orders too would count it twice).
    spend, corr = spend.mean(2), corr.mean(2)

    def ratio(idx: np.ndarray) -> tuple[float, bool]:
        target, budget = base[idx].mean(), base_spend[idx].mean()
        if target <= 0:
            return math.nan, True
        mean_spend = spend[idx].mean(0)
        need = budget_to_reach(mean_spend, corr[idx].mean(0), target)
        if math.isinf(need):
            return budget / float(mean_spend.max()), False
        return (budget / need if need > 0 else math.inf), True

    rng = np.random.default_rng(seed)

    def resample() -> tuple[float, bool]:
        return ratio(rng.integers(0, n, n))

    stats, hit = zip(*(resample() for _ in range(n_boot)))
    stats, hit = np.array(stats), np.array(hit)
    alpha = (1 - level) / 2
    # A resample whose baseline is never right has no ratio (NaN): left out of the percentiles.
    finite = stats[~np.isnan(stats)]
    low, high = ((float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))) if finite.size
                 else (math.nan, math.nan))
    point, reached = ratio(np.arange(n))
    # Replacing a censored value by a larger one can only raise a quantile; the quantile is exact unless
    # a censored resample's upper value sits at or above it.
    return Savings(point, low, high, reached, float(1.0 - hit.mean()),
                   bool(np.any(~hit & (stats >= low - 1e-12))), bool(np.any(~hit & (stats >= high - 1e-12))))


def bootstrap_ci_orders(per_order: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of per-prompt, per-order results (prompts, orders): the percentile bootstrap over
    prompts of each prompt's mean over its replay orders. That mean carries the order noise
    (variance / orders) into the spread between prompts, so the interval includes it: for two-stage data
    the first stage alone is resampled (Davison & Hinkley, 1997, sec. 3.8); resampling the orders as well
    would count their noise twice."""
    values = np.asarray(per_order, dtype=float)
    if values.ndim != 2:
        raise ValueError("per_order must be (prompts, orders)")
    return bootstrap_ci(values.mean(1), n_boot=n_boot, level=level, seed=seed)


def first_success_spend(n: int, c: int, cap: int) -> float:
    """Exact expected samples spent by "draw without replacement until the first verified success, at most
    ``cap``" on a prompt with ``c`` successes among ``n`` recorded samples: E[min(T, cap)] =
    sum_{t < cap} P(the first t draws all fail) = sum_{t < cap} C(n - c, t) / C(n, t). Its coverage is
    pass@cap (``pass_at_k``), so the pair is the exact curve of stop-at-first-success."""
    _check_nk(n, cap)
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in [0, n={n}], got {c}")
    return float(sum(math.comb(n - c, t) / math.comb(n, t) for t in range(cap)))


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it onto ``path``; on any failure the
    temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_curves_csv(rows: Sequence[Mapping[str, object]], path: str | os.PathLike) -> Path:
    """Write curve rows (policy, budget, spend, accuracy, low, high, ...) as CSV, atomically."""
    if not rows:
        raise ValueError("rows must hold at least one curve point")
    path = Path(path)
    fields = list(rows[0].keys())

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)
    return path


def plot_curves(
    rows: Sequence[Mapping[str, object]],
    path: str | os.PathLike,
    *,
    title: str = "",
    ceiling: str | None = "oracle",
    bands: Sequence[str] | None = None,
    target: float | None = None,
) -> Path:
    """Accuracy vs mean samples per prompt, one line per policy (matplotlib, Agg).

    ``bands``: policies whose 95% interval is shaded (all when None; intervals over the same prompts
    overlap heavily, so shading only the baseline keeps the plot readable). The ``ceiling`` policy is
    drawn dashed: it is a bound, not a result. ``target``: a dotted horizontal line (e.g. the
    baseline's accuracy at its reference budget, for reading savings at equal accuracy).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for policy in dict.fromkeys(str(r["policy"]) for r in rows):
        pts = sorted((r for r in rows if r["policy"] == policy), key=lambda r: float(r["spend"]))
        x = [float(r["spend"]) for r in pts]
        style = "--" if policy == ceiling else "-"
        label = f"{policy} (ceiling)" if policy == ceiling else policy
        line = ax.plot(x, [float(r["accuracy"]) for r in pts], style, marker="o", ms=3, label=label)[0]
        if bands is None or policy in bands:
            ax.fill_between(x, [float(r["low"]) for r in pts], [float(r["high"]) for r in pts],
                            color=line.get_color(), alpha=0.12, lw=0)
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean samples per prompt (spent)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
