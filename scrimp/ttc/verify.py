"""Answer extraction, normalization, exact match, and reward-model scorer interfaces.

Extraction follows the conventions of the chain-of-thought literature: the phrase "The answer is X"
(Kojima et al., 2022, "Large Language Models are Zero-Shot Reasoners"; Wei et al., 2022), the
``\\boxed{...}`` convention of MATH (Hendrycks et al., 2021) and, failing both, the last non-empty line.
Reward-model aggregation (``last``, ``min``, ``prod``, ``mean`` over per-step process rewards) follows
Lightman et al. (2023, "Let's Verify Step by Step") and Snell et al. (2024), as used in
huggingface/search-and-learn.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

AGGREGATIONS = ("last", "min", "prod", "mean")

# "The answer is X." — take the LAST occurrence: models often restate an intermediate guess first.
# Also "Answer: X" / "Final answer: X"; "is" must end a word ("the answer isn't 5" states nothing).
_ANSWER_IS = re.compile(r"\banswer(?:\s+is\b\s*[:：]?|\s*[:：])\s*(.+?)\s*(?:\.\s*(?:\n|$)|\.\s+(?=[A-Z])|\n|$)",
                        re.IGNORECASE)
_NUMBER = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$")
_STRIP_CHARS = string.whitespace + string.punctuation.replace("-", "").replace("+", "") + "“”‘’"


def _boxed_contents(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, with nested braces balanced (MATH convention)."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(text: str) -> str | None:
    """The raw answer stated in a completion, or None when there is none.

    Order of precedence: ``\\boxed{...}`` (last one), then "the answer is X" (last one), then the
    last non-empty line. Never looks at a reference. Follows Kojima et al. (2022) / MATH conventions.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    boxed = _boxed_contents(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    matches = _ANSWER_IS.findall(text)
    if matches:
        candidate = matches[-1].strip()
        if candidate.strip(_STRIP_CHARS):
            return candidate
    lines = [line.strip() for line in text.strip().splitlines() if line.strip(_STRIP_CHARS)]
    return lines[-1] if lines else None


def normalize_answer(answer: str | None) -> str | None:
    """Canonical form for comparison: lower case, collapsed whitespace, no surrounding punctuation
    or quotes, numbers without thousands separators or trailing zeros (``"1,000.50"`` -> ``"1000.5"``).

    Returns None for None or for an answer that is empty after normalization.
    """
    if answer is None:
        return None
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str or None, got {type(answer).__name__}")
    text = " ".join(answer.lower().split())
    # ".5" and "-.5" are numbers: keep the point from being stripped as punctuation.
    text = re.sub(r"^([-+]?)\.(\d)", r"\g<1>0.\2", text.replace("$", "").strip())
    text = text.strip(_STRIP_CHARS)
    # Quotes and periods inside short answers ("'onea'", "y.a.j.o") carry no meaning for matching.
    text = re.sub(r"[\"'`“”‘’]", "", text).strip(_STRIP_CHARS)
    if _NUMBER.match(text):
        # One spelling per number, so that votes count "007", "7" and "7.0" as one answer.
        sign, number = ("-", text[1:]) if text[0] == "-" else ("", text.lstrip("+"))
        whole, _, frac = number.replace(",", "").partition(".")
        whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
        number = f"{whole}.{frac}" if frac else whole
        text = number if number == "0" else sign + number
    return text or None


def exact_match(answer: str | None, reference: str | None) -> bool:
    """True when both normalize to the same non-empty string (numbers compared numerically)."""
    a, r = normalize_answer(answer), normalize_answer(reference)
    if a is None or r is None:
        return False
    if a == r:
        return True
    if _NUMBER.match(a) and _NUMBER.match(r):
        return math.isclose(float(a), float(r), rel_tol=0.0, abs_tol=1e-9)
    return False


def aggregate_step_scores(step_scores: Sequence[float], how: str = "last") -> float:
    """One score from per-step process rewards: ``last`` (Snell et al. 2024 best), ``min``
    (Lightman et al. 2023), ``prod`` (product of step correctness probabilities), ``mean``."""
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be one of {AGGREGATIONS}, got {how!r}")
    scores = [float(s) for s in step_scores]
    if not scores:
        raise ValueError("step_scores must hold at least one step score, got an empty sequence")
    if any(math.isnan(s) for s in scores):
        raise ValueError("step_scores must not contain NaN")
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    return sum(scores) / len(scores)


@runtime_checkable
class OutcomeScorer(Protocol):
    """An outcome reward model (ORM): one score per complete solution, higher is better."""

    def score(self, prompt: str, completions: Sequence[str]) -> list[float]: ...


@runtime_checkable
class ProcessScorer(Protocol):
    """A process reward model (PRM): one score per step of each (partial) solution."""

    def score_steps(self, prompt: str, solutions: Sequence[Sequence[str]]) -> list[list[float]]: ...


class PRMAsOutcome:
    """Adapts a process reward model to an outcome scorer by aggregating its step scores.

    Splits each completion at ``delimiter`` (the same step delimiter the generator uses).
    """

    def __init__(self, prm: ProcessScorer, how: str = "last", delimiter: str = "\n\n"):
        if how not in AGGREGATIONS:
            raise ValueError(f"how must be one of {AGGREGATIONS}, got {how!r}")
        if not delimiter:
            raise ValueError("delimiter must be a non-empty string")
        self.prm, self.how, self.delimiter = prm, how, delimiter

    def score(self, prompt: str, completions: Sequence[str]) -> list[float]:
        """Aggregated PRM score of each completion."""
        steps = [[s for s in c.split(self.delimiter) if s] or [c] for c in completions]
        return [aggregate_step_scores(s, self.how) for s in self.prm.score_steps(prompt, steps)]


class ExactMatchScorer:
    """A perfect outcome verifier from references (oracle ORM): 1.0 when the extracted answer
    matches the prompt's reference, else 0.0. For coverage/pass@k studies only."""

    def __init__(self, references: dict[str, str]):
        self.references = dict(references)

    def score(self, prompt: str, completions: Sequence[str]) -> list[float]:
        """1.0/0.0 per completion by exact match against the prompt's reference."""
        if prompt not in self.references:
            raise KeyError(f"prompt has no reference in this scorer: {prompt[:60]!r}")
        ref = self.references[prompt]
        return [float(exact_match(extract_answer(c), ref)) for c in completions]
