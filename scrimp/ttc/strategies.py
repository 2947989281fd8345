"""Test-time strategies for one prompt: best-of-N, majority vote, weighted majority, beam search with a
process reward model, adaptive beam (REBASE-style), and DVTS. Each returns the chosen answer and an
exact cost record.

- best-of-N / weighted majority: Cobbe et al. (2021), Li et al. (2023, DiVeRSe); majority vote:
  Wang et al. (2023, self-consistency).
- beam search with a PRM (keep N/M, expand M per step) and DVTS (N/M independent subtrees): Snell et
  al. (2024), Beeching et al. (2024, huggingface/search-and-learn).
- adaptive beam: REBASE (Wu et al., 2024, "Inference Scaling Laws"): children per node proportional to
  softmax(reward / T) of a shrinking total width; plus a rule that halves the width when the top
  scores agree (the search is already confident, so more width buys little).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from scrimp.ttc.evaluate import plurality
from scrimp.ttc.generate import Generator, Sample, Step
from scrimp.ttc.verify import (
    AGGREGATIONS,
    OutcomeScorer,
    ProcessScorer,
    aggregate_step_scores,
    extract_answer,
    normalize_answer,
)


@dataclass
class Cost:
    """Exact cost of a strategy run. ``samples``: generator outputs (complete samples, or steps for
    search); ``tokens``: generated tokens (None when the generator does not report them);
    ``verifier_calls``: solutions or partial solutions scored by a reward model."""

    samples: int = 0
    tokens: int | None = 0
    verifier_calls: int = 0

    def add_generated(self, pieces: Sequence[Sample | Step]) -> None:
        """Count generated samples/steps and their tokens (tokens become unknown if any is)."""
        self.samples += len(pieces)
        for p in pieces:
            if p.tokens is None or self.tokens is None:
                self.tokens = None
            else:
                self.tokens += p.tokens


@dataclass
class StrategyResult:
    """The chosen (normalized) answer, the cost, and the final candidate solutions considered."""

    answer: str | None
    cost: Cost
    candidates: list[str] = field(default_factory=list)


def _check_n(n: int, name: str = "n") -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


def vote(answers: Sequence[str | None], rng: np.random.Generator | None = None) -> str | None:
    """Majority vote over normalized answers (self-consistency); ties broken with ``rng``."""
    return plurality(answers, rng)


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer with the largest summed score (weighted majority, Li et al. 2023)."""
    if len(answers) != len(scores):
        raise ValueError(f"answers ({len(answers)}) and scores ({len(scores)}) must have the same length")
    totals: dict[str, float] = defaultdict(float)
    for a, s in zip(answers, scores):
        if a is not None:
            totals[a] += float(s)
    return max(totals, key=totals.__getitem__) if totals else None


def best_by_score(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer of the highest-scoring solution (best-of-N); the first one on ties."""
    if len(answers) != len(scores):
        raise ValueError(f"answers ({len(answers)}) and scores ({len(scores)}) must have the same length")
    return answers[int(np.argmax(scores))] if len(answers) else None


def majority_vote(generator: Generator, prompt: str, n: int, rng: np.random.Generator | None = None) -> StrategyResult:
    """Sample n solutions and return the plurality answer (self-consistency, Wang et al. 2023)."""
    _check_n(n)
    samples = generator.sample([prompt], n)[0]
    cost = Cost()
    cost.add_generated(samples)
    return StrategyResult(vote([s.answer for s in samples], rng), cost, [s.text for s in samples])


def best_of_n(generator: Generator, prompt: str, n: int, scorer: OutcomeScorer) -> StrategyResult:
    """Sample n solutions, score each with an outcome reward model, return the best one's answer."""
    answers, scores, cost, texts = _sample_and_score(generator, prompt, n, scorer)
    return StrategyResult(best_by_score(answers, scores), cost, texts)


def weighted_majority(generator: Generator, prompt: str, n: int, scorer: OutcomeScorer) -> StrategyResult:
    """Sample n solutions, score them, return the answer with the largest total score."""
    answers, scores, cost, texts = _sample_and_score(generator, prompt, n, scorer)
    return StrategyResult(weighted_vote(answers, scores), cost, texts)


def _sample_and_score(generator: Generator, prompt: str, n: int, scorer: OutcomeScorer):
    """n samples scored by an outcome reward model, with their exact cost (tokens and verifier calls)."""
    _check_n(n)
    samples = generator.sample([prompt], n)[0]
    cost = Cost()
    cost.add_generated(samples)
    texts = [s.text for s in samples]
    scores = scorer.score(prompt, texts)
    cost.verifier_calls += len(samples)
    return [s.answer for s in samples], scores, cost, texts


@dataclass
class _Beam:
    steps: list[str]
    score: float = -math.inf
    finished: bool = False

    @property
    def text(self) -> str:
        return "".join(self.steps)


def _expand(generator: Generator, prompt: str, beams: list[_Beam], counts: Sequence[int], cost: Cost) -> list[_Beam]:
    """Children of each beam (``counts[i]`` of them), one new step each; cost counted exactly."""
    todo = [(b, c) for b, c in zip(beams, counts) if c > 0]
    children: list[_Beam] = []
    # Group by count: the protocol takes one n per call.
    for c in sorted({c for _, c in todo}):
        group = [b for b, cc in todo if cc == c]
        steps = generator.extend(prompt, [b.text for b in group], c)
        for b, new in zip(group, steps):
            cost.add_generated(new)
            children.extend(_Beam(b.steps + [s.text], finished=s.finished) for s in new)
    return children


def _score(prm: ProcessScorer, prompt: str, beams: list[_Beam], how: str, cost: Cost) -> None:
    if not beams:
        return
    step_scores = prm.score_steps(prompt, [b.steps for b in beams])
    cost.verifier_calls += len(beams)
    for b, s in zip(beams, step_scores):
        b.score = aggregate_step_scores(s, how)


def _finish(prompt: str, done: list[_Beam], active: list[_Beam], cost: Cost, select: str) -> StrategyResult:
    pool = done or active
    answers = [normalize_answer(extract_answer(b.text)) for b in pool]
    scores = [b.score for b in pool]
    answer = weighted_vote(answers, scores) if select == "weighted" else best_by_score(answers, scores)
    return StrategyResult(answer, cost, [b.text for b in pool])


def _check_search(n: int, m: int, max_steps: int, how: str, select: str) -> None:
    _check_n(n)
    _check_n(m, "m")
    _check_n(max_steps, "max_steps")
    if n % m:
        raise ValueError(f"n ({n}) must be a multiple of the beam width m ({m})")
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be one of {AGGREGATIONS}, got {how!r}")
    if select not in ("best", "weighted"):
        raise ValueError(f"select must be 'best' or 'weighted', got {select!r}")


def beam_search(
    generator: Generator,
    prompt: str,
    prm: ProcessScorer,
    n: int = 8,
    m: int = 4,
    *,
    max_steps: int = 20,
    how: str = "last",
    select: str = "best",
) -> StrategyResult:
    """Step-level beam search with a PRM: n partial solutions, keep the best n/m, expand each m times
    (Snell et al. 2024). Stops when n solutions are finished or after ``max_steps`` steps."""
    _check_search(n, m, max_steps, how, select)
    cost = Cost()
    done: list[_Beam] = []
    active = _expand(generator, prompt, [_Beam([])], [n], cost)
    for depth in range(max_steps):
        _score(prm, prompt, active, how, cost)
        done += [b for b in active if b.finished]
        active = [b for b in active if not b.finished]
        if len(done) >= n or not active or depth == max_steps - 1:
            break
        keep = sorted(active, key=lambda b: b.score, reverse=True)[: max(1, (n - len(done)) // m)]
        active = _expand(generator, prompt, keep, [m] * len(keep), cost)
    return _finish(prompt, done, active, cost, select)


def dvts(
    generator: Generator,
    prompt: str,
    prm: ProcessScorer,
    n: int = 8,
    m: int = 4,
    *,
    max_steps: int = 20,
    how: str = "last",
    select: str = "best",
) -> StrategyResult:
    """Diverse verifier tree search (Beeching et al. 2024): n/m independent subtrees, each keeps its
    single best partial solution and expands it m times per step; answers pooled across subtrees."""
    _check_search(n, m, max_steps, how, select)
    cost = Cost()
    done: list[_Beam] = []
    first = _expand(generator, prompt, [_Beam([])], [n], cost)
    trees = [first[i * m : (i + 1) * m] for i in range(n // m)]
    for depth in range(max_steps):
        _score(prm, prompt, [b for t in trees for b in t], how, cost)
        parents = []
        for t in trees:
            done += [b for b in t if b.finished]
            open_ = [b for b in t if not b.finished]
            if open_:
                parents.append(max(open_, key=lambda b: b.score))
        if not parents or depth == max_steps - 1:
            break
        children = _expand(generator, prompt, parents, [m] * len(parents), cost)
        trees = [children[i * m : (i + 1) * m] for i in range(len(parents))]
    active = [b for t in trees for b in t if not b.finished]
    return _finish(prompt, done, active, cost, select)


def softmax_counts(scores: Sequence[float], width: int, temperature: float) -> np.ndarray:
    """REBASE expansion counts: ``width * softmax(scores / T)`` rounded by largest remainder so that
    they sum to exactly ``width``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = np.asarray(scores, dtype=float) / temperature
    w = np.exp(s - s.max())
    share = width * w / w.sum()
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: width - counts.sum()]] += 1
    return counts


def adaptive_beam(
    generator: Generator,
    prompt: str,
    prm: ProcessScorer,
    n: int = 8,
    *,
    max_steps: int = 20,
    temperature: float = 0.1,
    agree_top: int = 3,
    agree_tol: float = 0.02,
    shrink: float = 0.5,
    how: str = "last",
    select: str = "weighted",
) -> StrategyResult:
    """Adaptive-width tree search: REBASE-style expansion (each active node gets children in proportion
    to softmax(reward / temperature); the width is n minus finished solutions) and a shrinking rule:
    when the ``agree_top`` best scores lie within ``agree_tol`` of each other, the width is multiplied
    by ``shrink`` (at least 1), since the search has converged and extra width buys little."""
    _check_search(n, 1, max_steps, how, select)
    if not 0 < shrink <= 1:
        raise ValueError(f"shrink must be in (0, 1], got {shrink}")
    if agree_top < 1 or agree_tol < 0:
        raise ValueError("agree_top must be >= 1 and agree_tol >= 0")
    cost = Cost()
    done: list[_Beam] = []
    width = n
    active = _expand(generator, prompt, [_Beam([])], [width], cost)
    for depth in range(max_steps):
        _score(prm, prompt, active, how, cost)
        done += [b for b in active if b.finished]
        active = [b for b in active if not b.finished]
        width = min(width, n - len(done))
        if width <= 0 or not active or depth == max_steps - 1:
            break
        top = sorted((b.score for b in active), reverse=True)[:agree_top]
        if len(top) == agree_top and top[0] - top[-1] <= agree_tol:
            width = max(1, math.floor(width * shrink))
        counts = softmax_counts([b.score for b in active], width, temperature)
        active = _expand(generator, prompt, active, counts.tolist(), cost)
    return _finish(prompt, done, active, cost, select)


STRATEGIES = {
    "majority": majority_vote,
    "best_of_n": best_of_n,
    "weighted_majority": weighted_majority,
    "beam": beam_search,
    "adaptive_beam": adaptive_beam,
    "dvts": dvts,
}
