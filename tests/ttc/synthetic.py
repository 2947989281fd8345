"""A seeded synthetic generator with known answer distributions and step tree, and its PRM."""

from __future__ import annotations

import numpy as np

from scrimp.ttc.generate import Sample, Step


class SyntheticGenerator:
    """Complete samples: answers drawn from ``dist`` (a dict answer -> probability).
    Steps: a solution has ``depth`` steps; each step stays on track with probability ``q`` while the
    prefix is on track; the last step states the answer: ``right`` when every step was on track, else
    a wrong answer. Tokens are whitespace words, so costs are known exactly."""

    def __init__(self, dist, seed=0, depth=3, q=0.5, right="42", wrong=("7", "8", "9")):
        self.answers, self.probs = list(dist), np.array(list(dist.values()), dtype=float)
        self.rng = np.random.default_rng(seed)
        self.depth, self.q, self.right, self.wrong = depth, q, right, list(wrong)
        self.calls = {"samples": 0, "tokens": 0}

    def sample(self, prompts, n):
        counts = [n] * len(prompts) if isinstance(n, int) else list(n)
        out = []
        for c in counts:
            picks = self.rng.choice(len(self.answers), size=c, p=self.probs)
            texts = [f"some reasoning\n\nThe answer is {self.answers[i]}." for i in picks]
            out.append([Sample(t, self.answers[i], tokens=len(t.split())) for t, i in zip(texts, picks)])
            self.calls["samples"] += c
            self.calls["tokens"] += sum(len(t.split()) for t in texts)
        return out

    def extend(self, prompt, partials, n):
        out = []
        for p in partials:
            depth = p.count("\n\n")
            on_track = "bad" not in p
            steps = []
            for _ in range(n):
                ok = on_track and self.rng.random() < self.q
                if depth == self.depth - 1:
                    ans = self.right if ok else self.wrong[int(self.rng.integers(len(self.wrong)))]
                    text = f"{'ok' if ok else 'bad'} The answer is {ans}."
                    steps.append(Step(text, len(text.split()), finished=True))
                else:
                    text = f"s{depth} {'ok' if ok else 'bad'}\n\n"
                    steps.append(Step(text, len(text.split()), finished=False))
            out.append(steps)
            self.calls["samples"] += n
            self.calls["tokens"] += sum(s.tokens for s in steps)
        return out


class SyntheticPRM:
    """Per-step scores: 0.9 while the prefix is on track, 0.1 after; counts its calls."""

    def __init__(self):
        self.calls = 0

    def score_steps(self, prompt, solutions):
        self.calls += len(solutions)
        out = []
        for steps in solutions:
            scores, good = [], True
            for s in steps:
                good = good and "bad" not in s
                scores.append(0.9 if good else 0.1)
            out.append(scores)
        return out
