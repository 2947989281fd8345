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
