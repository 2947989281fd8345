"""Honest curves on recorded samples: policies run on replay, hyper-parameters chosen by cross-fitting.

The prompts are split into ``folds`` disjoint parts (seeded). For each part, a policy's
hyper-parameters (or the compute-optimal plan) are chosen on the OTHER parts (calibration) and the
policy is then run on this part (evaluation); every prompt's reported result therefore comes from a
policy tuned without it (Chernozhukov et al., 2018, cross-fitting; Snell et al., 2024, choose on
a calibration split). Results are per prompt so that bootstrap intervals are over prompts.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from scrimp.checks import check_choice, check_integer, is_integer
from scrimp.ttc.allocate import (
    POLICIES,
    BudgetBelowPilot,
    check_budget,
    check_fit_params,
    check_params,
    correct_answers,
    fit_compute_optimal,
    run_policy,
)
from scrimp.ttc.evaluate import maj_at_k, pass_at_k
from scrimp.ttc.generate import ReplayGenerator, ReplayPrompt


@dataclass
class Curve:
    """Per-prompt results of one policy at each budget: ``correct`` and ``spent`` are (prompts, budgets),
    averaged over replay orders; ``chosen`` is the parameter set used per (fold, budget)."""

    policy: str
    budgets: list[float]
    correct: np.ndarray
    spent: np.ndarray
    chosen: list[dict] = field(default_factory=list)
    # (prompts, budgets, orders): the same before averaging over replay orders, for intervals that
    # carry the order noise (``evaluate.bootstrap_ci_orders``, ``savings_at_equal_accuracy``)
    correct_orders: np.ndarray | None = None
    spent_orders: np.ndarray | None = None


def split_folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Disjoint, seeded, near-equal folds of prompt indices."""
    if not is_integer(folds) or folds < 2 or folds > n:
        raise ValueError(f"folds must be an integer in [2, {n}] (prompts), got {folds!r}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i::folds]) for i in range(folds)]


def grid(space: Mapping[str, Sequence] | Sequence[Mapping[str, Sequence]]) -> list[dict]:
    """Candidate parameter sets: all combinations of {name: [values]} (one empty dict for an empty
    space); a list of such spaces gives the union of their combinations (e.g. one space per rule)."""
    if not isinstance(space, Mapping):
        if isinstance(space, str) or not isinstance(space, Sequence):
            raise ValueError(f"space must map parameter names to lists of values (or be a list of such maps), "
                             f"got {space!r}")
        return [c for sub in space for c in grid(sub)]
    keys = list(space)
    for key in keys:
        if isinstance(space[key], str) or not isinstance(space[key], Sequence) or not space[key]:
            raise ValueError(f"space[{key!r}] must be a non-empty list of candidate values, got {space[key]!r}")
    return [dict(zip(keys, vals)) for vals in itertools.product(*(space[k] for k in keys))]


def uniform_exact(prompts: Sequence[ReplayPrompt], k: int, utility: str = "majority") -> np.ndarray:
    """Per-prompt exact expected accuracy of uniform majority voting with k samples (maj@k), or with
    ``utility="coverage"`` of a perfect verifier over them (pass@k); a prompt with fewer than k
    recorded samples uses all of them (as the ``uniform`` policy caps)."""
    if utility == "coverage":
        return np.array([pass_at_k(len(p.samples), sum(bool(s.correct) for s in p.samples), min(k, len(p.samples)))
                         for p in prompts])
    return np.array([maj_at_k([s.answer for s in p.samples], correct_answers(p), min(k, len(p.samples)))
                     for p in prompts])


def uniform_spend(prompts: Sequence[ReplayPrompt], k: int) -> np.ndarray:
    """Per-prompt samples that ``uniform_exact`` spends: k, or all recorded samples when fewer."""
    return np.array([min(k, len(p.samples)) for p in prompts], dtype=float)


def replay_run(prompts: Sequence[ReplayPrompt], policy: str, budget: float, params: dict, *,
               repeats: int, seed: int, per_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-prompt correctness and spend of ``policy`` over ``repeats`` seeded replay orders
    (``per_order``: the (prompts, repeats) results before the mean)."""
    check_integer("repeats", repeats, 1)
    refs = [correct_answers(p) for p in prompts]
    ids = [p.id for p in prompts]
    correct = np.zeros((len(prompts), repeats))
    spent = np.zeros((len(prompts), repeats))
    for r in range(repeats):
        gen = ReplayGenerator(prompts, seed=seed + 7919 * r)
        extra = {"prompts": prompts} if policy == "oracle" and "prompts" not in params else {}
        out = run_policy(policy, gen, ids, budget, seed=seed + r, **params, **extra)
        correct[:, r] = [a is not None and a in ref for a, ref in zip(out.answers, refs)]
        spent[:, r] = out.spent
    return (correct, spent) if per_order else (correct.mean(1), spent.mean(1))


def crossfit_curve(prompts: Sequence[ReplayPrompt], policy: str, budgets: Sequence[float], *,
                   space: Mapping[str, Sequence] | Sequence[Mapping] | None = None, fixed: Mapping | None = None,
                   folds: int = 2, repeats: int = 4, tune_repeats: int = 2, seed: int = 0,
                   progress=None) -> Curve:
    """Curve of ``policy`` over ``budgets`` with hyper-parameters chosen per budget on calibration folds.

    ``space``: parameters to choose (the calibration objective is mean accuracy at that budget; ties
    within 1e-9 go to the lower spend). ``compute_optimal`` fits its plan (parameters in ``fixed`` and
    ``space``, e.g. pilot) on the calibration folds. ``oracle`` needs no tuning and uses references:
    report it as a ceiling only. Every budget and every candidate is checked before anything runs;
    a candidate whose pilot costs more than a budget is skipped at that budget.
    """
    candidates = candidate_params(policy, space, fixed)
    prompts = list(prompts)
    parts = split_folds(len(prompts), folds, seed)
    if isinstance(budgets, str) or not isinstance(budgets, Sequence) or not budgets:
        raise ValueError(f"budgets must be a non-empty list of samples per prompt, got {budgets!r}")
    for budget in budgets:
        check_budget(budget)
    check_integer("repeats", repeats, 1)
    check_integer("tune_repeats", tune_repeats, 1)
    correct = np.zeros((len(prompts), len(budgets), repeats))
    spent = np.zeros((len(prompts), len(budgets), repeats))
    chosen = []
    for f, eval_idx in enumerate(parts):
        calib = [prompts[i] for i in np.setdiff1d(np.arange(len(prompts)), eval_idx)]
        evaluation = [prompts[i] for i in eval_idx]
        for b, budget in enumerate(budgets):
            best, best_key = None, None
            for params in candidates:
                try:
                    run_params = _materialize(policy, params, calib, seed + 101 * f)
                    acc, sp = replay_run(calib, policy, budget, run_params, repeats=tune_repeats, seed=seed + 1000)
                except BudgetBelowPilot:  # this candidate's pilot costs more than the budget: not one here
                    continue
                key = (acc.mean(), -sp.mean())
                if best_key is None or key[0] > best_key[0] + 1e-9 or (abs(key[0] - best_key[0]) <= 1e-9 and key[1] > best_key[1]):
                    best, best_key = params, key
            if best is None:
                raise ValueError(f"no parameter set of {policy} fits budget {budget} (all pilots cost more)")
            run_params = _materialize(policy, best, calib, seed + 101 * f)
            acc, sp = replay_run(evaluation, policy, budget, run_params, repeats=repeats, seed=seed + 2000 + f,
                                 per_order=True)
            correct[eval_idx, b], spent[eval_idx, b] = acc, sp
            chosen.append({"fold": f, "budget": budget, **best})
            if progress is not None:
                progress()
    return Curve(policy, list(budgets), correct.mean(2), spent.mean(2), chosen, correct, spent)


_PLANS: dict = {}
FIT_KEYS = frozenset({"pilot", "k_max", "repeats", "min_bin"})  # compute_optimal: fit_compute_optimal's


def candidate_params(policy: str, space: Mapping | Sequence[Mapping] | None, fixed: Mapping | None) -> list[dict]:
    """The candidate parameter sets of ``crossfit_curve`` (``fixed`` merged into each combination of
    ``space``), each checked: one sentence for a set the policy (or its plan fit) would refuse."""
    check_choice("policy", policy, POLICIES)
    candidates = [{**(fixed or {}), **params} for params in grid(space or {})]
    for params in candidates:
        run_params = params
        if policy == "compute_optimal":  # its plan is fitted with these; the policy takes the rest
            check_fit_params({k: v for k, v in params.items() if k in FIT_KEYS})
            run_params = {k: v for k, v in params.items() if k not in FIT_KEYS}
        check_params(policy, run_params, complete=False)
    return candidates


def _materialize(policy: str, params: dict, calib: Sequence[ReplayPrompt], seed: int) -> dict:
    """Turn chosen parameters into run arguments (compute_optimal: fit its plan on calibration)."""
    if policy != "compute_optimal":
        return dict(params)
    fit = {k: v for k, v in params.items() if k in FIT_KEYS}
    key = (tuple(p.id for p in calib), tuple(sorted(fit.items())), seed)
    if key not in _PLANS:  # the plan does not depend on the budget: fit once per fold
        _PLANS[key] = fit_compute_optimal(calib, seed=seed, **fit)
    plan = _PLANS[key]
    return {"plan": plan, **{k: v for k, v in params.items() if k not in FIT_KEYS}}
