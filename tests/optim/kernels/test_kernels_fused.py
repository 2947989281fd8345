"""The fused Triton step (scrimp/optim/kernels/fused.py, projection.py, back_projection.py) vs a float64 reference.

Interpreted on the CPU (TRITON_INTERPRET=1, see conftest.py), compiled on CUDA. Fresh random inputs
every step, outputs and intermediates poisoned with NaN, shapes that are not multiples of any block
size, both sides, every residual rule, several steps in a row (the bias correction changes each step).
"""

from __future__ import annotations

import pytest
import torch
from kernels_reference import fresh_gradient, random_problem, reference_step, relative_error

HYPER = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scale=0.25, residual_lr_scale=0.5)
FP32_TOL = 1e-5
RESIDUALS = [None, "sgd", "sign_sgd", "scaled"]


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def right_form(t64: torch.Tensor, side: str) -> torch.Tensor:
    """The kernels keep N and R as (rows of the right form, rank): transposed for side="left"."""
    return t64.T if side == "left" else t64


def sign_ambiguous(ref) -> torch.Tensor:
    """Entries whose float64 residual is so close to 0 that fp32 rounding may flip its sign."""
    res = ref["residual"]
    return res.abs() < 1e-4 * res.pow(2).mean().sqrt()


def check_w_update(W_before, W_after, ref, *, residual, hyper, tol):
    """Compare the update W_after - W_before (not W itself, which would hide an lr-sized error) with float64."""
    W_before64 = W_before.detach().cpu().double()
    delta = W_after.detach().cpu().double() - W_before64
    delta_ref = ref["W"] - W_before64
    if residual == "sign_sgd":
        ambiguous = sign_ambiguous(ref)
        flip = 2.0 * hyper["lr"] * hyper["residual_lr_scale"]
        assert int(ambiguous.sum()) <= max(3, ambiguous.numel() // 1000)
        assert ((delta - delta_ref)[ambiguous].abs() <= flip * (1 + 1e-5)).all()
        delta, delta_ref = delta[~ambiguous], delta_ref[~ambiguous]
    assert relative_error(delta, delta_ref) < tol


def run_steps(fused, device, m, n, rank, side, residual, *, steps, seed, orthonormal=True, dot_precision=None):
    gen = torch.Generator().manual_seed(seed)
    prob = random_problem(m, n, rank, side, device=device, generator=gen, orthonormal=orthonormal)
    ref_m, ref_v = prob.exp_avg.cpu().double(), prob.exp_avg_sq.cpu().double()
    W, m_state, v_state = prob.W, prob.exp_avg, prob.exp_avg_sq
    rows = n if side == "left" else m
    for step in range(1, steps + 1):
        G = fresh_gradient(prob, gen)
        ref = reference_step(W, G, prob.P, ref_m, ref_v, step=step, side=side, residual=residual, **HYPER)
        N = torch.full((rows, rank), float("nan"), device=device)
        R = nan_like(N) if residual is not None else None
        W_before = W.clone()
        if step == 1:
            # Out of place into poisoned buffers: every element must be written, inputs left alone.
            m_before, v_before = m_state.clone(), v_state.clone()
            out = (nan_like(W), nan_like(m_state), nan_like(v_state))
            fused.projected_adam_step_triton(W, G, prob.P, m_state, v_state, step=step, side=side,
                                             residual=residual, out=out, workspace=(N, R),
                                             dot_precision=dot_precision, **HYPER)
            assert torch.equal(W, W_before) and torch.equal(m_state, m_before) and torch.equal(v_state, v_before)
            W, m_state, v_state = out
        else:
            fused.projected_adam_step_triton(W, G, prob.P, m_state, v_state, step=step, side=side,
                                             residual=residual, workspace=(N, R), dot_precision=dot_precision,
                                             **HYPER)
        for name, t in (("W", W), ("exp_avg", m_state), ("exp_avg_sq", v_state), ("N", N)):
            assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) entries at step {step}"
        assert relative_error(m_state, ref["exp_avg"]) < FP32_TOL
        assert relative_error(v_state, ref["exp_avg_sq"]) < FP32_TOL
        assert relative_error(N, right_form(ref["N"], side)) < FP32_TOL
        if R is not None:
            assert torch.isfinite(R).all()
            assert relative_error(R, right_form(ref["R"], side)) < FP32_TOL
        check_w_update(W_before, W, ref, residual=residual, hyper=HYPER, tol=FP32_TOL)
        ref_m, ref_v = ref["exp_avg"], ref["exp_avg_sq"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("residual", RESIDUALS)
def test_fp32_small_shape_matches_float64_over_three_steps(fused, device, side, residual):
    run_steps(fused, device, 67, 45, 7, side, residual, steps=3, seed=2 * RESIDUALS.index(residual) + (side == "left"))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("residual", [None, "sign_sgd"])
def test_fp32_several_rank_blocks_match_float64(fused, device, side, residual):
    # rank 37 spans three rank blocks of 16 under the interpreter; P Gaussian, not orthonormal.
    run_steps(fused, device, 130, 200, 37, side, residual, steps=2, seed=7 + len(side), orthonormal=False)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_fp32_1000x3000_rank37_matches_float64(fused, device, side):
    run_steps(fused, device, 1000, 3000, 37, side, "sign_sgd", steps=2, seed=11)


def run_bf16_steps(fused, device, m, n, rank, side, residual, p_dtype, *, seed):
    gen = torch.Generator().manual_seed(seed)
    prob = random_problem(m, n, rank, side, w_dtype=torch.bfloat16, p_dtype=p_dtype, device=device, generator=gen)
    ref_m, ref_v = prob.exp_avg.cpu().double(), prob.exp_avg_sq.cpu().double()
    W = prob.W
    for step in (1, 2):
        G = fresh_gradient(prob, gen)
        ref = reference_step(W, G, prob.P, ref_m, ref_v, step=step, side=side, residual=residual, **HYPER)
        N = torch.full((n if side == "left" else m, rank), float("nan"), device=device)
        W_out = nan_like(W)
        fused.projected_adam_step_triton(W, G, prob.P, prob.exp_avg, prob.exp_avg_sq, step=step, side=side,
                                         residual=residual, out=(W_out, prob.exp_avg, prob.exp_avg_sq),
                                         workspace=(N, nan_like(N) if residual else None), **HYPER)
        assert W_out.dtype == torch.bfloat16 and torch.isfinite(W_out).all() and torch.isfinite(N).all()
        # The states see the same bf16 gradient values as the reference: fp32 accuracy.
        assert relative_error(prob.exp_avg, ref["exp_avg"]) < FP32_TOL
        assert relative_error(prob.exp_avg_sq, ref["exp_avg_sq"]) < FP32_TOL
        assert relative_error(N, right_form(ref["N"], side)) < FP32_TOL
        assert relative_error(W_out, ref["W"]) < 1e-2
        # Stronger: each entry is the float64 result rounded once to bf16 (half an ulp is 2^-9 relative).
        err = (W_out.cpu().double() - ref["W"]).abs()
        ok = err <= ref["W"].abs() * 2.0**-8 + 1e-6
        if residual == "sign_sgd":
            ok |= sign_ambiguous(ref)
        assert ok.all()
        W, ref_m, ref_v = W_out, ref["exp_avg"], ref["exp_avg_sq"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("residual", [None, "sgd", "sign_sgd"])
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
def test_bf16_weights_with_fp32_states(fused, device, side, residual, p_dtype):
    run_bf16_steps(fused, device, 67, 45, 7, side, residual, p_dtype, seed=3)


def test_strided_views_match_contiguous(fused, device):
    """W and G given as transposed views (non-contiguous) update exactly like contiguous copies."""
    gen = torch.Generator().manual_seed(5)
    prob = random_problem(45, 67, 7, "right", device=device, generator=gen)
    W_view = prob.W.t().contiguous().t()
    G_view = prob.G.t().contiguous().t()
    assert not W_view.is_contiguous()
    states = [(prob.exp_avg.clone(), prob.exp_avg_sq.clone()) for _ in range(2)]
    W_plain = prob.W.clone()
    kw = dict(step=4, side="right", residual="sgd", **HYPER)
    fused.projected_adam_step_triton(W_view, G_view, prob.P, *states[0], **kw)
    fused.projected_adam_step_triton(W_plain, prob.G, prob.P, *states[1], **kw)
    assert torch.equal(W_view, W_plain)
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])


def test_cpu_tensor_without_interpreter_is_refused(fused, monkeypatch):
    monkeypatch.setattr(fused, "INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused.check_triton_device(torch.ones(2, 2))


def test_unknown_dot_precision_is_refused(fused, device):
    prob = random_problem(20, 18, 3, "left", device=device, generator=torch.Generator().manual_seed(0))
    W_before = prob.W.clone()
    with pytest.raises(ValueError, match="dot_precision"):
        fused.projected_adam_step_triton(prob.W, prob.G, prob.P, prob.exp_avg, prob.exp_avg_sq, step=1,
                                         side="left", dot_precision="fp8", **HYPER)
    assert torch.equal(prob.W, W_before)


# ---- compiled on CUDA: the benchmark's shapes, both dot precisions, the native bf16 projection dot ----


GPU_CASES = [(1000, 3000, 37, rule) for rule in RESIDUALS] + [(4096, 11008, 128, rule) for rule in (None, "sign_sgd")]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,rank,residual", GPU_CASES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dot_precision", ["tf32x3", "ieee"])
def test_gpu_fp32_large_shapes_match_float64(fused, m, n, rank, residual, side, dot_precision):
    # The float64 reference runs on the CPU: a few seconds per step at 4096x11008.
    run_steps(fused, "cuda", m, n, rank, side, residual, steps=3, seed=m + rank, dot_precision=dot_precision)


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("residual", [None, "sign_sgd"])
def test_gpu_bf16_native_projection_dot_matches_float64(fused, side, residual):
    # W, G and P all bf16: kernel 1 runs the native bf16 tl.dot (exact products, fp32 accumulation).
    run_bf16_steps(fused, "cuda", 1000, 3000, 37, side, residual, torch.bfloat16, seed=9)


def _every_config():
    from scrimp.optim.kernels import configs

    cases = [(c, None) for c in configs.PROJECTION_CONFIGS] + [(None, c) for c in configs.BACK_PROJECTION_CONFIGS]
    return [pytest.param(c, id=f"k1-{i}" if c[0] else f"k2-{i}") for i, c in enumerate(cases)]


@pytest.mark.parametrize("launch_configs", _every_config())
def test_every_autotune_config_computes_the_same_step(fused, device, launch_configs):
    """Each GPU config (large tiles, partial on every axis here) gives the float64 result."""
    side, residual = "left", "sgd"
    gen = torch.Generator().manual_seed(21)
    prob = random_problem(150, 90, 37, side, device=device, generator=gen)
    ref = reference_step(prob.W, prob.G, prob.P, prob.exp_avg, prob.exp_avg_sq, step=2, side=side, residual=residual,
                         **HYPER)
    W_out, N = nan_like(prob.W), torch.full((90, 37), float("nan"), device=device)
    fused.projected_adam_step_triton(prob.W, prob.G, prob.P, prob.exp_avg, prob.exp_avg_sq, step=2, side=side,
                                     residual=residual, out=(W_out, prob.exp_avg, prob.exp_avg_sq),
                                     workspace=(N, nan_like(N)), launch_configs=launch_configs, **HYPER)
    assert torch.isfinite(W_out).all() and torch.isfinite(N).all()
    assert relative_error(N, ref["N"].T) < FP32_TOL
    check_w_update(prob.W, W_out, ref, residual=residual, hyper=HYPER, tol=FP32_TOL)
