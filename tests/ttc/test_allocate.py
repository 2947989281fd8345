import numpy as np
import pytest

from scrimp.ttc.allocate import fit_compute_optimal, run_policy
from scrimp.ttc.crossfit import replay_run, split_folds, uniform_exact
from scrimp.ttc.generate import ReplayGenerator

from .synthetic import SyntheticGenerator

B = 8


def test_sequential_reaches_uniform_accuracy_with_fewer_samples(esc_prompts):
    # default (untuned) parameters; uniform is the exact expectation maj@8 over all 8-subsets
    acc, spent = replay_run(esc_prompts, "sequential", B, {}, repeats=2, seed=0)
    assert acc.mean() >= uniform_exact(esc_prompts, B).mean()
    assert spent.mean() < 0.9 * B


def _outcome(esc_prompts, policy, seed, **params):
    gen = ReplayGenerator(esc_prompts, seed=seed)
    return run_policy(policy, gen, [p.id for p in esc_prompts], B, seed=seed, **params)


@pytest.mark.parametrize("policy", ["uniform", "knapsack", "sequential", "oracle", "compute_optimal", "esc",
                                    "adaptive_consistency", "stop_reallocate"])
def test_spend_never_exceeds_budget_and_is_reproducible(esc_prompts, policy):
    calib_idx, eval_idx = split_folds(len(esc_prompts), 2, seed=0)
    evaluation = [esc_prompts[i] for i in eval_idx]
    params = {}
    if policy == "oracle":
        params["prompts"] = evaluation
    if policy == "compute_optimal":
        params["plan"] = fit_compute_optimal([esc_prompts[i] for i in calib_idx], pilot=2, repeats=2)
    a = _outcome(evaluation, policy, 3, **params)
    b = _outcome(evaluation, policy, 3, **params)
    assert a.spent.sum() <= B * len(evaluation) and a.budget == B * len(evaluation)
    assert a.answers == b.answers and np.array_equal(a.spent, b.spent)
    assert np.all(a.spent <= 40)


def test_bad_inputs(esc_prompts):
    ids = [p.id for p in esc_prompts[:4]]
    gen = ReplayGenerator(esc_prompts[:4])
    with pytest.raises(ValueError, match="policy must be one of"):
        run_policy("greedy", gen, ids, 4)
    with pytest.raises(ValueError, match="below the pilot cost"):
        run_policy("sequential", gen, ids, 1.5, pilot=2)
    with pytest.raises(ValueError, match="budget must be a positive number"):
        run_policy("uniform", gen, ids, -1)
    with pytest.raises(ValueError, match="recorded samples left"):
        gen.sample([ids[0]], 41)


def test_expected_mode_majority_matches_simulation():
    from scrimp.ttc.allocate import expected_mode_majority

    counts = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    ks = np.array([1, 3, 5])
    got = expected_mode_majority(counts, ks, prior=0.5, draws=2000)
    # reference: simulate theta ~ Dirichlet, k votes, plurality with random tie-break, == argmax theta
    rng = np.random.default_rng(1)
    for row, values in zip(counts, got):
        seen_plus_one_unseen = np.append(row[row > 0], 0.0)  # the documented model, whatever the padding
        theta = rng.dirichlet(seen_plus_one_unseen + 0.5, size=20000)
        for k, value in zip(ks, values):
            votes = np.stack([rng.multinomial(k, t) for t in theta[:4000]])
            top = votes.max(1, keepdims=True)
            winners = votes == top
            hit = winners[np.arange(4000), theta[:4000].argmax(1)] / winners.sum(1)
            assert value == pytest.approx(hit.mean(), abs=0.03)


def test_sequential_gain_priority_respects_budget(esc_prompts):
    prompts = esc_prompts[:60]
    gen = ReplayGenerator(prompts, seed=0)
    out = run_policy("sequential", gen, [p.id for p in prompts], 3, priority="gain", threshold=0.99, seed=0)
    assert out.spent.sum() <= 3 * 60 and out.spent.min() >= 2
    with pytest.raises(ValueError, match="priority must be"):
        run_policy("sequential", ReplayGenerator(prompts), [p.id for p in prompts], 3, priority="max")


def test_sequential_dirichlet_stops_exactly_when_the_rule_fires(esc_prompts):
    from scrimp.ttc.stopping import answer_counts, cap_majority_probability

    prompts, cap, tau, prior = esc_prompts[:80], 12, 0.9, 0.5
    out = run_policy("sequential", ReplayGenerator(prompts, seed=1), [p.id for p in prompts], 40, seed=1,
                     rule="dirichlet", threshold=tau, prior=prior, pilot=2, k_max=cap)
    assert out.spent.max() <= cap and out.spent.min() >= 2
    for held in out.samples:  # the budget does not bind here: each prompt stops at its first crossing
        answers = [s.answer for s in held]
        conf = [cap_majority_probability(answer_counts(answers[:n]), n, cap, prior) for n in range(2, len(held) + 1)]
        assert len(held) == cap or conf[-1] >= tau
        assert all(c < tau for c in conf[:-1])


def test_sequential_dirichlet_on_an_unbounded_generator():
    # the synthetic generator has no recorded limit: the rule needs k_max, and then converges to the mode
    ids = [f"q{i}" for i in range(100)]
    dist = {"42": 0.6, "7": 0.3, "8": 0.1}
    with pytest.raises(ValueError, match="needs a finite cap"):
        run_policy("sequential", SyntheticGenerator(dist), ids, 4, k_max=None)
    out = run_policy("sequential", SyntheticGenerator(dist, seed=2), ids, 16, k_max=24, threshold=0.95, prior=0.5)
    assert out.spent.max() <= 24 and out.spent.sum() <= 16 * 100 and out.spent.mean() < 16
    # reference: the exact vote accuracy of uniform voting (allocators.utility.majority); stopping when
    # the vote at the cap (maj@24 = 0.944) is 95% decided must beat uniform maj@5 (0.747) by a margin
    # far above the noise of 100 prompts (standard error about 0.03)
    from scrimp.allocators.utility import majority

    maj5 = float(majority(np.array(5), np.array(list(dist.values()))))
    assert np.mean([a == "42" for a in out.answers]) >= maj5 + 0.05


def _uneven(esc_prompts, n_prompts=60, seed=3):
    """ESC prompts cut to 3..8 recorded samples each, as another model's smaller file might hold."""
    import dataclasses

    rng = np.random.default_rng(seed)
    return [dataclasses.replace(p, samples=p.samples[: int(rng.integers(3, 9))]) for p in esc_prompts[:n_prompts]]


@pytest.mark.parametrize("budget", [3.5, 6.0])
def test_knapsack_buys_only_samples_a_prompt_has(esc_prompts, budget):
    prompts = _uneven(esc_prompts)
    total = int(budget * len(prompts))
    gen = ReplayGenerator(prompts, seed=0)
    out = run_policy("knapsack", gen, [p.id for p in prompts], budget, seed=0, pilot=2)
    caps = np.array([len(p.samples) for p in prompts])
    assert np.all(out.spent <= caps) and out.spent.sum() <= total
    # the solver itself never buys samples beyond a prompt's recorded count (the draw would clip
    # them and the budget they took would be lost to the other prompts)
    assert np.all(out.info["requested"] <= caps)


def test_policies_run_when_a_prompt_has_fewer_samples_than_the_pilot(esc_prompts):
    import dataclasses

    prompts = _uneven(esc_prompts, 20)
    prompts[0] = dataclasses.replace(prompts[0], samples=prompts[0].samples[:1])
    plan = fit_compute_optimal(esc_prompts[100:160], pilot=2, repeats=2)  # calibrated on other prompts
    for policy, params in (("uniform", {}), ("knapsack", {"pilot": 2}), ("sequential", {"pilot": 2}),
                           ("compute_optimal", {"plan": plan})):
        out = run_policy(policy, ReplayGenerator(prompts, seed=0), [p.id for p in prompts], 4, seed=0, **params)
        assert out.spent[0] <= 1 and out.spent.sum() <= 4 * len(prompts), policy


def test_uniform_baseline_caps_k_at_what_a_prompt_recorded(esc_prompts):
    from scrimp.ttc.allocate import correct_answers
    from scrimp.ttc.evaluate import maj_at_k

    prompts = _uneven(esc_prompts, 20)
    got = uniform_exact(prompts, 16)
    expect = [maj_at_k([s.answer for s in p.samples], correct_answers(p), len(p.samples)) for p in prompts]
    assert np.allclose(got, expect)


def test_a_prompts_knapsack_utility_does_not_depend_on_the_other_prompts():
    from scrimp.ttc.allocate import expected_mode_majority

    ks = np.arange(2, 9)
    alone = expected_mode_majority(np.array([[2.0, 0.0]]), ks)
    beside_wider = expected_mode_majority(np.array([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]), ks)
    assert np.array_equal(alone[0], beside_wider[0])


def test_duplicate_prompt_ids_are_refused(esc_prompts, tmp_path):
    import dataclasses

    from scrimp.ttc.replay import load_replay, save_replay

    twice = [esc_prompts[0], dataclasses.replace(esc_prompts[1], id=esc_prompts[0].id)]
    with pytest.raises(ValueError, match="appears twice"):
        ReplayGenerator(twice)
    save_replay(twice, tmp_path / "dup.jsonl")
    with pytest.raises(ValueError, match="line 2: prompt id .* repeats the id of line 1"):
        load_replay(tmp_path / "dup.jsonl")


def test_knapsack_when_every_prompt_fits_in_its_pilot(esc_prompts):
    # One or two recorded samples per prompt, a pilot of 2: nothing is left to allocate.
    import dataclasses

    prompts = [dataclasses.replace(p, samples=p.samples[: 1 + i % 2]) for i, p in enumerate(esc_prompts[:30])]
    out = run_policy("knapsack", ReplayGenerator(prompts, seed=0), [p.id for p in prompts], 4, seed=0, pilot=2)
    assert list(out.spent) == [len(p.samples) for p in prompts] and out.info["method"] == "pilot only"


class _CountingReplay(ReplayGenerator):
    """A replay generator that counts its sample calls: bad input must be refused before any of them."""

    calls = 0

    def sample(self, prompts, n):
        type(self).calls += 1
        return super().sample(prompts, n)


def _refused_before_sampling(recorded, policy, budget, message, **params):
    _CountingReplay.calls = 0
    with pytest.raises(ValueError, match=message):
        run_policy(policy, _CountingReplay(recorded), [p.id for p in recorded], budget, **params)
    assert _CountingReplay.calls == 0


@pytest.mark.parametrize(("policy", "params", "message"), [
    # k_max <= 0 or not an integer spent nothing and reported it as a result
    ("knapsack", {"k_max": -3}, r"k_max must be an integer >= pilot=2 \(or None\), got -3"),
    ("knapsack", {"k_max": 10.5}, "k_max must be an integer >= pilot=2"),
    ("sequential", {"k_max": 1}, "k_max must be an integer >= pilot=2"),
    ("uniform", {"k_max": 0}, r"k_max must be an integer >= 1 \(or None\), got 0"),
    # checked only after the pilot was drawn, or with a misleading or raw message
    ("knapsack", {"prior": float("nan")}, "prior must be a finite number > 0, got nan"),
    ("knapsack", {"prior": -1}, "prior must be a finite number > 0"),
    ("sequential", {"prior": -1}, "prior must be a finite number > 0"),
    ("sequential", {"prior": "x"}, "prior must be a finite number > 0, got 'x'"),
    ("sequential", {"rule": "window", "window": 0}, "window must be an integer >= 1, got 0"),
    ("sequential", {"window": -2}, "window must be an integer >= 1"),
    ("sequential", {"threshold": "0.9"}, r"threshold must be a finite number in \(0, 1\), got '0.9'"),
    ("knapsack", {"pilot": True}, "pilot must be an integer >= 1, got True"),
    ("knapsack", {"foo": 1}, "policy knapsack takes no parameter 'foo'; it takes utility, pilot, prior, k_max"),
    ("compute_optimal", {"plan": {"pilot": 3}}, "plan must be a ComputeOptimalPlan"),
    ("compute_optimal", {}, "policy compute_optimal needs the parameter 'plan'"),
])
def test_bad_parameters_are_refused_before_any_sample_is_drawn(esc_prompts, policy, params, message):
    _refused_before_sampling(esc_prompts[:6], policy, 8, message, **params)


def test_oracle_needs_every_prompt_it_allocates(esc_prompts):
    prompts = esc_prompts[:8]
    _refused_before_sampling(prompts, "oracle", 8, "prompts must hold every prompt of ids .* 3 are missing",
                             prompts=prompts[:5])


def test_a_budget_below_one_sample_per_prompt_is_refused(esc_prompts):
    # 0.01 x 8 prompts floored to 0 samples in total: every answer was None, silently
    _refused_before_sampling(esc_prompts[:8], "uniform", 0.01, "at least 1, so that every prompt gets a sample")
    assert run_policy("uniform", ReplayGenerator(esc_prompts[:8]), [p.id for p in esc_prompts[:8]], 1).spent.sum() == 8


def test_total_budget_takes_numpy_reals_and_refuses_bools():
    from scrimp.ttc.allocate import total_budget

    assert total_budget(np.float32(2.0), 10) == 20 and total_budget(np.int64(3), 10) == 30
    with pytest.raises(ValueError, match="budget must be a positive number of samples per prompt"):
        total_budget(True, 10)


def test_fit_compute_optimal_refuses_bad_settings_in_one_sentence(esc_prompts):
    prompts = esc_prompts[:20]
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):
        fit_compute_optimal(prompts, repeats=0)
    with pytest.raises(ValueError, match="min_bin must be an integer >= 0, got -1"):
        fit_compute_optimal(prompts, min_bin=-1)
    with pytest.raises(ValueError, match="pilot must be an integer >= 1, got '3'"):
        fit_compute_optimal(prompts, pilot="3")
    with pytest.raises(ValueError, match="k_max must be an integer >= pilot=3, got 2"):
        fit_compute_optimal(prompts, k_max=2)
