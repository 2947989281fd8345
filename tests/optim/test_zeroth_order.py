"""Tests for scrimp/optim/zeroth_order.py (and the scrimp.optim.zo package behind it).

References: bit-identity with the starting parameters, the exact gradient of a quadratic (Monte
Carlo over 20k seeds), a single step on the concatenated batch, an uninterrupted run, torch.optim's
Adam fed the same estimate, an explicit float64 momentum buffer, and a forward pass's memory.
"""

from __future__ import annotations

import copy
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from scrimp.optim.offload.stream import causal_lm_loss
from scrimp.optim.zeroth_order import ZOSGD, ZOAdam, restore, save_full, save_log
from scrimp.optim.zo.perturbation import direction
from scrimp.profiling import track_live_bytes
from scrimp.training.models import build_model


@pytest.fixture(autouse=True)
def single_thread():
    # small ops: on a shared 2-core machine one thread is several times faster than two (no spin-waits);
    # every comparison here runs both sides under the same thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return build_model("llama_tiny", seed=0)


def _batch(seed: int, batch: int = 2, length: int = 16, vocab: int = 4096) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


class Quadratic(nn.Module):
    """f(theta) = 1/2 theta^T A theta + b^T theta, read inside the module's own forward."""

    def __init__(self, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / dim + torch.eye(dim, dtype=torch.float64))
        self.register_buffer("b", torch.randn(dim, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def gradient(self):
        return self.A @ self.theta.detach() + self.b


# ---- exact restore ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"n_queries": 3, "sign": True}, {"momentum": 0.9, "weight_decay": 0.1}])
def test_lr_zero_step_leaves_parameters_bit_identical(tiny, kwargs):
    model = copy.deepcopy(tiny)
    before = _snapshot(model)
    x = _batch(0)
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, **kwargs)
    for _ in range(2):
        loss = opt.step(lambda: model(x, labels=x).loss)
    assert torch.isfinite(loss)
    assert opt.steps == 2 and len(opt.log) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hook_and_inplace_perturbations_estimate_the_same_projected_gradient(tiny):
    # MeZO's in-place +eps/-2eps/+eps and the hook evaluate the same points up to rounding
    x = _batch(1)
    estimates = []
    for mode in ("hook", "inplace"):
        model = copy.deepcopy(tiny).double()
        opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, perturbation=mode, seed=5)
        opt.step(lambda model=model: model(x, labels=x).loss)
        estimates.append(float(opt.log[-1]["grads"][0]))
    assert estimates[0] == pytest.approx(estimates[1], rel=1e-6)


# ---- unbiasedness ----------------------------------------------------------------------------------
def test_estimate_is_unbiased_on_a_quadratic_over_20k_seeds():
    torch.manual_seed(0)
    quad = Quadratic(8)
    opt = ZOSGD(quad.parameters(), lr=0.0, eps=1e-2, seed=11)
    n = 20_000
    for _ in range(n):
        opt.step(quad)
    seeds = torch.cat([r["seeds"] for r in opt.log]).tolist()
    grads = torch.cat([r["grads"] for r in opt.log])
    z = torch.stack([direction(quad.theta, s, 0) for s in seeds])  # the optimizer's own directions
    estimate = (grads[:, None] * z).mean(0)
    truth = quad.gradient()
    # E[c z] = grad exactly for a quadratic (central differences are exact); the Monte Carlo error
    # has E|err|^2 = (d+1)|g|^2 / n, i.e. a relative error of about 0.02 here
    relative_error = (estimate - truth).norm() / truth.norm()
    assert relative_error < 0.08
    assert torch.nn.functional.cosine_similarity(estimate, truth, dim=0) > 0.99
    # each scalar is the directional derivative z . grad (exact for a quadratic, up to rounding)
    assert torch.allclose(grads[:50], z[:50] @ truth, rtol=1e-6, atol=1e-9)


# ---- update rules against independent references ---------------------------------------------------
def test_sgd_update_is_minus_lr_times_averaged_queries():
    quad = Quadratic(6)
    theta0 = quad.theta.detach().clone()
    opt = ZOSGD(quad.parameters(), lr=0.1, eps=1e-2, n_queries=3, seed=2)
    opt.step(quad)
    record = opt.log[-1]
    truth = quad.A @ theta0 + quad.b
    zs = [direction(theta0, int(s), 0) for s in record["seeds"]]
    # reference: the average of 3 independent two-point estimates, each c_j = z_j . grad
    reference = theta0 - 0.1 * sum((z @ truth) * z for z in zs) / 3
    assert torch.allclose(quad.theta.detach(), reference, rtol=1e-9, atol=1e-12)


def test_sign_variant_moves_every_coordinate_by_lr():
    quad = Quadratic(6)
    theta0 = quad.theta.detach().clone()
    opt = ZOSGD(quad.parameters(), lr=0.01, eps=1e-2, sign=True, seed=4)
    opt.step(quad)
    c = float(opt.log[-1]["grads"][0])
    z = direction(theta0, int(opt.log[-1]["seeds"][0]), 0)
    assert torch.allclose(quad.theta.detach(), theta0 - 0.01 * torch.sign(c * z), rtol=0, atol=1e-15)


def test_seed_replayed_momentum_equals_an_explicit_buffer():
    quad = Quadratic(6)
    theta_ref = quad.theta.detach().clone()
    beta, lr, steps = 0.8, 0.05, 6
    opt = ZOSGD(quad.parameters(), lr=lr, eps=1e-2, momentum=beta, momentum_window=steps, seed=9)
    buffer = torch.zeros_like(theta_ref)
    for _ in range(steps):
        opt.step(quad)
        record = opt.log[-1]
        z = direction(theta_ref, int(record["seeds"][0]), 0)
        buffer = beta * buffer + float(record["grads"][0]) * z  # torch.optim.SGD momentum, full buffer
        theta_ref = theta_ref - lr * buffer
    assert torch.allclose(quad.theta.detach(), theta_ref, rtol=1e-10, atol=1e-12)


def test_zo_adam_equals_torch_adam_fed_the_zo_estimate():
    quad = Quadratic(6)
    shadow = nn.Parameter(quad.theta.detach().clone())
    # adam eps tiny: torch adds it after the bias correction, galore/HF (and we) before it
    reference = torch.optim.Adam([shadow], lr=0.01, betas=(0.9, 0.99), eps=1e-14)
    opt = ZOAdam(quad.parameters(), lr=0.01, eps=1e-2, betas=(0.9, 0.99), adam_eps=1e-14, seed=1)
    for _ in range(4):
        opt.step(quad)
        record = opt.log[-1]
        shadow.grad = float(record["grads"][0]) * direction(shadow, int(record["seeds"][0]), 0)
        reference.step()
    assert torch.allclose(quad.theta.detach(), shadow.detach(), rtol=1e-9, atol=1e-12)
    assert set(opt.state[quad.theta]) == {"exp_avg", "exp_avg_sq"}  # the full-size state ZO-Adam keeps


# ---- accumulation ----------------------------------------------------------------------------------
def test_accumulating_four_micro_batches_equals_one_step_on_the_concatenated_batch(tiny):
    micro = [_batch(10 + k, batch=2) for k in range(4)]
    full = torch.cat(micro)
    results = []
    for mode in ("accumulate", "concatenated"):
        model = copy.deepcopy(tiny).double()  # float64 so the scalar comparison is tight
        opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=21)
        if mode == "accumulate":
            for x in micro[:-1]:
                opt.accumulate(lambda x=x, model=model: causal_lm_loss(model(x).logits, x))
            opt.step(lambda model=model: causal_lm_loss(model(micro[-1]).logits, micro[-1]))
        else:
            opt.step(lambda model=model: causal_lm_loss(model(full).logits, full))
        results.append((opt.log[-1], _snapshot(model)))
    (acc_record, acc_params), (full_record, full_params) = results
    assert torch.equal(acc_record["seeds"], full_record["seeds"])
    assert float(acc_record["grads"][0]) == pytest.approx(float(full_record["grads"][0]), rel=1e-7)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(acc_params, full_params))
    start = [p.detach().double() for p in tiny.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(acc_params, start))  # the step did move the weights


# ---- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"momentum": 0.9, "momentum_window": 4}, {"sign": True, "n_queries": 2}])
def test_replaying_seed_scalar_pairs_equals_the_uninterrupted_run_bitwise(tiny, tmp_path, kwargs):
    batches = [_batch(30 + k) for k in range(8)]

    def run(model, opt, xs):
        for x in xs:
            opt.step(lambda x=x: causal_lm_loss(model(x).logits, x))

    straight = copy.deepcopy(tiny)
    opt = ZOSGD(straight.parameters(), lr=1e-3, eps=1e-3, seed=3, weight_decay=0.01, **kwargs)
    run(straight, opt, batches[:2])
    save_full(tmp_path / "full.pt", straight.parameters(), opt)
    run(straight, opt, batches[2:5])
    save_log(tmp_path / "log.pt", opt)
    assert len(opt.log) == 3
    assert (tmp_path / "log.pt").stat().st_size < 10_000  # seeds and scalars, not weights
    run(straight, opt, batches[5:])

    resumed = build_model("llama_tiny", seed=99)  # different weights, overwritten by the checkpoint
    opt2 = ZOSGD(resumed.parameters(), lr=1e-3, eps=1e-3, seed=3, weight_decay=0.01, **kwargs)
    torch.load(tmp_path / "full.pt", weights_only=True)
    restore(resumed.parameters(), opt2, tmp_path / "full.pt", tmp_path / "log.pt")
    run(resumed, opt2, batches[5:])
    assert opt2.steps == opt.steps and opt2.draws == opt.draws
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_raise_one_clear_error(tiny):
    params = list(copy.deepcopy(tiny).parameters())
    for eps in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            ZOSGD(params, eps=eps)
    with pytest.raises(ValueError, match="n_queries"):
        ZOSGD(params, n_queries=0)
    with pytest.raises(ValueError, match="momentum"):
        ZOSGD(params, momentum=1.0)
    with pytest.raises(ValueError, match="closure"):
        ZOSGD(params).step()
    with pytest.raises(ValueError, match="n_queries"):
        ZOSGD(params, n_queries=2, query_allocator=lambda sigma2: sigma2)


@pytest.mark.parametrize("bad", ["nan", "inf", "vector"])
def test_invalid_losses_skip_the_update_warn_and_count(tiny, bad):
    model = copy.deepcopy(tiny)
    before = _snapshot(model)
    x = _batch(2)
    opt = ZOSGD(model.parameters(), lr=1.0, eps=1e-3)
    calls = []

    def closure():
        calls.append(1)
        loss = model(x, labels=x).loss
        if bad == "vector":
            return loss.repeat(3)
        # finite at +eps, broken at -eps: the one good evaluation must not leak into the weights
        return loss if len(calls) % 2 else loss * float(bad)

    with pytest.warns(RuntimeWarning, match="skipping this update"):
        assert opt.step(closure) is None
    assert opt.skipped == 1 and opt.steps == 0 and opt.log == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: model(x, labels=x).loss)  # a good step afterwards uses fresh seeds
    assert opt.steps == 1 and opt.draws == 2


# ---- memory ----------------------------------------------------------------------------------------
def test_zo_step_peak_live_bytes_within_5_percent_of_a_forward(tiny):
    model = copy.deepcopy(tiny)
    x = _batch(3, batch=4, length=64)
    closure = lambda: causal_lm_loss(model(x).logits, x)
    opt = ZOSGD(model.parameters(), lr=1e-4, eps=1e-3)
    opt.step(closure)  # warm up lazy allocations
    with torch.no_grad(), track_live_bytes() as forward:
        closure()
    with track_live_bytes() as zo:
        opt.step(closure)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with track_live_bytes() as first_order:
        closure().backward()
        adamw.step()
    print(f"peak live bytes: forward {forward.peak_bytes}, ZO step {zo.peak_bytes}, AdamW {first_order.peak_bytes}")
    assert zo.peak_bytes <= 1.05 * forward.peak_bytes
    assert first_order.peak_bytes > zo.peak_bytes  # contrast: gradients, moments, saved activations


# ---- learning --------------------------------------------------------------------------------------
def _stdlib_bytes(files):
    return torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8).long()


def test_zo_fine_tuning_reduces_validation_loss_on_the_stdlib_corpus():
    # byte-level vocabulary over a slice of the standard library (no tokenizer training needed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, val = _stdlib_bytes(files[:12]), _stdlib_bytes(files[12:15])
    g = torch.Generator().manual_seed(0)

    def batch(data, size, length=48):
        starts = torch.randint(0, len(data) - length, (size,), generator=g)
        return torch.stack([data[s : s + length] for s in starts.tolist()])

    val_batches = [batch(val, 32) for _ in range(2)]
    model = build_model("llama_tiny", vocab_size=256, seed=0)

    def val_loss():
        with torch.no_grad():
            return sum(causal_lm_loss(model(x).logits, x).item() for x in val_batches) / len(val_batches)

    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):  # the "pre-trained checkpoint": 100 AdamW steps
        x = batch(train, 8)
        causal_lm_loss(model(x).logits, x).backward()
        adamw.step()
        adamw.zero_grad()
    pretrained = val_loss()
    zo = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
    for _ in range(100):
        x = batch(train, 16)
        zo.step(lambda x=x: causal_lm_loss(model(x).logits, x))
    finetuned = val_loss()
    print(f"validation loss: pre-trained {pretrained:.4f} -> ZO fine-tuned {finetuned:.4f}")
    assert finetuned < pretrained - 2e-3


# ---- query allocation ------------------------------------------------------------------------------
class PerExampleQuadratics(nn.Module):
    """Example i has loss w_i/2 |theta - a_i|^2; forward(indices) returns the per-example losses."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("anchors", torch.randn(n, dim, generator=g, dtype=torch.float64))
        self.register_buffer("weights", torch.logspace(-2, 1, n, dtype=torch.float64))
        self.theta = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, indices=None):
        indices = torch.arange(len(self.weights)) if indices is None else indices
        diff = self.theta - self.anchors[indices]
        return 0.5 * self.weights[indices] * (diff * diff).sum(-1)


def test_variance_allocator_spends_the_budget_where_gradients_are_large_and_matches_brute_force():
    from scrimp.optim.zeroth_order import VarianceQueryAllocator

    n, dim, lr = 6, 5, 0.1
    model = PerExampleQuadratics(n, dim)
    allocator = VarianceQueryAllocator(budget_per_example=3)
    seen = []

    def closure(indices):
        seen.append(None if indices is None else indices.tolist())
        return model(indices)

    opt = ZOSGD(model.parameters(), lr=lr, eps=1e-3, seed=8, query_allocator=allocator)
    opt.step(closure)
    record = opt.log[-1]
    seeds = [int(s) for s in record["seeds"]]
    # brute force: gradients of each example at theta=0, exact directional derivatives per round
    grads = (model.weights[:, None] * (0 - model.anchors))
    zs = [direction(model.theta, s, 0) for s in seeds]
    pilot_c = grads @ zs[0]
    counts = torch.as_tensor(allocator((pilot_c**2).numpy()))
    assert int(counts.sum()) == 3 * n and int(counts.min()) >= 1
    assert counts[-1] > counts[0]  # the heaviest example (largest gradient) gets more queries
    assert len(seeds) == int(counts.max())
    assert seen[:2] == [None, None] and all(
        set(idx) == set(torch.nonzero(counts > (k // 2 + 1)).flatten().tolist()) for k, idx in enumerate(seen[2:])
    )
    estimate = torch.zeros(dim, dtype=torch.float64)
    for r, z in enumerate(zs):
        active = counts > r
        estimate += z * ((grads[active] @ z) / counts[active]).sum() / n
    assert torch.allclose(model.theta.detach(), -lr * estimate, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("perturbation", ["hook", "inplace"])
def test_frozen_parameters_are_neither_perturbed_nor_updated(perturbation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    model[0].weight.requires_grad_(False)
    frozen, x = model[0].weight.detach().clone(), torch.randn(16, 4, dtype=torch.float64)
    trainable = model[2].weight.detach().clone()
    seen = []
    model[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.detach().clone()))
    opt = ZOSGD(model.parameters(), lr=0.1, eps=1e-2, perturbation=perturbation)
    opt.step(lambda: model(x).pow(2).mean())
    assert torch.equal(model[0].weight, frozen) and all(torch.equal(w, frozen) for w in seen)
    assert not torch.equal(model[2].weight, trainable)  # the trainable ones did move


def test_dropout_masks_are_the_same_for_both_probes():
    # In training mode, f+ and f- must see one network: with equal masks the projected gradient of
    # an eps-perturbation stays O(1) as eps shrinks; with different masks it grows like 1/eps.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 1)).double().train()
    x = torch.randn(64, 8, dtype=torch.float64)
    grads = []
    for eps in (1e-3, 1e-6):
        opt = ZOSGD(model.parameters(), lr=0.0, eps=eps, seed=3)
        torch.manual_seed(1)  # the same masks for both eps, so that only the finite difference changes
        opt.step(lambda: model(x).pow(2).mean())
        grads.append(float(opt.log[-1]["grads"][0]))
    assert grads[1] == pytest.approx(grads[0], rel=1e-2)


def test_step_after_only_skipped_micro_batches_skips_and_moves_on():
    model = nn.Linear(3, 1)
    opt = ZOSGD(model.parameters(), lr=0.1, eps=1e-3)
    before = _snapshot(model)
    with pytest.warns(RuntimeWarning, match="skipping this update"):
        opt.accumulate(lambda: torch.tensor(float("nan")))
    assert opt.step() is None and opt.draws == 1  # the next step gets fresh seeds
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="step\\(\\) needs a closure"):
        opt.step()


def test_restore_checks_both_files_before_writing_anything(tmp_path):
    torch.manual_seed(0)
    saved_model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    save_full(tmp_path / "full.pt", saved_model.parameters(), ZOSGD(saved_model.parameters(), lr=1e-3, eps=1e-3))
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))  # the last layer differs
    before = [p.detach().clone() for p in other.parameters()]
    opt = ZOSGD(other.parameters(), lr=1e-3, eps=1e-3)
    with pytest.raises(ValueError, match="checkpoint parameter 2 has shape"):
        restore(other.parameters(), opt, tmp_path / "full.pt")
    same = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    same_before = [p.detach().clone() for p in same.parameters()]
    torch.save({"not": "a log"}, tmp_path / "log.pt")
    with pytest.raises(ValueError, match="is not a scrimp zeroth-order log"):
        restore(same.parameters(), ZOSGD(same.parameters(), lr=1e-3, eps=1e-3), tmp_path / "full.pt",
                tmp_path / "log.pt")
    for params, originals in ((other.parameters(), before), (same.parameters(), same_before)):
        assert all(torch.equal(p, b) for p, b in zip(params, originals))


def test_query_allocator_with_a_scalar_loss_closure_is_refused_and_the_weights_kept():
    from scrimp.optim.zeroth_order import VarianceQueryAllocator

    model = nn.Linear(4, 1)
    x = torch.randn(16, 4)
    before = [p.detach().clone() for p in model.parameters()]
    opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, query_allocator=VarianceQueryAllocator(2))
    with pytest.raises(ValueError, match="closure must return per-example losses"):
        opt.step(lambda indices=None: model(x).pow(2).mean())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="seed must be an integer, got 'abc'"):
        ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, seed="abc")


# ---- the public seam for drivers (perturbed, evaluate, finite_loss, add_estimate, finish_step) --------
def _linear_and_batch(dtype=torch.float64):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
    return model, torch.randn(7, 5, dtype=dtype)


def _loss_at(model, x, seed, scale):
    """Brute force: the loss with every parameter replaced by theta + scale * z (float64, functional)."""
    moved = {name: p.detach() + scale * direction(p, seed, i) for i, (name, p) in enumerate(model.named_parameters())}
    return torch.func.functional_call(model, moved, (x,)).pow(2).mean()


@pytest.mark.parametrize("mode", ["hook", "inplace"])
def test_perturbed_evaluates_at_theta_plus_scale_z_and_restores(mode):
    model, x = _linear_and_batch()
    before = _snapshot(model)
    opt = ZOSGD(model.parameters(), lr=0.1, eps=1e-3, perturbation=mode)
    with opt.perturbed(seed=9, scale=0.5) as perturbed_indices:
        inside = model(x).pow(2).mean()
    assert perturbed_indices == {0, 1, 2, 3}
    assert torch.allclose(inside, _loss_at(model, x, 9, 0.5), rtol=1e-12, atol=0)
    restored = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert restored if mode == "hook" else all(torch.allclose(a, b, rtol=0, atol=1e-15)
                                               for a, b in zip(before, model.parameters()))


def test_evaluate_returns_both_losses_of_the_two_point_estimate():
    model, x = _linear_and_batch()
    opt = ZOSGD(model.parameters(), lr=0.1, eps=1e-3)
    plus, minus = opt.evaluate(lambda: model(x).pow(2).mean(), seed=4)
    assert plus.dtype == torch.float64 and plus.device.type == "cpu"
    assert torch.allclose(plus, _loss_at(model, x, 4, 1e-3), rtol=1e-12, atol=0)
    assert torch.allclose(minus, _loss_at(model, x, 4, -1e-3), rtol=1e-12, atol=0)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        assert opt.evaluate(lambda: model(x).pow(2).mean() * float("inf"), seed=4) is None
    assert opt.skipped == 1 and opt.draws == 0  # a skip is counted; moving on is finish_step's


@pytest.mark.parametrize("kwargs", [{}, {"n_queries": 2, "momentum": 0.5, "weight_decay": 0.1}])
def test_a_driver_on_the_public_seam_equals_step_bitwise(kwargs):
    # the streamer's sequence without the streamer: estimates from evaluate, the plan applied per parameter
    (stepped, x), (driven, _) = _linear_and_batch(torch.float32), _linear_and_batch(torch.float32)
    reference = ZOSGD(stepped.parameters(), lr=0.1, eps=1e-3, seed=5, **kwargs)
    opt = ZOSGD(driven.parameters(), lr=0.1, eps=1e-3, seed=5, **kwargs)
    for _ in range(3):
        reference.step(lambda: stepped(x).pow(2).mean())
        seeds = opt.query_seeds()
        pairs = [opt.evaluate(lambda: driven(x).pow(2).mean(), seed) for seed in seeds]
        opt.add_estimate([(float(plus) - float(minus)) / (2 * opt.eps) / len(seeds) for plus, minus in pairs])
        plan = opt.finish_step(seeds, apply=False)
        for index, group, param in opt.trainable_params():
            opt.apply_plan(plan, param, index, group)
    assert all(torch.equal(a, b) for a, b in zip(stepped.parameters(), driven.parameters()))
    assert opt.steps == reference.steps == 3 and opt.draws == reference.draws


def test_finish_step_without_an_estimate_moves_to_new_seeds_and_bad_estimates_are_refused():
    model, _ = _linear_and_batch()
    before = _snapshot(model)
    opt = ZOSGD(model.parameters(), lr=0.1, eps=1e-3, n_queries=2)
    seeds = opt.query_seeds()
    assert opt.finish_step(seeds, apply=False) is None and opt.draws == 1 and opt.steps == 0
    assert opt.query_seeds() != seeds
    with pytest.raises(ValueError, match=r"^add_estimate needs one or more projected gradients \(one per query "
                                         r"seed\), got 0$"):
        opt.add_estimate([])
    opt.add_estimate([0.5, -0.25])
    with pytest.raises(ValueError, match=r"^add_estimate needs 2 projected gradients \(one per query seed\), got 1$"):
        opt.add_estimate([1.0])
    with pytest.raises(ValueError, match=r"^finish_step got 1 seeds for 2 projected gradients per estimate"):
        opt.finish_step(opt.query_seeds()[:1])
    assert opt.draws == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.finish_step(opt.query_seeds(), loss=torch.tensor(1.0)) == 1.0  # the estimate was kept
    assert opt.steps == 1 and opt.log[-1]["grads"].tolist() == [0.5, -0.25]
