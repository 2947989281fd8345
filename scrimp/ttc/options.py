"""Options, not counts: each prompt gets one option (strategy, n), priced by its real cost, chosen by the
multiple-choice knapsack over (prompt, option) (``scrimp.allocators.solve``).

An option's cost is its samples, or its expected tokens (n x the prompt's mean tokens per sample) when
the generator reports token counts: a prompt whose solutions run long pays for that. Its value is the
expected accuracy of the strategy with n samples on that prompt, from any estimate the caller has:
``majority_values`` (exact maj@n under a categorical answer distribution, e.g. a posterior mean) and
``verifier_values`` (best-of-n with a perfect verifier: coverage 1 - (1 - p)^n) are provided; values
for a learned reward model come from calibration.

    options = [Option("majority", 1), Option("majority", 5), Option("best_of_n", 4)]
    values = np.column_stack([...])  # (prompts, options)
    plan = choose_options(values, option_costs(options, tokens_per_sample), budget)
    results = run_options(generator, prompts, [options[j] for j in plan.choice], scorer=orm)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scrimp.checks import check_choice, check_integer

STRATEGIES = ("majority", "best_of_n", "weighted_majority")
# Strategies that need an outcome scorer (a reward model, or a verifier wrapped as one).
SCORED = ("best_of_n", "weighted_majority")


@dataclass(frozen=True)
class Option:
    """One way to spend compute on a prompt: ``strategy`` in ``STRATEGIES`` with ``n`` samples."""

    strategy: str
    n: int

    def __post_init__(self):
        check_choice("strategy", self.strategy, STRATEGIES)
        check_integer("n", self.n, 1)


def option_costs(options: Sequence[Option], tokens_per_sample: np.ndarray | None = None,
                 prompts: int | None = None) -> np.ndarray:
    """(prompts, options) integer costs: n samples, or ceil(n x the prompt's mean tokens per sample) when
    ``tokens_per_sample`` (one per prompt) is given; ``prompts`` sets the row count without token counts."""
    n = np.array([o.n for o in options], dtype=np.int64)
    if tokens_per_sample is None:
        if prompts is None:
            raise ValueError("option_costs needs tokens_per_sample (one per prompt) or the number of prompts")
        return np.tile(n, (check_integer("prompts", prompts, 1), 1))
    tokens = np.asarray(tokens_per_sample, dtype=float)
    if tokens.ndim != 1 or not np.all(np.isfinite(tokens)) or np.any(tokens <= 0):
        raise ValueError("tokens_per_sample must hold one positive finite mean token count per prompt")
    return np.ceil(tokens[:, None] * n[None, :]).astype(np.int64)


def majority_values(options: Sequence[Option], probs: np.ndarray, correct_index: int = 0) -> np.ndarray:
    """(prompts, options) exact maj@n of each ``majority`` option under each prompt's answer distribution
    ``probs`` (prompts, answers); scored options get NaN (their value needs the scorer's accuracy)."""
    from scrimp.allocators.utility import majority

    probs = np.asarray(probs, dtype=float)
    out = np.full((probs.shape[0], len(options)), np.nan)
    for j, o in enumerate(options):
        if o.strategy == "majority":
            out[:, j] = majority(np.full(probs.shape[0], o.n), probs, correct_index)
    return out


def verifier_values(options: Sequence[Option], p_correct: np.ndarray) -> np.ndarray:
    """(prompts, options) value of ``best_of_n`` with a perfect verifier, 1 - (1 - p)^n (a correct sample
    is found whenever one is drawn); other options get NaN."""
    p = np.asarray(p_correct, dtype=float)
    out = np.full((p.shape[0], len(options)), np.nan)
    for j, o in enumerate(options):
        if o.strategy == "best_of_n":
            out[:, j] = 1.0 - (1.0 - p) ** o.n
    return out


def choose_options(values: np.ndarray, costs: np.ndarray, budget: int):
    """One option per prompt maximizing the summed value under ``budget`` (the multiple-choice knapsack
    over (prompt, option), solved exactly or with a certified bound by ``allocators.solve``). NaN values
    (an option that does not apply) are never chosen."""
    from scrimp.allocators import solve

    values, costs = np.asarray(values, dtype=float), np.asarray(costs)
    if values.shape != costs.shape or values.ndim != 2:
        raise ValueError(f"values and costs must both be (prompts, options), got {values.shape} and {costs.shape}")
    if np.all(np.isnan(values), axis=1).any():
        raise ValueError("every prompt needs at least one option with a value (a row of values is all NaN)")
    rows_v, rows_c = [], []
    for v, c in zip(values, costs):
        keep = ~np.isnan(v)
        rows_v.append(v[keep])
        rows_c.append(c[keep])
    alloc = solve(rows_c, rows_v, int(budget))
    # Map each row's index among its applicable options back to the option's column.
    alloc.choice = np.array([np.nonzero(~np.isnan(v))[0][j] for v, j in zip(values, alloc.choice)])
    return alloc


def run_options(generator, prompts: Sequence[str], chosen: Sequence[Option], *, scorer=None,
                rng: np.random.Generator | None = None) -> list:
    """Run each prompt's chosen option through ``scrimp.ttc.strategies``; returns their
    ``StrategyResult`` (answer and exact ``Cost``). A scored option without a ``scorer`` is refused
    before anything is sampled."""
    from scrimp.ttc import strategies

    if len(prompts) != len(chosen):
        raise ValueError(f"chosen must hold one option per prompt ({len(prompts)}), got {len(chosen)}")
    if scorer is None and any(o.strategy in SCORED for o in chosen):
        raise ValueError("best_of_n and weighted_majority options need a scorer (an outcome reward model)")
    run = {"majority": lambda p, n: strategies.majority_vote(generator, p, n, rng),
           "best_of_n": lambda p, n: strategies.best_of_n(generator, p, n, scorer),
           "weighted_majority": lambda p, n: strategies.weighted_majority(generator, p, n, scorer)}
    return [run[o.strategy](p, o.n) for p, o in zip(prompts, chosen)]
