"""Per-prompt sampling budgets under one total budget B (mean samples per prompt x prompts).

Policies (all spend at most ``floor(B * prompts)`` samples, counting pilots):
- ``uniform``: the same k for every prompt (self-consistency baseline, Wang et al. 2023).
- ``oracle``: knows each prompt's true maj@k curve (from all its recorded samples) and solves the
  knapsack on it; a ceiling to report, never a result.
- ``knapsack``: pilot samples -> Dirichlet (voting) or Beta (coverage) posterior per prompt ->
  ``scrimp.allocators.allocate_counts`` on the expected utility -> spend (Knapsack RL, Li et al. 2025,
  generalized from training rollouts to inference).
- ``sequential``: rounds of allocate / sample / update with early stopping (the Dirichlet cap-majority
  rule, the default; Adaptive-Consistency Beta rule, Aggarwal et al. 2023; ESC window rule, Li et al.
  2024); the budget a stopped prompt does not use stays in the pool for the prompts still open, most
  uncertain first.
- ``compute_optimal``: Snell et al. (2024): difficulty bins from pilot statistics; the best option per
  bin under the budget is chosen on a calibration split (see ``fit_compute_optimal``) and applied to a
  disjoint evaluation split.
- ``esc`` and ``adaptive_consistency``: the two published early-stopping baselines with their
  published defaults (ESC: windows of 5, cap 40; Adaptive-Consistency: Beta rule, threshold 0.95, cap
  40), run per prompt; the total budget only caps them (it binds below their natural spend).
- ``stop_reallocate``: stopping and reallocation in one policy: rounds; after each, stop the decided
  prompts and the hopeless ones, and give the next samples to the open prompts with the highest
  expected marginal gain per sample (``coverage``: stop at the first verified success).

Everything is driven through the ``Generator`` protocol (``sample(ids, counts)``); a generator with
``remaining(id)`` (the replay backend) also caps each prompt at what was recorded. Run a policy with
``run_policy``: it checks the policy's parameters (``check_params``) and the budget before anything is
sampled.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from scrimp.checks import check_choice, check_integer, check_number, is_real
from scrimp.ttc.evaluate import maj_at_k, plurality
from scrimp.ttc.generate import Generator, ReplayPrompt, Sample
from scrimp.ttc.stopping import (
    RULES,
    answer_counts,
    beta_confidence,
    beta_tail_above_half,
    cap_majority_probability,
    leader_counts,
    should_stop,
    window_agrees,
)

POLICIES = ("uniform", "oracle", "knapsack", "sequential", "compute_optimal", "esc", "adaptive_consistency",
            "stop_reallocate")
# The published baselines: every comparison table shows them at these defaults, beside uniform.
BASELINES = ("esc", "adaptive_consistency")
UTILITIES = ("majority", "coverage")
PRIORITIES = ("gain", "confidence")
# The cap-majority rule sums the vote at the cap exactly, O(answers x cap^3) per count signature.
MAX_DIRICHLET_HORIZON = 1024


@dataclass
class PolicyOutcome:
    """What a policy did: the chosen answer and the samples spent per prompt, and the total budget."""

    answers: list[str | None]
    spent: np.ndarray
    budget: int
    samples: list[list[Sample]] = field(repr=False, default_factory=list)
    info: dict = field(default_factory=dict)


class BudgetBelowPilot(ValueError):
    """The budget cannot pay for a policy's pilot samples. Cross-fitting skips such a candidate at
    that budget; every other ValueError is bad input."""


def check_budget(value, name: str = "budget") -> float:
    """A mean budget per prompt as a float: a finite number >= 1 (a prompt without a sample has no answer)."""
    if not is_real(value) or not 1 <= value < math.inf:
        raise ValueError(f"{name} must be a positive number of samples per prompt (at least 1, so that every "
                         f"prompt gets a sample), got {value!r}")
    return float(value)


def total_budget(budget_per_prompt: float, n_prompts: int) -> int:
    """The total sample budget ``floor(B * prompts)`` (B = mean samples per prompt, at least 1)."""
    budget = check_budget(budget_per_prompt)
    return int(math.floor(budget * check_integer("n_prompts", n_prompts, 1) + 1e-9))


def _capacity(generator: Generator, ids: Sequence[str], k_max: int | None) -> np.ndarray:
    """Most samples each prompt may still receive: ``k_max`` and, for replay, what was recorded."""
    cap = np.full(len(ids), k_max if k_max is not None else np.iinfo(np.int64).max // 4, dtype=np.int64)
    if hasattr(generator, "remaining"):
        cap = np.minimum(cap, [generator.remaining(i) for i in ids])
    return cap


def _check_pilot(pilot: int, ids: Sequence[str], budget: int) -> None:
    if pilot * len(ids) > budget:
        raise BudgetBelowPilot(
            f"budget {budget / len(ids):.3g} samples per prompt is below the pilot cost of {pilot} per prompt"
        )


def _draw_pilots(generator: Generator, ids: Sequence[str], budget: int, pilot: int, k_max: int | None,
                 finite_cap_for: str | None) -> tuple[np.ndarray, list[list[Sample]], int]:
    """The start of a round-based policy: each prompt's cap, its pilot samples, and the pool left.

    ``finite_cap_for`` names the rule that needs a finite cap per prompt (the Dirichlet horizon), if any.
    """
    _check_pilot(pilot, ids, budget)
    cap = _capacity(generator, ids, k_max)
    if finite_cap_for and int(cap.max()) > MAX_DIRICHLET_HORIZON:
        raise ValueError(f"{finite_cap_for} needs a finite cap per prompt (k_max <= {MAX_DIRICHLET_HORIZON}), "
                         f"got k_max={k_max!r} with a generator that does not bound the samples")
    held: list[list[Sample]] = [[] for _ in ids]
    _draw(generator, ids, np.minimum(np.full(len(ids), pilot), cap), held)
    return cap, held, budget - sum(len(h) for h in held)


def _select(samples: list[Sample], utility: str, rng: np.random.Generator) -> str | None:
    """Final answer: plurality vote, or (coverage) a sample a perfect verifier accepts when any does."""
    if utility == "coverage":
        accepted = [s for s in samples if s.correct]
        return accepted[0].answer if accepted else plurality([s.answer for s in samples], rng)
    return plurality([s.answer for s in samples], rng)


def _draw(generator: Generator, ids: Sequence[str], counts: np.ndarray, held: list[list[Sample]]) -> None:
    idx = [i for i, c in enumerate(counts) if c > 0]
    if not idx:
        return
    got = generator.sample([ids[i] for i in idx], [int(counts[i]) for i in idx])
    for i, new in zip(idx, got):
        held[i].extend(new)


def _finish(generator, ids, held, budget, utility, rng, **info) -> PolicyOutcome:
    spent = np.array([len(h) for h in held], dtype=np.int64)
    if spent.sum() > budget:  # an invariant, not an input error: never report an overspent run
        raise AssertionError(f"policy spent {spent.sum()} samples over its budget {budget}")
    answers = [_select(h, utility, rng) for h in held]
    return PolicyOutcome(answers, spent, budget, held, info)


def uniform(generator: Generator, ids: Sequence[str], budget: int, *, rng: np.random.Generator,
            utility: str = "majority", k_max: int | None = None) -> PolicyOutcome:
    """Every prompt gets floor(budget / prompts) samples; the remainder goes to random prompts."""
    cap = _capacity(generator, ids, k_max)
    base, extra = divmod(budget, len(ids))
    counts = np.full(len(ids), base, dtype=np.int64)
    counts[rng.permutation(len(ids))[:extra]] += 1
    counts = np.minimum(counts, cap)
    held: list[list[Sample]] = [[] for _ in ids]
    _draw(generator, ids, counts, held)
    return _finish(generator, ids, held, budget, utility, rng)


def _dirichlet_table(held: list[list[Sample]]) -> tuple[np.ndarray, int]:
    """Pilot answer counts per prompt, leader first, then zero-count classes to a common width.

    Only the first zero after a prompt's seen answers is its "unseen answer" class; the padding
    beyond it must carry no prior mass (``expected_mode_majority`` drops it), so that a prompt's
    posterior does not depend on how many answers the other prompts saw."""
    rows = [answer_counts([s.answer for s in h]) for h in held]
    width = max(len(r) for r in rows) + 1
    table = np.zeros((len(held), width))
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table, width


def expected_mode_majority(counts: np.ndarray, ks: np.ndarray, *, prior: float = 0.5, draws: int = 256,
                           seed: int = 0) -> np.ndarray:
    """E over a Dirichlet(counts + prior) posterior of P(a vote over k samples elects the mode of the
    answer distribution), for each row of ``counts`` (items, answers) and each k in ``ks``: (items, len(ks)).

    Monte Carlo over ``draws`` seeded posterior draws; each draw is sorted so that its mode is answer 0,
    then ``scrimp.allocators.utility.majority`` gives the exact vote accuracy. Unlike the probability
    of electing the pilot's leader, this rewards resolving a contested prompt (a tie in the pilot gains
    from more samples) rather than confirming an agreed one. Rows with the same counts are computed once.
    """
    from scrimp.allocators.utility import majority

    check_number("prior", prior, low=0, open_low=True)
    ks = np.asarray(ks, dtype=np.int64)
    unique, inverse = np.unique(np.asarray(counts, float), axis=0, return_inverse=True)
    rows = []
    for padded in unique:
        # The answers seen plus exactly one class for every unseen answer: zero-count padding beyond
        # it (from a wider table) would add prior mass and make a prompt's posterior depend on the
        # other prompts. Each distinct pilot signature has its own seeded draws, cached because
        # signatures repeat across runs.
        row = np.append(padded[padded > 0], 0.0)
        key = (tuple(row), tuple(ks), prior, draws, seed)
        if key not in _MODE_MAJORITY:
            rng = np.random.default_rng([seed, *row.astype(np.int64).tolist()])
            theta = -np.sort(-rng.dirichlet(row + prior, size=draws), axis=-1)  # mode first
            _MODE_MAJORITY[key] = majority(ks[None, :], theta[:, None, :], correct_index=0).mean(axis=0)
        rows.append(_MODE_MAJORITY[key])
    return np.stack(rows)[np.ravel(inverse)]


_MODE_MAJORITY: dict = {}


def vote_gain(answers: Sequence[str | None], *, prior: float = 1.0, lookahead: int = 2) -> float:
    """Expected gain in P(the vote elects the mode) from ``lookahead`` more samples, under the
    Dirichlet posterior of the answers seen so far (plus one unseen answer). Two samples by default,
    because one sample's gain alternates with the parity of the count (ties at even counts)."""
    counts = answer_counts(answers)
    key = (counts, prior, lookahead)
    if key not in _VOTE_GAIN:
        n = sum(counts)
        table = np.array([[*counts, 0]], dtype=float)
        values = expected_mode_majority(table, np.array([max(n, 1), n + lookahead]), prior=prior)[0]
        _VOTE_GAIN[key] = float(values[1] - values[0])
    return _VOTE_GAIN[key]


_VOTE_GAIN: dict = {}


def knapsack(generator: Generator, ids: Sequence[str], budget: int, *, rng: np.random.Generator,
             utility: str = "majority", pilot: int = 2, prior: float = 0.5, k_max: int | None = 40) -> PolicyOutcome:
    """Pilot -> posterior -> knapsack on expected utility -> spend.

    ``majority``: Dirichlet posterior over the answers seen in the pilot (plus one unseen answer),
    expected probability that the vote over the pilot + k samples elects the MODE of the answer
    distribution (``expected_mode_majority``; the vote's target when no verifier is available).
    ``coverage``: Beta posterior on the pilot's verified successes, expected
    1 - (1 - p)^k. Both through ``scrimp.allocators``.
    """
    from scrimp.allocators import allocate_counts
    from scrimp.allocators.posterior import BetaPosterior

    _check_pilot(pilot, ids, budget)
    cap = _capacity(generator, ids, k_max)
    pilots = np.minimum(pilot, cap)  # a prompt with fewer recorded samples than the pilot gets them all
    held: list[list[Sample]] = [[] for _ in ids]
    _draw(generator, ids, pilots, held)
    room = cap - pilots
    extra_cap = int(room.max())
    if extra_cap == 0:  # every prompt's recorded samples went into its pilot: nothing left to buy
        return _finish(generator, ids, held, budget, utility, rng, method="pilot only", optimal=True,
                       requested=pilots)
    if utility == "coverage":
        wins = np.array([sum(bool(s.correct) for s in h) for h in held], dtype=float)
        post = BetaPosterior(wins[:, None], (pilots - wins)[:, None], prior=(prior, prior))
        value = post.expected_coverage(pilots[:, None] + np.arange(extra_cap + 1)[None, :])
    else:
        table, _ = _dirichlet_table(held)
        value = np.empty((len(ids), extra_cap + 1))
        for size in np.unique(pilots):  # one call per pilot size (all prompts, unless some are short)
            rows = pilots == size
            value[rows] = expected_mode_majority(table[rows], np.arange(extra_cap + 1) + size, prior=prior)
    # No value beyond what a prompt has recorded: the solver then never buys samples it cannot draw.
    value = np.where(np.arange(extra_cap + 1)[None, :] <= room[:, None], value,
                     value[np.arange(len(ids)), room][:, None])
    alloc = allocate_counts(lambda k, v: v[:, k[0]], value, budget - int(pilots.sum()), k_min=0, k_max=extra_cap)
    requested = np.asarray(alloc.counts, dtype=np.int64)
    _draw(generator, ids, np.minimum(requested, room), held)
    return _finish(generator, ids, held, budget, utility, rng, method=alloc.method, optimal=alloc.optimal,
                   requested=pilots + requested)


def oracle(generator: Generator, ids: Sequence[str], budget: int, *, rng: np.random.Generator,
           prompts: Sequence[ReplayPrompt], utility: str = "majority", k_max: int | None = 40) -> PolicyOutcome:
    """Knapsack on each prompt's TRUE expected accuracy (exact maj@k / pass@k over all its recorded
    samples). Uses the references: a ceiling for reporting, never a result."""
    from scrimp.allocators import allocate_counts

    by_id = {p.id: p for p in prompts}
    missing = [pid for pid in ids if pid not in by_id]
    if missing:
        raise ValueError(f"prompts must hold every prompt of ids (the oracle reads their recorded samples), "
                         f"but {len(missing)} are missing, e.g. {missing[0]!r}")
    cap = _capacity(generator, ids, k_max)
    kmax = int(cap.max())
    table = np.zeros((len(ids), kmax + 1))
    for i, pid in enumerate(ids):
        curve = _true_curve(by_id[pid], utility)
        reach = min(kmax, int(cap[i]), len(curve) - 1)
        table[i, : reach + 1] = curve[: reach + 1]
        table[i, reach + 1 :] = curve[reach]
    alloc = allocate_counts(lambda k, t: t[:, k[0]], table, budget, k_min=0, k_max=kmax)
    counts = np.minimum(np.asarray(alloc.counts, dtype=np.int64), cap)
    held: list[list[Sample]] = [[] for _ in ids]
    _draw(generator, ids, counts, held)
    return _finish(generator, ids, held, budget, utility, rng, method=alloc.method)


_TRUE_CURVES: dict = {}


def _true_curve(p: ReplayPrompt, utility: str) -> np.ndarray:
    """Exact expected accuracy of k = 0..n samples of this prompt (maj@k or pass@k), cached."""
    from scrimp.ttc.evaluate import pass_at_k

    key = (id(p), utility)
    if key not in _TRUE_CURVES:
        n = len(p.samples)
        wins = sum(bool(s.correct) for s in p.samples)
        ref = correct_answers(p)
        curve = [0.0] + [
            pass_at_k(n, wins, k) if utility == "coverage" else maj_at_k([s.answer for s in p.samples], ref, k)
            for k in range(1, n + 1)
        ]
        _TRUE_CURVES[key] = (p, np.array(curve))  # keep p alive so that its id stays unique
    return _TRUE_CURVES[key][1]


def correct_answers(p: ReplayPrompt) -> frozenset[str]:
    """The normalized answers that count as right for this prompt.

    Where the recorded samples carry correctness flags, every answer flagged correct (a grader may
    accept several strings: ``0.5`` and ``1/2``); where none does, every recorded answer that matches
    the reference (``verify.exact_match``; a file's own answers are kept as written) and the
    normalized reference itself.
    """
    from scrimp.ttc.verify import exact_match, normalize_answer

    if any(s.correct is not None for s in p.samples):
        return frozenset(s.answer for s in p.samples if s.correct and s.answer is not None)
    ref = normalize_answer(p.reference)
    matching = {s.answer for s in p.samples if s.answer is not None and exact_match(s.answer, p.reference)}
    return frozenset(matching | ({ref} if ref is not None else set()))


def sequential(generator: Generator, ids: Sequence[str], budget: int, *, rng: np.random.Generator,
               utility: str = "majority", pilot: int = 2, rule: str = "dirichlet", threshold: float = 0.95,
               prior: float = 1.0, window: int = 3, k_max: int | None = 40, priority: str = "confidence") -> PolicyOutcome:
    """Rounds of allocate / sample / update with early stopping; freed budget stays in the pool.

    Round 0 draws ``pilot`` samples per prompt. Each later round gives one more sample to every open
    prompt (one not yet stopped by ``rule`` and below its cap); when the pool cannot cover all of them,
    ``priority`` decides who goes first: ``gain`` (largest expected gain of the vote from two more
    samples under the Dirichlet posterior, ``vote_gain``: a contested prompt before a hopeless one) or
    ``confidence`` (lowest Adaptive-Consistency confidence first). Stops when no prompt
    is open or the pool is empty. ``rule``: ``beta`` (Adaptive-Consistency), ``window`` (ESC; windows
    counted from the first sample), ``either``, or ``dirichlet`` (the cap-majority probability,
    ``stopping.cap_majority_probability``, with the prompt's cap as horizon; it also ranks the prompts
    under ``priority="confidence"``).
    """
    cap, held, pool = _draw_pilots(generator, ids, budget, pilot, k_max,
                                   "rule='dirichlet'" if rule == "dirichlet" else None)
    stopped = np.zeros(len(ids), dtype=bool)
    rounds = 0
    while pool > 0:
        for i in np.nonzero(~stopped)[0]:
            answers = [s.answer for s in held[i]]
            if len(held[i]) >= cap[i] or should_stop(answers, rule, threshold=threshold, prior=prior, window=window,
                                                      horizon=int(cap[i])):
                stopped[i] = True
        open_ = np.nonzero(~stopped)[0]
        if open_.size == 0:
            break
        if open_.size > pool:
            tiebreak = rng.random(open_.size)
            if priority == "gain":
                gain = np.array([vote_gain([s.answer for s in held[i]], prior=prior) for i in open_])
                open_ = open_[np.lexsort((tiebreak, -gain))[:pool]]
            else:
                conf = np.array([_confidence(held[i], rule, prior, int(cap[i])) for i in open_])
                open_ = open_[np.lexsort((tiebreak, conf))[:pool]]
        counts = np.zeros(len(ids), dtype=np.int64)
        counts[open_] = 1
        _draw(generator, ids, counts, held)
        pool -= open_.size
        rounds += 1
    return _finish(generator, ids, held, budget, utility, rng, rounds=rounds, open=int((~stopped).sum()))


def _confidence(samples: list[Sample], rule: str, prior: float, horizon: int) -> float:
    """The stopping statistic used to rank open prompts (least confident first): the cap-majority
    probability for the ``dirichlet`` rule, the Adaptive-Consistency Beta confidence otherwise."""
    answers = [s.answer for s in samples]
    if rule == "dirichlet":
        return cap_majority_probability(answer_counts(answers), len(answers), horizon, prior)
    return beta_confidence(answers, prior)


# ---------------------------------------------------------------- compute-optimal (Snell et al. 2024)


@dataclass
class ComputeOptimalPlan:
    """Fitted on a calibration split: pilot size, bin of each pilot statistic (the leader's vote count
    in the pilot), and per bin the calibration accuracy of giving a prompt k samples in total."""

    pilot: int
    bin_of_count: dict[int, int]
    accuracy: np.ndarray  # (bins, k_max + 1): calibration accuracy when a prompt of the bin gets k samples
    k_max: int


def pilot_statistic(samples: Sequence[Sample]) -> int:
    """Difficulty statistic of a pilot: votes of its leading answer (all agree = easy)."""
    top = Counter(s.answer for s in samples if s.answer is not None).most_common(1)
    return top[0][1] if top else 0


def fit_compute_optimal(calibration: Sequence[ReplayPrompt], *, pilot: int = 3, k_max: int = 40,
                        repeats: int = 8, min_bin: int = 10, seed: int = 0) -> ComputeOptimalPlan:
    """Estimate, on calibration prompts (with references), the accuracy of majority voting with k
    total samples for each pilot-statistic bin, conditioning on the pilot actually drawn.

    Bins are the distinct pilot statistics, merged with a neighbour while a bin holds fewer than
    ``min_bin`` calibration draws. ``repeats`` replay orders per prompt. The chosen k per bin is made
    later, under the evaluation split's budget and bin counts (``compute_optimal``).
    """
    from scrimp.ttc.generate import ReplayGenerator

    if not calibration:
        raise ValueError("calibration must hold at least one prompt")
    check_fit_params(dict(pilot=pilot, k_max=k_max, repeats=repeats, min_bin=min_bin))
    sums = np.zeros((pilot + 1, k_max + 1))
    seen = np.zeros(pilot + 1)
    rng = np.random.default_rng(seed)
    for r in range(repeats):
        gen = ReplayGenerator(calibration, seed=seed * 1000 + r)
        for p in calibration:
            n = len(p.samples)
            if n < pilot:
                continue
            drawn = gen.sample([p.id], n)[0]
            stat = pilot_statistic(drawn[:pilot])
            ref = correct_answers(p)
            seen[stat] += 1
            # Accuracy of the vote over the first k of this seeded order (k >= pilot keeps the pilot).
            for k in range(1, k_max + 1):
                kk = min(k, n)
                sums[stat, k] += plurality([s.answer for s in drawn[:kk]], rng) in ref
    bins, bin_of_count, acc_rows, run, run_seen = [], {}, [], np.zeros(k_max + 1), 0.0
    for stat in range(pilot + 1):
        run, run_seen = run + sums[stat], run_seen + seen[stat]
        bins.append(stat)
        if run_seen >= min_bin or stat == pilot:
            for s in bins:
                bin_of_count[s] = len(acc_rows)
            acc_rows.append(run / max(run_seen, 1.0))
            bins, run, run_seen = [], np.zeros(k_max + 1), 0.0
    return ComputeOptimalPlan(pilot, bin_of_count, np.array(acc_rows), k_max)


def compute_optimal(generator: Generator, ids: Sequence[str], budget: int, *, rng: np.random.Generator,
                    plan: ComputeOptimalPlan, utility: str = "majority") -> PolicyOutcome:
    """Apply a calibration plan: pilot, bin each prompt by its pilot statistic, then choose k per bin by
    the multiple-choice knapsack (``scrimp.allocators.solve``) over bins with the calibration accuracy,
    under this split's budget and its observed bin counts (no labels of this split are used)."""
    from scrimp.allocators import solve

    if utility != "majority":
        raise ValueError("compute_optimal supports utility='majority' only (its plan is fitted for voting)")
    _check_pilot(plan.pilot, ids, budget)
    cap = _capacity(generator, ids, plan.k_max)
    held: list[list[Sample]] = [[] for _ in ids]
    _draw(generator, ids, np.minimum(np.full(len(ids), plan.pilot), cap), held)
    bins = np.array([plan.bin_of_count[pilot_statistic(h)] for h in held])
    n_bins, kmax = plan.accuracy.shape[0], plan.k_max
    sizes = np.bincount(bins, minlength=n_bins)
    ks = np.arange(plan.pilot, kmax + 1)
    costs = np.outer(sizes, ks - plan.pilot).astype(np.int64)
    values = sizes[:, None] * plan.accuracy[:, ks]
    alloc = solve(costs, values, budget - plan.pilot * len(ids))
    k_bin = ks[np.asarray(alloc.choice)]
    extra = np.minimum(k_bin[bins], cap) - np.array([len(h) for h in held])
    _draw(generator, ids, np.maximum(extra, 0), held)
    return _finish(generator, ids, held, budget, utility, rng, k_per_bin=k_bin.tolist(), bin_sizes=sizes.tolist())


# ---------------------------------------------------------------- published baselines and stop-and-reallocate


def _open_prompts(held: list[list[Sample]], stopped: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Indices of prompts neither stopped nor at their cap."""
    drawn = np.array([len(h) for h in held], dtype=np.int64)
    return np.nonzero(~stopped & (drawn < cap))[0]


def _serve_in_random_order(candidates: np.ndarray, need: np.ndarray, pool: int,
                           rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Per-prompt sample counts for one round. When the pool cannot pay every prompt's ``need``, each open
    prompt gets an equal share and the remainder goes one sample each to prompts in a random order (a
    baseline has no ranking of its own, so none is invented for it; paying whole windows to some
    prompts instead would leave others with no sample at all). Returns the counts over
    ``candidates`` and what is left of the pool."""
    need = np.asarray(need, dtype=np.int64)
    if need.sum() <= pool:
        return need.copy(), pool - int(need.sum())
    counts = np.minimum(need, pool // candidates.size)
    left = pool - int(counts.sum())
    for j in rng.permutation(candidates.size):
        if left == 0:
            break
        if counts[j] < need[j]:
            counts[j] += 1
            left -= 1
    return counts, left


def _round(generator, ids, held, candidates: np.ndarray, counts: np.ndarray) -> None:
    full = np.zeros(len(ids), dtype=np.int64)
    full[candidates] = counts
    _draw(generator, ids, full, held)


def _early_stopping(generator: Generator, ids: Sequence[str], budget: int, rng: np.random.Generator, utility: str,
                    cap: np.ndarray, step: int, stops: Callable[[list[str | None]], bool]) -> PolicyOutcome:
    """The loop the published baselines share: every open prompt draws ``step`` more samples a round
    (fewer only where its cap is nearer) and is judged by ``stops`` on all its answers after each round,
    until every prompt has stopped or reached its cap or the pool is spent. When the pool cannot pay
    every open prompt's step, each gets an equal part of it (``_serve_in_random_order``)."""
    held: list[list[Sample]] = [[] for _ in ids]
    stopped = np.zeros(len(ids), dtype=bool)
    pool, rounds = budget, 0
    while pool > 0:
        open_ = _open_prompts(held, stopped, cap)
        if open_.size == 0:
            break
        need = np.minimum(step, cap[open_] - np.array([len(held[i]) for i in open_]))
        counts, pool = _serve_in_random_order(open_, need, pool, rng)
        _round(generator, ids, held, open_, counts)
        for i in open_[counts > 0]:
            stopped[i] = stops([s.answer for s in held[i]])
        rounds += 1
    return _finish(generator, ids, held, budget, utility, rng, rounds=rounds)


def esc_cap(cap: np.ndarray, window: int) -> np.ndarray:
    """ESC's cap in whole windows: ``floor(cap / window)`` windows, as its code samples
    (``range(sc_num // slice)`` in the authors' scripts), so the remainder of a cap that is not a multiple
    of the window is never drawn. A prompt with fewer recorded samples than one window draws what it has
    (one short window, which ends it), so that it still has an answer."""
    return np.where(cap >= window, cap // window * window, cap)


def esc(generator: Generator, ids: Sequence[str], budget: int, *, rng: np.random.Generator,
        utility: str = "majority", window: int = 5, k_max: int | None = 40) -> PolicyOutcome:
    """ESC (Li et al., ICLR 2024, "Escape Sky-high Cost") with its published defaults: each prompt draws
    windows of ``window`` samples and stops once every answer of its latest window is the same
    (``stopping.window_agrees``), or after the whole windows its cap holds (``esc_cap``; 40, as in the
    paper's last-letters script); the answer is the vote over all its samples. The total budget only caps
    it: a part of a window paid from a short pool ends the run and is never judged as a window."""
    cap = esc_cap(_capacity(generator, ids, k_max), window)
    return _early_stopping(generator, ids, budget, rng, utility, cap, window,
                           lambda answers: window_agrees(answers, window))


def adaptive_consistency(generator: Generator, ids: Sequence[str], budget: int, *, rng: np.random.Generator,
                         utility: str = "majority", threshold: float = 0.95, prior: float = 1.0,
                         k_max: int | None = 40) -> PolicyOutcome:
    """Adaptive-Consistency (Aggarwal et al., EMNLP 2023) with its published defaults: one sample at a
    time per prompt; stop once the Beta confidence that the leader is the mode,
    P(Beta(v1 + 1, v2 + 1) > 1/2), reaches ``threshold`` (0.95), or at the cap (40). The total budget
    only caps it: when the pool cannot pay every open prompt, a random subset gets the last samples."""
    return _early_stopping(generator, ids, budget, rng, utility, _capacity(generator, ids, k_max), 1,
                           lambda answers: beta_confidence(answers, prior) >= threshold)


def published_params(name: str) -> dict:
    """The published defaults of a baseline in ``BASELINES``: its signature's defaults (the one place they
    are written; the run, its configs and the benchmark read them from here)."""
    check_choice("baseline", name, BASELINES)
    return {k: v for k, v in _keywords(POLICY_FUNCTIONS[name]).items() if k != "utility"}


def is_hopeless(counts: Sequence[int], drawn: int, hopeless: int) -> bool:
    """After ``hopeless`` samples (0: never), a prompt on which no answer has come twice (``counts``: votes
    per answer, leader first), or for coverage no verified success (``counts`` = (successes,)), is given
    up: its posterior puts no answer ahead, so more samples are unlikely to form a correct majority, and
    their budget is better spent where one is forming."""
    return 0 < hopeless <= drawn and (counts[0] if counts else 0) <= 1


@functools.lru_cache(maxsize=262144)
def _majority_verdict(counts: tuple[int, ...], drawn: int, horizon: int, threshold: float, prior: float,
                      price: float, hopeless: int) -> tuple[str | None, float]:
    """(why a voting prompt stops now, or None; its gain per sample when it goes on), from its answer
    counts alone, so that replays and rounds that meet the same counts compute it once."""
    if drawn >= horizon or (counts and cap_majority_probability(counts, drawn, horizon, prior) >= threshold):
        return "decided", 0.0
    if is_hopeless(counts, drawn, hopeless):
        return "hopeless", 0.0
    v1 = counts[0] if counts else 0
    v2 = counts[1] if len(counts) > 1 else 0
    gain = pair_gain_per_sample(v1, v2, drawn, prior)
    return ("below price" if gain < price else None), gain


def pair_gain_per_sample(v1: int, v2: int, drawn: int, prior: float, lookahead: int = 2) -> float:
    """``gain_per_sample`` from the leader's and the runner-up's votes and the samples drawn."""
    rate = (v1 + v2 + 1.0) / (drawn + 2.0)
    return decision_gain(v1, v2, prior, lookahead) / lookahead * rate


def gain_per_sample(samples: Sequence[Sample], prior: float, lookahead: int = 2) -> float:
    """Expected marginal gain of one more sample for a voting prompt, per unit cost.

    The value of information of ``lookahead`` more votes between the leader and the runner-up
    (``decision_gain``), per sample, times the posterior mean share of samples that vote for either of
    the two (a sample that abstains or names a third answer costs as much and moves nothing). The
    pair reduction keeps it cheap (exact, cached by counts); the Dirichlet gain over all answers
    (``vote_gain``) costs about 70 ms per new count signature, which dominates a replay."""
    v1, v2 = leader_counts([s.answer for s in samples])
    return pair_gain_per_sample(v1, v2, len(samples), prior, lookahead)


@functools.lru_cache(maxsize=65536)
def decision_gain(v1: int, v2: int, prior: float, lookahead: int = 2) -> float:
    """Expected gain in P(the plurality of the top two is the mode of the pair) from ``lookahead`` more
    votes between them: with p ~ Beta(v1 + prior, v2 + prior) the leader's share of the pair and
    c = P(p > 1/2), the vote is right with probability max(c, 1 - c) now and, after x of the new votes go
    to the leader (Beta-binomial), with E[max(c_x, 1 - c_x)]. Never negative (the maximum is convex)."""
    a, b = v1 + prior, v2 + prior

    def right(a_: float, b_: float) -> float:
        c = beta_tail_above_half(a_, b_)
        return max(c, 1.0 - c)

    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    after = 0.0
    for x in range(lookahead + 1):
        log_p = (math.log(math.comb(lookahead, x)) + math.lgamma(a + x) + math.lgamma(b + lookahead - x)
                 - math.lgamma(a + b + lookahead) - log_b)
        after += math.exp(log_p) * right(a + x, b + lookahead - x)
    return max(after - right(a, b), 0.0)


def _coverage_verdict(solved: bool, drawn: int, horizon: int, prior: float, price: float,
                      hopeless: int) -> tuple[str | None, float]:
    """The same for a prompt under a verifier: a success decides it (stop at the first); the gain is the
    posterior chance that the next sample is its first success, Beta(prior, prior + failures)'s mean."""
    if solved or drawn >= horizon:
        return "decided", 0.0
    if is_hopeless((0,), drawn, hopeless):
        return "hopeless", 0.0
    gain = prior / (2 * prior + drawn)
    return ("below price" if gain < price else None), gain


class _Tally:
    """A prompt's running state for ``stop_reallocate``: its answers (votes by ``stopping.answer_counts``) and
    whether any sample passed the verifier."""

    def __init__(self):
        self.answers: list[str | None] = []
        self.solved = False

    @property
    def drawn(self) -> int:
        return len(self.answers)

    def add(self, samples: Sequence[Sample]) -> None:
        self.answers.extend(s.answer for s in samples)
        self.solved = self.solved or any(s.correct for s in samples)

    def counts(self) -> tuple[int, ...]:
        return answer_counts(self.answers)


def stop_reallocate(generator: Generator, ids: Sequence[str], budget: int, *, rng: np.random.Generator,
                    utility: str = "majority", pilot: int = 2, threshold: float = 0.95, prior: float = 1.0,
                    price: float = 0.0, hopeless: int = 0, k_max: int | None = 40) -> PolicyOutcome:
    """Stopping and reallocation in one policy, in rounds.

    Round 0 draws ``pilot`` samples per prompt (one for ``coverage``). After each round every open
    prompt's posterior is updated and the prompt is stopped when it is
    - decided: the Dirichlet cap-majority probability (``stopping.cap_majority_probability``, horizon =
      the prompt's cap) reaches ``threshold``; for ``coverage``, a sample passed the verifier;
    - hopeless (``is_hopeless``): ``hopeless`` samples and still no answer twice (no success);
    - not worth its price: its expected marginal gain per sample (``gain_per_sample``; coverage: the
      posterior chance of a first success) is below ``price``.
    The pool then pays one more sample to the open prompts with the highest gain per unit cost. With
    unit costs and one sample per prompt and round, taking them by decreasing gain is the exact
    solution of the round's knapsack. Whatever a stopped prompt does not spend stays in the pool.
    """
    pilot = 1 if utility == "coverage" else pilot
    cap, held, pool = _draw_pilots(generator, ids, budget, pilot, k_max,
                                   "stop_reallocate" if utility == "majority" else None)
    tallies = [_Tally() for _ in ids]
    for t, h in zip(tallies, held):
        t.add(h)
    open_ = np.arange(len(ids))
    why: Counter = Counter()
    rounds = 0
    while pool > 0 and open_.size:
        verdicts = [_coverage_verdict(tallies[i].solved, tallies[i].drawn, int(cap[i]), prior, price, hopeless)
                    if utility == "coverage" else
                    _majority_verdict(tallies[i].counts(), tallies[i].drawn, int(cap[i]), threshold, prior, price,
                                      hopeless)
                    for i in open_]
        why.update(reason for reason, _ in verdicts if reason is not None)
        going = np.array([reason is None for reason, _ in verdicts], dtype=bool)
        open_, gains = open_[going], np.array([g for _, g in verdicts])[going]
        if open_.size == 0:
            break
        take = open_[np.lexsort((rng.random(open_.size), -gains))[:pool]]
        got = generator.sample([ids[i] for i in take], 1)
        for i, new in zip(take, got):
            held[i].extend(new)
            tallies[i].add(new)
        pool -= take.size
        rounds += 1
    return _finish(generator, ids, held, budget, utility, rng, rounds=rounds, stopped=dict(why))


POLICY_FUNCTIONS: dict[str, Callable[..., PolicyOutcome]] = {
    "uniform": uniform,
    "oracle": oracle,
    "knapsack": knapsack,
    "sequential": sequential,
    "compute_optimal": compute_optimal,
    "esc": esc,
    "adaptive_consistency": adaptive_consistency,
    "stop_reallocate": stop_reallocate,
}


def _check_plan(plan) -> None:
    if not isinstance(plan, ComputeOptimalPlan):
        raise ValueError(f"plan must be a ComputeOptimalPlan (from fit_compute_optimal), got {type(plan).__name__}")


def _check_prompts(prompts) -> None:
    listed = isinstance(prompts, Sequence) and not isinstance(prompts, str)
    if not listed or not all(isinstance(p, ReplayPrompt) for p in prompts):
        raise ValueError(f"prompts must be a sequence of ReplayPrompt (recorded prompts with references), "
                         f"got {type(prompts).__name__}")


# One check per parameter name, shared by every policy that takes it (k_max is checked against pilot or ESC's
# window).
_PARAM_CHECKS: dict[str, Callable] = {
    "utility": lambda v: check_choice("utility", v, UTILITIES),
    "pilot": lambda v: check_integer("pilot", v, 1),
    "prior": lambda v: check_number("prior", v, low=0, open_low=True),
    "threshold": lambda v: check_number("threshold", v, low=0, high=1, open_low=True, open_high=True),
    "window": lambda v: check_integer("window", v, 1),
    "rule": lambda v: check_choice("rule", v, RULES),
    "priority": lambda v: check_choice("priority", v, PRIORITIES),
    "price": lambda v: check_number("price", v, low=0),
    "hopeless": lambda v: check_integer("hopeless", v, 0),
    "repeats": lambda v: check_integer("repeats", v, 1),
    "min_bin": lambda v: check_integer("min_bin", v, 0),
    "plan": _check_plan,
    "prompts": _check_prompts,
}


def _keywords(fn: Callable) -> dict[str, object]:
    """The keyword-only parameters of ``fn`` (but ``rng``) with their defaults (``inspect.Parameter.empty``
    for a required one)."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.kind is p.KEYWORD_ONLY and k != "rng"}


def _check_values(params: Mapping, takes: Mapping, what: str, *, k_max_optional: bool = True) -> None:
    """Refuse a name outside ``takes`` or a bad value, each in one sentence; unset names at their defaults."""
    for key in params:
        if key not in takes:
            raise ValueError(f"{what} takes no parameter {key!r}; it takes {', '.join(takes)}")
    values = {**{k: d for k, d in takes.items() if d is not inspect.Parameter.empty}, **params}
    for key, value in values.items():
        if key in _PARAM_CHECKS:
            _PARAM_CHECKS[key](value)
    if "k_max" in values:
        # A cap below the pilot cannot pay it; below ESC's window (a policy with a window and no pilot), it
        # holds no whole window, and ESC draws whole windows only (``esc_cap``).
        floor = next((k for k in ("pilot", "window") if values.get(k) is not None), None)
        check_integer("k_max", values["k_max"], 1 if floor is None else values[floor], minimum_name=floor,
                      optional=k_max_optional)


def check_params(name: str, params: Mapping, *, complete: bool = True) -> None:
    """Refuse, in one sentence and before anything is sampled, a parameter that policy ``name`` does not
    take or a value it does not allow; with ``complete``, also a required one that is missing
    (cross-fitting supplies ``plan`` and ``prompts`` itself). The budget is ``run_policy``'s to check."""
    check_choice("policy", name, POLICIES)
    takes = _keywords(POLICY_FUNCTIONS[name])
    _check_values(params, takes, f"policy {name}")
    missing = [k for k, default in takes.items() if default is inspect.Parameter.empty and k not in params]
    if complete and missing:
        raise ValueError(f"policy {name} needs the parameter {missing[0]!r}")


def check_fit_params(params: Mapping) -> None:
    """Refuse bad ``fit_compute_optimal`` parameters in one sentence (the ones not given at their defaults)."""
    _check_values(params, _keywords(fit_compute_optimal), "fit_compute_optimal", k_max_optional=False)


def run_policy(name: str, generator: Generator, ids: Sequence[str], budget_per_prompt: float, *,
               seed: int = 0, **params) -> PolicyOutcome:
    """Run the policy ``name`` (one of ``POLICIES``) on prompts ``ids`` with mean budget
    ``budget_per_prompt`` (at least 1); the seed drives tie-breaking and any random choice of the
    policy. Parameters and budget are checked before anything is sampled."""
    check_params(name, params)
    if not ids:
        raise ValueError("ids must name at least one prompt")
    budget = total_budget(budget_per_prompt, len(ids))
    return POLICY_FUNCTIONS[name](generator, list(ids), budget, rng=np.random.default_rng(seed), **params)
