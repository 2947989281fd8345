"""scrimp.ttc.crossfit: bad grids and budgets are refused up front; only a pilot that costs more than
the budget makes a candidate skip that budget."""

import pytest

import scrimp.ttc.crossfit as crossfit
from scrimp.ttc.crossfit import crossfit_curve, replay_run


@pytest.mark.parametrize(("kwargs", "message"), [
    # each used to end in "no parameter set of knapsack fits budget ... (all pilots cost more)"
    (dict(space={"prior": [-1.0]}), "prior must be a finite number > 0, got -1.0"),
    (dict(space={"prior": [0.5, -1.0]}), "prior must be a finite number > 0, got -1.0"),  # was silently dropped
    (dict(budgets=[float("inf")]), "budget must be a positive number of samples per prompt"),
    (dict(budgets=[0]), "budget must be a positive number of samples per prompt"),
    (dict(space={"prior": 0.5}), r"space\['prior'\] must be a non-empty list of candidate values"),
    (dict(fixed={"foo": 1}), "policy knapsack takes no parameter 'foo'"),
    (dict(repeats=0), "repeats must be an integer >= 1, got 0"),
    (dict(tune_repeats=0), "tune_repeats must be an integer >= 1, got 0"),
])
def test_bad_grids_and_budgets_are_refused_before_anything_runs(esc_prompts, monkeypatch, kwargs, message):
    def never(*args, **kw):
        raise AssertionError("a policy ran before the input was checked")

    monkeypatch.setattr(crossfit, "replay_run", never)
    kwargs = {"budgets": [4], **kwargs}
    with pytest.raises(ValueError, match=message):
        crossfit_curve(esc_prompts[:20], "knapsack", kwargs.pop("budgets"), **kwargs)


def test_compute_optimal_fit_settings_are_checked_up_front(esc_prompts):
    with pytest.raises(ValueError, match="min_bin must be an integer >= 0, got -1"):
        crossfit_curve(esc_prompts[:20], "compute_optimal", [4], space={"pilot": [2], "min_bin": [-1]})


def test_only_a_pilot_above_the_budget_skips_a_candidate(esc_prompts, monkeypatch):
    prompts = esc_prompts[:40]
    curve = crossfit_curve(prompts, "knapsack", [2, 3], space={"pilot": [2, 3]}, repeats=1, tune_repeats=1)
    assert [c["pilot"] for c in curve.chosen if c["budget"] == 2] == [2, 2]  # pilot 3 cannot run at B=2
    with pytest.raises(ValueError, match="no parameter set of knapsack fits budget 2"):
        crossfit_curve(prompts, "knapsack", [2], space={"pilot": [3]}, repeats=1, tune_repeats=1)

    def broken(*args, **kwargs):
        raise ValueError("some other problem")

    monkeypatch.setattr(crossfit, "run_policy", broken)  # any other error is reported as it is
    with pytest.raises(ValueError, match="some other problem"):
        crossfit_curve(prompts, "knapsack", [4], space={"pilot": [2]}, repeats=1, tune_repeats=1)


def test_replay_run_needs_at_least_one_repeat(esc_prompts):
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):  # was NaN accuracy
        replay_run(esc_prompts[:4], "uniform", 2, {}, repeats=0, seed=0)
