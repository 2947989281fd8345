"""Generators: where samples come from. A protocol, a transformers backend, a vLLM backend (optional)
and a replay backend over recorded samples.

The protocol has two verbs, the ones test-time search needs (as in huggingface/search-and-learn):
``sample`` (n complete solutions per prompt) and ``extend`` (one more reasoning step for each partial
solution, cut at a step delimiter, default ``"\\n\\n"``). Every returned piece carries its exact
generated-token count so that strategies can report exact costs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from scrimp.checks import is_integer
from scrimp.ttc.verify import extract_answer, normalize_answer


@dataclass(frozen=True)
class Sample:
    """One complete solution. ``answer`` is normalized; ``correct``/``score``/``tokens`` may be unknown."""

    text: str
    answer: str | None
    tokens: int | None = None
    score: float | None = None
    correct: bool | None = None


@dataclass(frozen=True)
class Step:
    """One reasoning step appended to a partial solution; ``finished`` when the solution ended."""

    text: str
    tokens: int
    finished: bool


def _check_counts(prompts: Sequence[str], n: int | Sequence[int]) -> list[int]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not a single str")
    counts = [n] * len(prompts) if isinstance(n, str) or np.ndim(n) == 0 else list(n)
    if len(counts) != len(prompts):
        raise ValueError(f"n must be an int or one count per prompt ({len(prompts)}), got {len(counts)}")
    bad = [c for c in counts if not is_integer(c) or c < 0]
    if bad:
        raise ValueError(f"n must be a non-negative integer or one per prompt, got {bad[0]!r}")
    return [int(c) for c in counts]


@runtime_checkable
class Generator(Protocol):
    """Anything that samples completions. ``sample`` returns, per prompt, ``n`` Samples;
    ``extend`` returns, per partial solution, ``n`` next Steps (search strategies use it)."""

    def sample(self, prompts: Sequence[str], n: int | Sequence[int]) -> list[list[Sample]]: ...

    def extend(self, prompt: str, partials: Sequence[str], n: int) -> list[list[Step]]: ...


class HFGenerator:
    """Sampling from any transformers causal LM with ``generate`` (batched, ``num_return_sequences``,
    temperature, top-p), plus step-wise extension that stops at ``step_delimiter``.

    Follows the generation loop of huggingface/search-and-learn (which uses vLLM); here plain
    transformers so that it runs anywhere, including a CPU with a tiny model.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int = 256,
        max_step_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 1.0,
        step_delimiter: str = "\n\n",
        batch_size: int = 8,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1 or max_step_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens, max_step_tokens and batch_size must be positive integers")
        if not step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.max_step_tokens = max_new_tokens, max_step_tokens
        self.temperature, self.top_p = temperature, top_p
        self.step_delimiter, self.batch_size = step_delimiter, batch_size
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly

    def _generate(self, texts: list[str], n: int, max_new_tokens: int, stop_at_delimiter: bool):
        """Generated token ids per (text, sample), trimmed after EOS (EOS included in the count)."""
        import torch

        sampling = self.temperature > 0
        if not sampling:  # greedy rejects num_return_sequences > 1: repeat the prompts instead
            texts = [t for t in texts for _ in range(n)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.model.device)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            num_return_sequences=n if sampling else 1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        if stop_at_delimiter:
            kwargs["stopping_criteria"] = [_DelimiterStop(self.tokenizer, self.step_delimiter, enc.input_ids.shape[1])]
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc.input_ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        rows = []
        for ids in new:
            finished = eos in ids
            rows.append((ids[: ids.index(eos) + 1] if finished else ids, finished))
        return [rows[i * n : (i + 1) * n] for i in range(len(rows) // n)]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sample(self, prompts: Sequence[str], n: int | Sequence[int]) -> list[list[Sample]]:
        """``n`` complete samples per prompt (batched by ``batch_size`` prompts, grouped by n)."""
        counts = _check_counts(prompts, n)
        result: list[list[Sample]] = [[] for _ in prompts]
        by_n: dict[int, list[int]] = {}
        for i, c in enumerate(counts):
            if c:
                by_n.setdefault(c, []).append(i)
        for c, idx in by_n.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                rows = self._generate([prompts[i] for i in chunk], c, self.max_new_tokens, False)
                for i, samples in zip(chunk, rows):
                    for ids, _ in samples:
                        text = self._decode(ids)
                        result[i].append(Sample(text, normalize_answer(extract_answer(text)), tokens=len(ids)))
        return result

    def extend(self, prompt: str, partials: Sequence[str], n: int) -> list[list[Step]]:
        """``n`` next steps for each partial solution, each cut just after the first step delimiter."""
        _check_counts(list(partials), n)
        steps: list[list[Step]] = []
        for start in range(0, len(partials), self.batch_size):
            chunk = [prompt + p for p in partials[start : start + self.batch_size]]
            for rows in self._generate(chunk, n, self.max_step_tokens, True):
                steps.append([self._cut_step(ids, eos_seen) for ids, eos_seen in rows])
        return steps

    def _cut_step(self, ids: list[int], eos_seen: bool) -> Step:
        """Cut at the first delimiter; the token count is the shortest prefix whose text contains it."""
        text = self._decode(ids)
        pos = text.find(self.step_delimiter)
        if pos < 0:
            # No delimiter: the model ended (EOS) or ran out of step tokens; both end the solution
            # only in the first case.
            return Step(text, len(ids), finished=eos_seen)
        lo, hi = 1, len(ids)
        while lo < hi:  # decoded-prefix containment is monotone in the prefix length
            mid = (lo + hi) // 2
            if self.step_delimiter in self._decode(ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return Step(text[: pos + len(self.step_delimiter)], lo, finished=False)


class _DelimiterStop:
    """Stopping criterion: a row is done once its generated text contains the delimiter."""

    def __init__(self, tokenizer, delimiter: str, prompt_len: int):
        self.tokenizer, self.delimiter, self.prompt_len = tokenizer, delimiter, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([self.delimiter in t for t in texts], device=input_ids.device)


class VLLMGenerator:
    """The same protocol over vLLM (GPU serving). Optional: needs ``vllm`` installed; not tested on CPU.

    ``model`` is a model name/path for ``vllm.LLM``. Token counts come from vLLM's output token ids.
    """

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int = 256,
        max_step_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 1.0,
        step_delimiter: str = "\n\n",
        seed: int = 0,
        **llm_kwargs,
    ):
        try:
            import vllm
        except ImportError as err:
            raise ImportError("VLLMGenerator needs the optional package vllm (pip install vllm)") from err
        if not step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, seed=seed, **llm_kwargs)
        self.max_new_tokens, self.max_step_tokens = max_new_tokens, max_step_tokens
        self.temperature, self.top_p, self.step_delimiter = temperature, top_p, step_delimiter

    def _params(self, n: int, max_tokens: int, stop: list[str] | None):
        return self._vllm.SamplingParams(
            n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens, stop=stop,
            include_stop_str_in_output=True,
        )

    def sample(self, prompts: Sequence[str], n: int | Sequence[int]) -> list[list[Sample]]:
        """``n`` complete samples per prompt in one vLLM call."""
        counts = _check_counts(prompts, n)
        idx = [i for i, c in enumerate(counts) if c]
        outs = self.llm.generate(
            [prompts[i] for i in idx], [self._params(counts[i], self.max_new_tokens, None) for i in idx]
        )
        result: list[list[Sample]] = [[] for _ in prompts]
        for i, out in zip(idx, outs):
            for o in out.outputs:
                result[i].append(Sample(o.text, normalize_answer(extract_answer(o.text)), tokens=len(o.token_ids)))
        return result

    def extend(self, prompt: str, partials: Sequence[str], n: int) -> list[list[Step]]:
        """``n`` next steps per partial solution, stopping at the step delimiter."""
        params = self._params(n, self.max_step_tokens, [self.step_delimiter])
        outs = self.llm.generate([prompt + p for p in partials], params)
        return [
            [Step(o.text, len(o.token_ids), finished=o.finish_reason == "stop" and o.stop_reason is None)
             for o in out.outputs]
            for out in outs
        ]


@dataclass(frozen=True)
class ReplayPrompt:
    """One prompt of a replay file: id, prompt text, reference answer, recorded samples."""

    id: str
    prompt: str
    reference: str | None
    samples: tuple[Sample, ...]


class ReplayGenerator:
    """Hands out a prompt's recorded samples without replacement, in a seeded random order.

    Refuses to hand out more samples than were recorded (a clear error, never silent reuse). The way
    allocation policies are judged on a real LLM's behaviour without running it (as in the ESC and
    Adaptive-Consistency papers' offline evaluations). Prompts are addressed by id or prompt text.
    """

    def __init__(self, prompts: Sequence[ReplayPrompt], seed: int = 0):
        if not prompts:
            raise ValueError("prompts must hold at least one ReplayPrompt, got none")
        seen: set[str] = set()
        for p in prompts:
            if not isinstance(p, ReplayPrompt):
                raise ValueError(f"prompts must hold ReplayPrompt objects (e.g. from load_replay), got a "
                                 f"{type(p).__name__}")
            if not p.samples:
                raise ValueError(f"prompt {p.id!r} has zero recorded samples; replay needs at least one")
            if p.id in seen:
                raise ValueError(f"prompt id {p.id!r} appears twice; replay prompts need unique ids")
            seen.add(p.id)
        self.prompts = list(prompts)
        self.seed = seed
        self._index: dict[str, int] = {}
        for i, p in enumerate(self.prompts):
            self._index.setdefault(p.id, i)
            self._index.setdefault(p.prompt, i)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Start over (optionally with a new seed): a fresh seeded order per prompt, nothing drawn."""
        if seed is not None:
            self.seed = seed
        self._order = []
        for i, p in enumerate(self.prompts):
            order = list(range(len(p.samples)))
            random.Random(f"{self.seed}:{i}").shuffle(order)
            self._order.append(order)
        self._drawn = [0] * len(self.prompts)

    def _resolve(self, key: str) -> int:
        if key not in self._index:
            raise KeyError(f"no recorded prompt with id or text {key[:60]!r}")
        return self._index[key]

    def remaining(self, key: str) -> int:
        """Recorded samples of this prompt not yet handed out."""
        i = self._resolve(key)
        return len(self.prompts[i].samples) - self._drawn[i]

    def drawn(self, key: str) -> int:
        """Samples of this prompt handed out since the last reset."""
        return self._drawn[self._resolve(key)]

    def sample(self, prompts: Sequence[str], n: int | Sequence[int]) -> list[list[Sample]]:
        """The next ``n`` recorded samples of each prompt, in the seeded order; all-or-nothing."""
        counts = _check_counts(prompts, n)
        idx = [self._resolve(p) for p in prompts]
        need: dict[int, int] = {}
        for i, c in zip(idx, counts):
            need[i] = need.get(i, 0) + c
        for i, c in need.items():  # check everything before handing anything out
            left = len(self.prompts[i].samples) - self._drawn[i]
            if c > left:
                raise ValueError(
                    f"prompt {self.prompts[i].id!r} has {left} of its {len(self.prompts[i].samples)} "
                    f"recorded samples left; {c} were requested (replay never reuses a sample)"
                )
        result = []
        for i, c in zip(idx, counts):
            start = self._drawn[i]
            order = self._order[i][start : start + c]
            self._drawn[i] += c
            result.append([self.prompts[i].samples[j] for j in order])
        return result

    def extend(self, prompt: str, partials: Sequence[str], n: int) -> list[list[Step]]:
        """Not available: recorded complete samples carry no step structure to branch from."""
        raise NotImplementedError(
            "ReplayGenerator holds complete recorded samples; step-wise search needs a live generator"
        )
