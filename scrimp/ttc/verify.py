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
from decimal import Decimal
from fractions import Fraction
from typing import Protocol, runtime_checkable

AGGREGATIONS = ("last", "min", "prod", "mean")

# "The answer is X." — take the LAST occurrence: models often restate an intermediate guess first.
# Also "Answer: X" / "Final answer: X"; "is" must end a word ("the answer isn't 5" states nothing).
# "**Final Answer**: X" (markdown) counts too. Matches are searched overlapping, so that in
# "Final Answer: The final answer is 42." the inner "answer is 42" is the last one.
_ANSWER_IS = re.compile(r"\banswer\**(?:\s+is\b\s*[:：]?|\s*[:：])\**\s*(.+?)\s*(?:\.\s*(?:\n|$)|\.\s+(?=[A-Z])|\n|$)",
                        re.IGNORECASE)
# GSM8K's final-answer marker ("#### 72"), in references and in models trained on them.
_HASHES = re.compile(r"####\s*(?=[-+$\d.])([^\n]+)")  # a number must follow: "#### Step 2" is a heading
# A few-shot completion that runs on into a made-up next exemplar: "... The answer is 18.\n\nQ: ..."
_NEXT_QUESTION = re.compile(r"\n\s*(?:Q|Question|Problem)\s*\d*\s*[:：]")
# The last-line fallback takes a short line (an answer), not a sentence of reasoning.
FALLBACK_MAX_WORDS = 6
_NUMBER = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$")
# Signs, braces and backslashes belong to the answer ("-3", "\\sqrt{2}"), other punctuation around it does not.
_STRIP_CHARS = string.whitespace + "".join(c for c in string.punctuation if c not in "-+{}\\") + "“”‘’"


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


def _last_answer_is(text: str) -> str | None:
    """The last "the answer is X" / "Answer: X", found by overlapping search."""
    last, pos = None, 0
    while (match := _ANSWER_IS.search(text, pos)) is not None:
        if match.group(1).strip(_STRIP_CHARS):
            last = match.group(1).strip()
        pos = match.start() + 1
    return last


def extract_answer(text: str) -> str | None:
    """The raw answer stated in a completion, or None when there is none.

    Order of precedence: ``\\boxed{...}`` (last one), then GSM8K's "#### X" (last one), then "the
    answer is X" / "Answer: X" (last one), then the last non-empty line when it is short (at most
    ``FALLBACK_MAX_WORDS`` words: an answer, not a sentence of reasoning). A made-up next exemplar
    ("\\nQ: ..." after an answer was stated) is cut off first. Never looks at a reference. Follows
    Kojima et al. (2022) / MATH (Hendrycks et al., 2021) / GSM8K (Cobbe et al., 2021) conventions.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    # Runs of spaces collapse first: the answer regex backtracks quadratically over long ones.
    text = re.sub(r"[^\S\n]+", " ", text)
    for cut in _NEXT_QUESTION.finditer(text):  # at the first new exemplar after an answer was stated
        head = text[: cut.start()]
        if _boxed_contents(head) is not None or _HASHES.search(head) or _last_answer_is(head) is not None:
            text = head
            break
    boxed = _boxed_contents(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    marked = [m.strip() for m in _HASHES.findall(text) if m.strip(_STRIP_CHARS)]
    if marked:
        return marked[-1]
    stated = _last_answer_is(text)
    if stated is not None:
        return stated
    lines = [line.strip() for line in text.strip().splitlines() if line.strip(_STRIP_CHARS)]
    if lines and len(lines[-1].split()) <= FALLBACK_MAX_WORDS:
        return lines[-1]
    return None


_LATEX_DROP = re.compile(r"\\(?:left|right|displaystyle)\b|\\[!,;: ]|\^\{?\\circ\}?")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mathbf|operatorname)\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\w))\s*(?:\{([^{}]*)\}|(\w))")
_INTERVAL = re.compile(r"^[\[(].*,.*[\])]$")
_WITH_UNIT = re.compile(r"^([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)(?:\s*%|\s+([a-z]{2,})(?:[ .][a-z.]+)*)$")
# Words after a number that change its value or make it an expression, not a unit.
_NOT_UNITS = frozenset("pi hundred thousand million billion trillion dozen and or more less half times to "
                       "plus minus over squared cubed percent".split())
_FRACTION = re.compile(r"^([-+]?)(?:(\d+) )?(\d+)/(\d+)$")  # "3/4", and the mixed number "1 1/2"
_PLAIN_PART = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|[a-z]|\\[a-z]+)", re.IGNORECASE)


def _plain_latex(text: str) -> str:
    """Spell common LaTeX answer forms plainly: ``\\dfrac{1}{2}`` and ``\\frac12`` as ``1/2``, ``\\text{cm}``
    as ``cm``, no ``\\left``/``\\right``/thin spaces/degree marks (the MATH answer conventions)."""
    text = _LATEX_DROP.sub("", _LATEX_TEXT.sub(r"\1", text))
    for macro, plain in (("\\%", "%"), ("\\$", ""), ("{,}", ","), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", "")):
        text = text.replace(macro, plain)
    text = re.sub(r"(\d)\s*(?=\\[dt]?frac)", r"\1 ", text)  # 1\frac{1}{2}: a mixed number, not 11/2

    def frac(m: re.Match) -> str:
        top, bottom = (m.group(1) or m.group(2)).strip(), (m.group(3) or m.group(4)).strip()
        wrap = lambda part: part if _PLAIN_PART.fullmatch(part) else f"({part})"  # noqa: E731
        return f"{wrap(top)}/{wrap(bottom)}"

    return _LATEX_FRAC.sub(frac, text)


_PAIRS = {"(": ")", "[": "]"}
_OPENERS = {")": "(", "]": "["}
_NON_BRACKET = "".join(c for c in _STRIP_CHARS if c not in "()[]")


def _strip_around(text: str) -> str:
    """Surrounding punctuation off, brackets only as a pair around everything or when unmatched:
    ``"(B)."`` -> ``"B"``, ``"b)"`` -> ``"b"``, but ``"(x+1)/2"`` keeps its parentheses."""
    while True:
        before = text
        text = text.strip(_NON_BRACKET)
        if len(text) >= 2 and _PAIRS.get(text[0]) == text[-1] and _balanced(text[1:-1]):
            text = text[1:-1]
        elif text and text[0] in _PAIRS and text.count(text[0]) > text.count(_PAIRS[text[0]]):
            text = text[1:]
        elif text and text[-1] in _OPENERS and text.count(text[-1]) > text.count(_OPENERS[text[-1]]):
            text = text[:-1]
        if text == before:
            return text


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += c in "(["
        depth -= c in ")]"
        if depth < 0:
            return False
    return depth == 0


def _canonical_number(text: str) -> str | None:
    """One spelling per rational number ("007", "7.0", "14/2" -> "7"; "1/2", "0.50" -> "0.5"; "1/3"),
    or None when ``text`` is not a plain decimal or fraction."""
    fraction = _FRACTION.match(text)
    if fraction:
        sign, whole, top, bottom = fraction.groups()
        if int(bottom) == 0:
            return None
        value = (int(whole or 0) + Fraction(int(top), int(bottom))) * (-1 if sign == "-" else 1)
    elif _NUMBER.match(text):
        value = Fraction(text.replace(",", ""))
    else:
        return None
    q = value.denominator
    while q % 2 == 0:
        q //= 2
    while q % 5 == 0:
        q //= 5
    if q != 1:  # not a terminating decimal: keep the reduced fraction
        return f"{value.numerator}/{value.denominator}"
    digits = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    return "0" if digits in ("-0", "0") else digits


def normalize_answer(answer: str | None) -> str | None:
    """Canonical form for comparison, so that votes and exact match see one spelling per answer.

    - lower case, collapsed whitespace, no surrounding punctuation or quotes (but an interval such
      as ``(-\\infty, 3]`` keeps its brackets);
    - plain LaTeX (``\\frac{1}{2}`` -> ``1/2``, ``\\text{cm}`` -> ``cm``), the Unicode minus as ``-``;
    - numbers without thousands separators or trailing zeros, fractions as decimals when they
      terminate (``"1,000.50"`` -> ``"1000.5"``, ``"2/4"`` -> ``"0.5"``);
    - a number followed by a unit or ``%`` is the number (``"42 dollars"`` -> ``"42"``), an equation
      with a number on its right is that number (``"x = 42"`` -> ``"42"``);
    - "Yes, ..." / "No. ..." is ``yes`` / ``no``.

    Returns None for None or for an answer that is empty after normalization.
    """
    if answer is None:
        return None
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str or None, got {type(answer).__name__}")
    text = _plain_latex(answer.replace("\u2212", "-")).replace("$", "")
    text = " ".join(text.lower().split())
    # ".5" and "-.5" are numbers: keep the point from being stripped as punctuation.
    text = re.sub(r"^([-+]?)\.(\d)", r"\g<1>0.\2", text.strip())
    if _INTERVAL.match(text.rstrip(". ")):
        return _tight(text.rstrip(". ")) or None
    text = _strip_around(text)
    # Quotes and periods inside short answers ("'onea'", "y.a.j.o") carry no meaning for matching.
    text = _strip_around(re.sub(r"[\"'`“”‘’]", "", text))
    yes_no = re.match(r"^(yes|no)[,.;:!]", text)
    if yes_no:
        return yes_no.group(1)
    # "x = 42" and "6 + 7 = 13" are 42 and 13; "x = 2 or x = -3", "x >= 5", "2x = 10" stay as they are.
    equation = re.fullmatch(r"([a-z]|[\d\s+\-*/().]+?)\s*=\s*([^=<>!]+)", text)
    if equation and _canonical_number(equation.group(2).strip()) is not None:
        text = equation.group(2).strip()
    with_unit = _WITH_UNIT.match(text)
    if with_unit and with_unit.group(2) not in _NOT_UNITS:
        text = with_unit.group(1)
    text = _tight(text)
    return _canonical_number(text) or text or None


def _tight(text: str) -> str:
    """Spaces around operators, brackets and commas carry no meaning in math answers: "(2, -1)" is
    "(2,-1)" and "x^2 + 1" is "x^2+1"; a minus loses its spaces only after a number or a bracket, so
    that text like "a - b" keeps them."""
    return re.sub(r"\s*([,+*/=^()\[\]]|(?<=[\d)\]])\s*-)\s*", lambda m: m.group(1).strip(), text)


def reference_answer(reference: str | None) -> str | None:
    """The final answer inside a reference that is a whole worked solution: GSM8K's "#### 72" or
    MATH's ``\\boxed{...}``. A reference without either marker is already the answer."""
    if reference is None or ("####" not in reference and "\\boxed" not in reference):
        return reference
    return extract_answer(reference)


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
