"""scrimp.checks: one sentence per bad scalar; NumPy numbers are numbers, bools are not."""

import math

import numpy as np
import pytest

from scrimp.checks import check_choice, check_integer, check_number, is_integer, is_real


def test_numpy_scalars_are_numbers_and_bools_are_not():
    assert is_integer(3) and is_integer(np.int64(3)) and is_integer(np.uint8(3))
    assert is_real(np.float32(2.0)) and is_real(2.5) and is_real(np.int32(1))
    for flag in (True, np.bool_(False)):
        assert not is_integer(flag) and not is_real(flag)
    assert not is_integer(2.0) and not is_real("2") and not is_real(None)


def test_values_inside_the_range_pass_through_as_python_numbers():
    assert check_integer("k", np.int64(4), 1) == 4 and type(check_integer("k", np.int64(4), 1)) is int
    assert check_integer("k_max", None, 2, optional=True) is None
    assert check_number("prior", np.float32(0.5), low=0, open_low=True) == 0.5
    assert check_number("threshold", 1.0, low=0, high=1) == 1.0
    assert check_choice("rule", "beta", ("beta", "window")) == "beta"


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check_integer("k_max", -3, 2, minimum_name="pilot", optional=True),
     "k_max must be an integer >= pilot=2 (or None), got -3"),
    (lambda: check_integer("pilot", True, 1), "pilot must be an integer >= 1, got True"),
    (lambda: check_integer("n", 2.0, 0), "n must be an integer >= 0, got 2.0"),
    (lambda: check_number("threshold", "0.9", low=0, high=1, open_low=True, open_high=True),
     "threshold must be a finite number in (0, 1), got '0.9'"),
    (lambda: check_number("prior", math.nan, low=0, open_low=True), "prior must be a finite number > 0, got nan"),
    (lambda: check_number("x", math.inf), "x must be a finite number, got inf"),
    (lambda: check_choice("rule", ["beta"], ("beta",)), "rule must be one of ('beta',), got ['beta']"),
])
def test_bad_values_get_one_sentence_naming_the_parameter(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message
