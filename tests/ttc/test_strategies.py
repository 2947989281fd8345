import numpy as np
import pytest

from scrimp.ttc.strategies import (
    adaptive_beam,
    beam_search,
    best_of_n,
    dvts,
    majority_vote,
    softmax_counts,
    weighted_majority,
)

from .synthetic import SyntheticGenerator, SyntheticPRM

DIST = {"a": 0.4, "b": 0.35, "c": 0.25}


def test_majority_converges_to_mode():
    hits = {n: 0 for n in (1, 3001)}
    for seed in range(40):
        for n in hits:
            hits[n] += majority_vote(SyntheticGenerator(DIST, seed=seed), "q", n, np.random.default_rng(seed)).answer == "a"
    # maj@1 picks the mode with its probability 0.4; with 3001 votes the margin 0.05 is ~3 sd
    assert hits[1] / 40 < 0.7 and hits[3001] / 40 >= 0.95


def test_costs_are_exact():
    gen = SyntheticGenerator(DIST, seed=0)
    res = majority_vote(gen, "q", 9)
    assert res.cost.samples == gen.calls["samples"] == 9 and res.cost.tokens == gen.calls["tokens"]


class ScoreByAnswer:
    def __init__(self, weights):
        self.weights, self.calls = weights, 0

    def score(self, prompt, completions):
        self.calls += len(completions)
        return [next(w for a, w in self.weights.items() if f"is {a}." in c) for c in completions]


def test_best_of_n_and_weighted_majority():
    scorer = ScoreByAnswer({"a": 0.1, "b": 0.2, "c": 0.9})
    gen = SyntheticGenerator(DIST, seed=3)
    res = best_of_n(gen, "q", 16, scorer)
    assert res.answer == "c" and res.cost.verifier_calls == scorer.calls == 16
    # weighted: totals 0.1*#a, 0.2*#b, 0.9*#c; check against a direct count of the drawn candidates
    gen = SyntheticGenerator(DIST, seed=4)
    res = weighted_majority(gen, "q", 30, scorer)
    counts = {a: sum(f"is {a}." in c for c in res.candidates) for a in DIST}
    totals = {a: counts[a] * w for a, w in scorer.weights.items()}
    assert res.answer == max(totals, key=totals.get)


@pytest.mark.parametrize("strategy", ["beam", "dvts", "adaptive"])
def test_search_finds_the_rare_correct_path(strategy):
    # One sample is right with q^depth = 0.125; a PRM that flags off-track steps makes search find it.
    wins = 0
    for seed in range(20):
        gen, prm = SyntheticGenerator(DIST, seed=seed, depth=3, q=0.5), SyntheticPRM()
        if strategy == "beam":
            res = beam_search(gen, "q", prm, n=8, m=4, max_steps=5)
        elif strategy == "dvts":
            res = dvts(gen, "q", prm, n=8, m=4, max_steps=5)
        else:
            res = adaptive_beam(gen, "q", prm, n=8, max_steps=5, temperature=0.2)
        wins += res.answer == "42"
        assert res.cost.samples == gen.calls["samples"] and res.cost.tokens == gen.calls["tokens"]
        assert res.cost.verifier_calls == prm.calls
    # the chance of never drawing an on-track step among 8 children per depth is tiny
    assert wins >= 18


def test_softmax_counts_sum_and_order():
    counts = softmax_counts([0.9, 0.1, 0.5], 10, 0.2)
    assert counts.sum() == 10 and counts[0] > counts[2] > counts[1]
    with pytest.raises(ValueError, match="temperature"):
        softmax_counts([0.1], 3, 0.0)


def test_bad_search_arguments():
    with pytest.raises(ValueError, match="multiple of the beam width"):
        beam_search(SyntheticGenerator(DIST), "q", SyntheticPRM(), n=6, m=4)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        majority_vote(SyntheticGenerator(DIST), "q", 0)
