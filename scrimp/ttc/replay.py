"""Recorded samples: the canonical replay JSONL format, its loader/writer, and converters.

Canonical format, one prompt per line::

    {"id": str, "prompt": str, "reference": str | null,
     "samples": [{"text": str, "answer": str | null, "correct": bool | null,
                  "score": float | null, "tokens": int | null}, ...]}

A sample without an ``answer`` key gets one extracted from its text; without a ``correct`` key it is
judged by exact match with the reference. A reference that is a whole solution (GSM8K's "#### 72",
MATH's ``\\boxed{}``) is reduced to its final answer (``verify.reference_answer``).

``convert_esc`` reads the format of the ESC repository (Li et al., ICLR 2024, "Escape Sky-high Cost:
Early-stopping Self-Consistency for Multi-step Reasoning", github.com/Yiwei98/ESC): ``question``,
``answer`` (reference) and ``generated_answer`` (free-text samples). Answers are extracted from the
text alone (``scrimp.ttc.verify.extract_answer``); the reference is only used afterwards to mark
``correct``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from scrimp.ttc.generate import ReplayPrompt, Sample
from scrimp.ttc.verify import exact_match, extract_answer, normalize_answer, reference_answer

SAMPLE_KEYS = ("text", "answer", "correct", "score", "tokens")


def shared_data_dir() -> Path:
    """The shared data folder: ``$SCRIMP_SHARED_DIR/data`` when set, else ``<repo>/../shared/data``
    (CI clones the repository with ``shared/`` beside it)."""
    env = os.environ.get("SCRIMP_SHARED_DIR")
    if env:
        return Path(env) / "data"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _sample_from_json(obj, where: str, reference: str | None) -> Sample:
    """One sample; a missing ``answer`` key is extracted from the text (an explicit null means "no
    answer"), and a missing ``correct`` key is exact match with the reference when there is one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f"{where}: each sample must be an object with a string 'text'")
    answer, correct, score, tokens = (obj.get(k) for k in SAMPLE_KEYS[1:])
    # Checked before use: a numeric answer (JSON 42 instead of "42") reached exact_match as an int.
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"{where}: sample 'answer' must be a string or null, got {answer!r} (write numbers "
                         "as strings, e.g. \"42\")")
    if "answer" not in obj:
        answer = extract_answer(obj["text"])
    if "correct" not in obj and reference is not None:
        correct = exact_match(answer, reference)
    if correct is not None and not isinstance(correct, bool):
        raise ValueError(f"{where}: sample 'correct' must be true, false or null")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score)):
        raise ValueError(f"{where}: sample 'score' must be a finite number or null")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        raise ValueError(f"{where}: sample 'tokens' must be a non-negative integer or null")
    # An answer the file states is what the vote compares, kept as written: normalizing it merged answers
    # that differ only in case (CRUXEval's 'o' and 'O'), one right and one wrong, into one vote group.
    if "answer" not in obj:
        answer = normalize_answer(answer)
    return Sample(obj["text"], answer, tokens, None if score is None else float(score), correct)


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line; a line that is not valid JSON, or not UTF-8,
    raises a ValueError naming the file and the line."""
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path.name} line {lineno} is not valid JSON ({err.msg})") from None
                yield lineno, obj
    except UnicodeDecodeError:
        data = path.read_bytes()  # only now: the text reader does not know the line of the bad byte
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            lineno = data.count(b"\n", 0, err.start) + 1
            raise ValueError(f"{path.name} line {lineno} is not valid UTF-8 ({err.reason})") from None
        raise


def load_replay(path: str | os.PathLike) -> list[ReplayPrompt]:
    """Load a canonical replay JSONL file; a malformed line raises a ValueError naming its line number
    and nothing is returned (all-or-nothing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"replay file not found: {path}")
    prompts: list[ReplayPrompt] = []
    first_line: dict[str, int] = {}
    for lineno, obj in _json_lines(path):
        where = f"{path.name} line {lineno}"
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or "id" not in obj:
            raise ValueError(f"{where}: each line must be an object with 'id' and a string 'prompt'")
        if not isinstance(obj.get("samples"), list):
            raise ValueError(f"{where}: 'samples' must be a list")
        if not obj["samples"]:
            raise ValueError(f"{where}: prompt {obj['id']!r} has zero recorded samples")
        ref = obj.get("reference")
        if ref is not None and not isinstance(ref, str):
            raise ValueError(f"{where}: 'reference' must be a string or null")
        ref = reference_answer(ref)
        samples = tuple(_sample_from_json(s, where, ref) for s in obj["samples"])
        pid = str(obj["id"])
        if pid in first_line:
            raise ValueError(f"{where}: prompt id {pid!r} repeats the id of line {first_line[pid]}; ids must be unique")
        first_line[pid] = lineno
        prompts.append(ReplayPrompt(pid, obj["prompt"], ref, samples))
    if not prompts:
        raise ValueError(f"replay file {path} holds no prompts")
    return prompts


def save_replay(prompts: Sequence[ReplayPrompt], path: str | os.PathLike) -> None:
    """Write prompts in the canonical JSONL format, atomically (temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for p in prompts:
                samples = [{k: getattr(s, k) for k in SAMPLE_KEYS} for s in p.samples]
                row = {"id": p.id, "prompt": p.prompt, "reference": p.reference, "samples": samples}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def convert_esc(path: str | os.PathLike, out: str | os.PathLike | None = None) -> list[ReplayPrompt]:
    """Convert an ESC-format JSONL file (``question``, ``answer``, ``generated_answer``) to replay prompts.

    Answers are extracted from each sample's text without looking at the reference; ``correct`` is
    exact match with the reference afterwards. Writes the canonical JSONL to ``out`` when given.
    A malformed line raises a ValueError naming its line number. Command-line use:
    ``python -m scrimp.ttc.replay <esc.jsonl> [out.jsonl]`` prints the extraction rate.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ESC file not found: {path}")
    prompts = []
    for lineno, obj in _json_lines(path):
        texts = obj.get("generated_answer") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not isinstance(texts, list):
            raise ValueError(
                f"{path.name} line {lineno}: an ESC line needs 'question' (str) and 'generated_answer' (list)"
            )
        if not texts:
            raise ValueError(f"{path.name} line {lineno}: the prompt has zero recorded samples")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path.name} line {lineno}: 'generated_answer' must be a list of strings")
        ref = obj.get("answer")
        # ESC's GSM8K/MATH files hold the whole reference solution: compare with its final answer
        ref = None if ref is None else reference_answer(str(ref))
        samples = []
        for text in texts:
            answer = normalize_answer(extract_answer(text))
            correct = None if ref is None else exact_match(answer, ref)
            samples.append(Sample(text, answer, None, None, correct))
        prompts.append(ReplayPrompt(f"{path.stem}-{lineno - 1}", obj["question"], ref, tuple(samples)))
    if not prompts:
        raise ValueError(f"ESC file {path} holds no prompts")
    if out is not None:
        save_replay(prompts, out)
    return prompts


def replay_stats(prompts: Sequence[ReplayPrompt]) -> dict[str, float]:
    """Extraction rate (fraction of samples with an answer), sample accuracy, prompt/sample counts."""
    samples = [s for p in prompts for s in p.samples]
    judged = [s.correct for s in samples if s.correct is not None]
    return {
        "prompts": len(prompts),
        "samples": len(samples),
        "extraction_rate": sum(s.answer is not None for s in samples) / len(samples),
        "sample_accuracy": sum(judged) / len(judged) if judged else float("nan"),
    }


if __name__ == "__main__":
    import sys

    usage = "usage: python -m scrimp.ttc.replay <esc.jsonl> [out.jsonl]  (convert an ESC samples file to replay JSONL)"
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(usage)
    try:
        converted = convert_esc(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(replay_stats(converted), indent=2))
