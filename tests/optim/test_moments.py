"""Moment stores (issue 14, item 2): 8-bit moments are a kind of state, not a branch of the step.

References: bitsandbytes' own blockwise quantization called directly (the original of the 8-bit
store), and the key names and shapes the engine wrote before the stores existed.
"""

import bitsandbytes.functional as bnbf
import pytest
import torch

from scrimp.optim.moments import (
    BLOCKSIZE_8BIT,
    BLOCKWISE_8BIT_STORE,
    FP32_STORE,
    MIN_8BIT_NUMEL,
    moment_store,
)
from scrimp.optim.rules.adam import ADAM_MOMENTS
from scrimp.optim.rules.base import MomentSpec


def test_fp32_store_opens_the_state_tensors_themselves():
    state = {}
    FP32_STORE.zeros(state, ADAM_MOMENTS, (3, 5), torch.device("cpu"))
    assert set(state) == {"exp_avg", "exp_avg_sq"} and state["exp_avg"].dtype == torch.float32
    opened = FP32_STORE.open(state, ADAM_MOMENTS)
    opened["exp_avg"].add_(1.0)
    FP32_STORE.close(state, ADAM_MOMENTS, opened)
    assert torch.equal(state["exp_avg"], torch.ones(3, 5))
    assert FP32_STORE.has(state, ADAM_MOMENTS) and FP32_STORE.format_of(state, ADAM_MOMENTS) == "fp32"
    FP32_STORE.drop(state, ADAM_MOMENTS)
    assert state == {} and not FP32_STORE.has(state, ADAM_MOMENTS)


@pytest.mark.parametrize("shape", [(32, 128), (4096,), (70, 61)])
def test_8bit_store_equals_bitsandbytes_blockwise_quantization(shape):
    gen = torch.Generator().manual_seed(0)
    m, v = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen)
    state = {}
    BLOCKWISE_8BIT_STORE.zeros(state, ADAM_MOMENTS, shape, torch.device("cpu"))
    assert set(state) == {"exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"}
    opened = BLOCKWISE_8BIT_STORE.open(state, ADAM_MOMENTS)
    assert all(torch.equal(t, torch.zeros(shape)) for t in opened.values())  # zeros decode to zeros
    opened["exp_avg"].copy_(m)
    opened["exp_avg_sq"].copy_(v)
    BLOCKWISE_8BIT_STORE.close(state, ADAM_MOMENTS, opened)
    for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        code = bnbf.create_dynamic_map(signed=signed)
        q, qs = bnbf.quantize_blockwise(x, code=code, blocksize=BLOCKSIZE_8BIT)
        assert torch.equal(state[f"{name}_q"], q) and torch.equal(state[f"{name}_absmax"], qs.absmax)
        back = BLOCKWISE_8BIT_STORE.open(state, ADAM_MOMENTS)[name]
        torch.testing.assert_close(back, bnbf.dequantize_blockwise(q, qs), rtol=0, atol=0)
    assert BLOCKWISE_8BIT_STORE.format_of(state, ADAM_MOMENTS) == "blockwise8"


def test_small_tensors_and_unquantizable_specs_stay_fp32_in_the_8bit_store():
    specs = (MomentSpec("exp_avg", signed=True), MomentSpec("fisher", signed=True, quantizable=False, history=3))
    state = {}
    BLOCKWISE_8BIT_STORE.zeros(state, specs, (MIN_8BIT_NUMEL,), torch.device("cpu"))
    assert state["exp_avg_q"].shape == (MIN_8BIT_NUMEL,) and state["fisher"].shape == (3, MIN_8BIT_NUMEL)
    assert state["fisher"].dtype == torch.float32
    small = {}
    BLOCKWISE_8BIT_STORE.zeros(small, ADAM_MOMENTS, (MIN_8BIT_NUMEL - 1,), torch.device("cpu"))
    assert set(small) == {"exp_avg", "exp_avg_sq"} and BLOCKWISE_8BIT_STORE.format_of(small, ADAM_MOMENTS) == "fp32"


def test_expected_shapes_are_what_zeros_creates():
    for store in (moment_store(False), moment_store(True)):
        for shape in ((8, 600), (3, 4)):
            state = {}
            store.zeros(state, ADAM_MOMENTS, shape, torch.device("cpu"))
            assert {k: tuple(t.shape) for k, t in state.items()} == store.expected_shapes(ADAM_MOMENTS, shape)
    assert BLOCKWISE_8BIT_STORE.expected_shapes(ADAM_MOMENTS, (8, 600))["exp_avg_absmax"] == (-(-4800 // 256),)
