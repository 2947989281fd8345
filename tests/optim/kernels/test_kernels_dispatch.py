"""``scrimp.optim.kernels.projected_adam_step``: backend choice, argument checks, parity of backends."""

from __future__ import annotations

import pytest
import torch
from kernels_reference import random_problem, reference_step, relative_error

import scrimp.optim.kernels as kernels
from scrimp.optim.functional import projected_adam_step_torch

HYPER = dict(step=3, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scale=0.25, residual_lr_scale=0.5)


def clones(prob):
    return [t.clone() for t in (prob.W, prob.G, prob.P, prob.exp_avg, prob.exp_avg_sq)]


def test_auto_is_torch_on_cpu_and_triton_on_cuda():
    assert kernels.resolve_backend("auto", torch.ones(2, 2)) == "torch"
    assert kernels.resolve_backend("torch", torch.ones(2, 2)) == "torch"
    if torch.cuda.is_available():
        assert kernels.resolve_backend("auto", torch.ones(2, 2, device="cuda")) == "triton"


def test_triton_backend_without_triton_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' needs the triton package"):
        kernels.resolve_backend("triton", torch.ones(2, 2))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_backend_is_the_functional_reference(backend):
    """On the CPU, "torch" and "auto" run scrimp.optim.functional's function itself: bitwise equal."""
    prob = random_problem(30, 22, 4, "right", generator=torch.Generator().manual_seed(2))
    ours, theirs = clones(prob), clones(prob)
    kernels.projected_adam_step(*ours, side="right", residual="sign_sgd", backend=backend, **HYPER)
    projected_adam_step_torch(*theirs, side="right", residual="sign_sgd", **HYPER)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["left", "right"])
def test_triton_and_torch_backends_agree_with_float64(fused, device, side):
    prob = random_problem(41, 29, 6, side, device=device, generator=torch.Generator().manual_seed(4))
    ref = reference_step(*clones(prob), side=side, residual="sgd", **HYPER)
    for backend in ("triton", "torch"):
        W, G, P, m, v = (t.to(device) for t in clones(prob))
        kernels.projected_adam_step(W, G, P, m, v, side=side, residual="sgd", backend=backend, **HYPER)
        W0 = prob.W.cpu().double()
        assert relative_error(W.cpu().double() - W0, ref["W"] - W0) < 1e-5, backend
        assert relative_error(m, ref["exp_avg"]) < 1e-5 and relative_error(v, ref["exp_avg_sq"]) < 1e-5


def _bad(change):
    """Arguments of a valid left-side call with one change applied."""
    prob = random_problem(12, 10, 3, "left", generator=torch.Generator().manual_seed(0))
    args = dict(W=prob.W, G=prob.G, P=prob.P, exp_avg=prob.exp_avg, exp_avg_sq=prob.exp_avg_sq,
                side="left", residual=None, backend="auto", **HYPER)
    change(args)
    return args


BAD = [
    (lambda a: a.update(side="up"), ValueError, "side must be one of"),
    (lambda a: a.update(residual="adam"), ValueError, "residual must be one of"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend must be one of"),
    (lambda a: a.update(P=a["P"][:, :2].t().contiguous()), ValueError, "P must have shape"),
    (lambda a: a.update(G=a["G"][:, :9]), ValueError, "G must have W's shape"),
    (lambda a: a.update(exp_avg=a["exp_avg"].t().contiguous()), ValueError, "exp_avg must have the low-rank shape"),
    (lambda a: a.update(exp_avg_sq=a["exp_avg_sq"].half()), TypeError, "exp_avg_sq must be float32"),
    (lambda a: a.update(W=a["W"].long()), TypeError, "W must be float32, bfloat16 or float16"),
    (lambda a: a.update(G=a["G"][0]), ValueError, "G must be 2-D"),
    (lambda a: a.update(step=0), ValueError, "step must be an int >= 1"),
    (lambda a: a.update(beta1=1.0), ValueError, "beta1 must be a float in"),
    (lambda a: a.update(eps=0.0), ValueError, "eps must be a finite float > 0"),
    (lambda a: a.update(lr=float("nan")), ValueError, "lr must be a finite float >= 0"),
    (lambda a: a.update(scale=-1.0), ValueError, "scale must be a finite float >= 0"),
]


@pytest.mark.parametrize("change,error,message", BAD)
def test_bad_arguments_raise_one_sentence_before_any_write(change, error, message):
    args = _bad(change)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    W, G, P, m, v = (args.pop(k) for k in ("W", "G", "P", "exp_avg", "exp_avg_sq"))
    with pytest.raises(error, match=message):
        kernels.projected_adam_step(W, G, P, m, v, **args)
    for name, t in zip(("W", "G", "P", "exp_avg", "exp_avg_sq"), (W, G, P, m, v)):
        assert torch.equal(t, before[name])


def test_an_interpreter_that_cannot_run_loops_is_refused_in_one_sentence(fused, monkeypatch):
    """Triton 3.6's interpreter under NumPy >= 2.4 fails inside Triton; the step says so before any work."""
    if not fused.INTERPRETED:
        pytest.skip("the probe only runs under TRITON_INTERPRET=1")

    class BrokenInterpreterKernel:  # what Triton 3.6 + NumPy 2.4 raise from any runtime-bound loop
        def __getitem__(self, grid):
            def launch(*args):
                raise RuntimeError("InterpreterError(\"TypeError('only 0-dimensional arrays can be converted "
                                   "to Python scalars')\")")
            return launch

    fused.check_interpreter_runs_loops.cache_clear()
    monkeypatch.setattr(fused, "_runtime_bound_loop_probe", BrokenInterpreterKernel())
    prob = random_problem(30, 22, 4, "right", generator=torch.Generator().manual_seed(5))
    before = clones(prob)
    try:
        with pytest.raises(RuntimeError, match=r"interpreter cannot run the kernels' loops under NumPy .*Triton 3\.9"):
            kernels.projected_adam_step(prob.W, prob.G, prob.P, prob.exp_avg, prob.exp_avg_sq,
                                        side="right", backend="triton", **HYPER)
    finally:
        monkeypatch.undo()
        fused.check_interpreter_runs_loops.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(before, (prob.W, prob.G, prob.P, prob.exp_avg, prob.exp_avg_sq)))
    try:  # the real probe: passes with Triton 3.9 (CI); on a broken interpreter it must say so
        fused.check_interpreter_runs_loops()
    except RuntimeError as err:
        assert "interpreter cannot run the kernels' loops" in str(err)


def test_a_step_that_cannot_be_written_is_refused_before_the_moments_change():
    W = torch.randn(8, 6, requires_grad=True)
    G, P = torch.randn(8, 6), torch.linalg.qr(torch.randn(8, 2))[0]
    m, v = torch.randn(2, 6), torch.rand(2, 6)
    m0 = m.clone()
    with pytest.raises(ValueError, match="W requires grad: call projected_adam_step under torch.no_grad"):
        kernels.projected_adam_step(W, G, P, m, v, side="left", backend="torch", **HYPER)
    assert torch.equal(m, m0)
    with torch.no_grad(), pytest.raises(ValueError, match="separate tensors"):
        kernels.projected_adam_step(W, G, P, m, m, side="left", backend="torch", **HYPER)
