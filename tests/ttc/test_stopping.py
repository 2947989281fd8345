import numpy as np
import pytest

from scrimp.ttc.stopping import beta_confidence, beta_tail_above_half, should_stop, window_agrees


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (4.5, 0.5), (3.0, 1.0), (20.5, 3.5), (1.5, 7.0), (2.0, 0.7)])
def test_beta_tail_matches_monte_carlo(a, b):
    draws = np.random.default_rng(0).beta(a, b, 400_000)
    mc = (draws > 0.5).mean()
    assert abs(beta_tail_above_half(a, b) - mc) < 4 * np.sqrt(mc * (1 - mc) / draws.size) + 1e-4


def test_integer_case_closed_form():
    # Beta(v+1, 1): P(X > 1/2) = 1 - 2^-(v+1)
    for v in range(6):
        assert abs(beta_tail_above_half(v + 1, 1) - (1 - 0.5 ** (v + 1))) < 1e-12


def test_rules():
    assert beta_confidence(["a", "a", "a", "b"], prior=1.0) == pytest.approx(beta_tail_above_half(4, 2))
    assert window_agrees(["x", "a", "a", "a"], 3) is False  # 4 drawn: not at a window boundary
    assert window_agrees(["x", "b", "a", "a", "a", "a"], 3) is True
    assert not should_stop(["a", "b"], "beta", threshold=0.9, prior=1.0, window=3)
    assert should_stop(["a"] * 6, "beta", threshold=0.9, prior=1.0, window=3)
    with pytest.raises(ValueError, match="rule must be one of"):
        should_stop(["a"], "vote", threshold=0.9, prior=1.0, window=3)


def _cap_majority_monte_carlo(counts, drawn, horizon, prior, draws=100_000, seed=0):
    """Reference: theta ~ Dirichlet(counts + prior, unseen class), the remaining samples multinomial,
    the leader's share of the (evenly split) win of the final plurality vote."""
    rng = np.random.default_rng(seed)
    c = np.array([*counts, 0.0])
    theta = rng.dirichlet(c + prior, size=draws)
    rest = horizon - drawn
    final = c + np.stack([rng.multinomial(rest, t) for t in theta])
    winners = final == final.max(axis=1, keepdims=True)
    return float((winners[:, 0] / winners.sum(axis=1)).mean())


@pytest.mark.parametrize("counts, drawn, horizon, prior", [
    ((2,), 2, 40, 0.5), ((2, 1), 3, 16, 0.5), ((3, 1, 1), 6, 10, 1.0), ((1, 1), 2, 6, 0.25), ((4, 2), 7, 12, 1.0),
])
def test_cap_majority_matches_monte_carlo(counts, drawn, horizon, prior):
    from scrimp.ttc.stopping import cap_majority_probability

    got = cap_majority_probability(counts, drawn, horizon, prior)
    ref = _cap_majority_monte_carlo(counts, drawn, horizon, prior, draws=40_000)
    assert got == pytest.approx(ref, abs=4 * np.sqrt(0.25 / 40_000) + 1e-3)


def test_cap_majority_edges_and_rule():
    from scrimp.ttc.stopping import answer_counts, cap_majority_probability

    assert cap_majority_probability((3, 1), 4, 4) == 1.0  # at the cap the vote is decided
    assert cap_majority_probability((2, 2), 4, 4) == 0.5  # a tie is split evenly
    assert cap_majority_probability((), 2, 10) == 0.0  # no vote yet: no leader
    assert answer_counts(["b", None, "a", "b"]) == (2, 1)
    # more evidence for the leader can only raise the chance that it keeps the lead
    assert cap_majority_probability((5,), 5, 40) > cap_majority_probability((2,), 2, 40)
    assert should_stop(["a"] * 5, "dirichlet", threshold=0.95, prior=0.5, window=3, horizon=40)
    assert not should_stop(["a", "b", "a"], "dirichlet", threshold=0.95, prior=0.5, window=3, horizon=40)
    with pytest.raises(ValueError, match="needs horizon"):
        should_stop(["a"], "dirichlet", threshold=0.9, prior=1.0, window=3)
    with pytest.raises(ValueError, match="leader first"):
        cap_majority_probability((1, 2), 3, 10)
    with pytest.raises(ValueError, match="prior must be"):
        cap_majority_probability((1,), 1, 10, prior=0.0)
    with pytest.raises(ValueError, match="drawn"):
        cap_majority_probability((3,), 2, 10)


def test_leader_vs_runner_up_bound_is_an_upper_bound_of_the_exact_probability():
    from scrimp.ttc.stopping import cap_majority_probability, leader_vs_runner_up_bound

    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = sorted(rng.integers(0, 6, rng.integers(2, 7)).tolist(), reverse=True)
        if counts[0] == 0:
            continue
        drawn = sum(counts) + int(rng.integers(0, 3))
        horizon, prior = drawn + int(rng.integers(0, 20)), float(rng.choice([0.5, 1.0]))
        exact = cap_majority_probability(counts, drawn, horizon, prior)
        assert leader_vs_runner_up_bound(counts, drawn, horizon, prior) >= exact - 1e-12


def test_the_bound_never_changes_a_stopping_decision(monkeypatch):
    # Spread votes (a hard task): the decisions with the bound's shortcut equal the exact ones.
    from scrimp.ttc import stopping

    rng = np.random.default_rng(1)
    cases = [[str(a) for a in rng.integers(0, int(rng.integers(2, 8)), int(rng.integers(2, 20)))] for _ in range(150)]
    fast = [stopping.should_stop(a, "dirichlet", threshold=t, prior=0.5, window=3, horizon=24)
            for a in cases for t in (0.6, 0.9, 0.95)]
    monkeypatch.setattr(stopping, "leader_vs_runner_up_bound", lambda *args: 1.0)
    exact = [stopping.should_stop(a, "dirichlet", threshold=t, prior=0.5, window=3, horizon=24)
             for a in cases for t in (0.6, 0.9, 0.95)]
    assert fast == exact and any(exact) and not all(exact)


def test_stopping_rule_parameters_are_checked_in_one_sentence():
    from scrimp.ttc.stopping import beta_confidence, window_agrees

    with pytest.raises(ValueError, match="prior must be a finite number > 0, got nan"):
        beta_confidence(["a", "a", "b"], float("nan"))  # NaN used to pass the "> 0" test
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 2.5"):
        window_agrees(["a", "a", "a"], 2.5)
