import math

import numpy as np
import pytest

from scrimp.ttc.verify import (
    PRMAsOutcome,
    aggregate_step_scores,
    exact_match,
    extract_answer,
    normalize_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Step 1.\nThe answer is 42.", "42"),
        ("First the answer is 3. Then again: The answer is 5.", "5"),
        ("We get \\boxed{\\frac{1}{2}} finally", "\\frac{1}{2}"),
        ("no phrase here\n\n  1,000  \n", "1,000"),
        ("Concatenating them is 'yajo'. The answer is yajo.", "yajo"),
        ("", None),
        ("Let me add them.\nFinal Answer: 42", "42"),
        ("Answer: (B)", "(B)"),
        ("The answer isn't 5; we must carry.\n7", "7"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_and_match():
    assert normalize_answer("  'OnEa'. ") == "onea"
    assert normalize_answer("1,000.50") == "1000.5"
    assert normalize_answer("A   b") == "a b"
    assert normalize_answer("...") is None
    assert exact_match("$1,000$", "1000.0")
    assert not exact_match("abc", "abd")
    assert not exact_match(None, "x")
    # numbers: one spelling each, so that votes for the same number land in one class
    assert [normalize_answer(a) for a in (".5", "-.5", "007", "-0", "+3", "7.50", "12.")] == \
        ["0.5", "-0.5", "7", "0", "3", "7.5", "12"]
    assert not exact_match("5", ".5") and exact_match("-.5", "-0.5")


def test_aggregations_match_numpy():
    s = np.random.default_rng(0).random(7)
    ref = {"last": s[-1], "min": s.min(), "prod": np.prod(s.astype(np.float64)), "mean": s.mean()}
    for how, value in ref.items():
        assert math.isclose(aggregate_step_scores(list(s), how), value, rel_tol=1e-12)
    with pytest.raises(ValueError, match="how must be one of"):
        aggregate_step_scores([0.5], "max")
    with pytest.raises(ValueError, match="at least one"):
        aggregate_step_scores([], "last")


def test_prm_as_outcome_splits_steps():
    class PRM:
        def score_steps(self, prompt, solutions):
            return [[len(s) / 10 for s in steps] for steps in solutions]

    scorer = PRMAsOutcome(PRM(), how="min")
    assert scorer.score("q", ["ab\n\nabcd", "abcde"]) == [0.2, 0.5]
