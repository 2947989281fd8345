"""GaLoreAdamW / FrugalAdamW with fused=True (the Triton kernels) equal fused=False (the torch path).

Residual rules covered: None (GaLore), "sgd" (FRUGAL) and "scaled" (Fira/APOLLO-style, a GaLore group
with ``residual="scaled"``).

20 steps with a projector refresh every 8 steps, on a small MLP whose weights use both projection
sides. On the CPU the kernels run in Triton's interpreter (conftest.py); the `gpu` test repeats the
check compiled on CUDA with a larger model.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import scrimp.optim
from scrimp.optim import FrugalAdamW, GaLoreAdamW

STEPS = 20


def make_model(sizes, seed, device):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(device)


def groups(model, **projection):
    weights = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": weights, **projection}, {"params": others}]


def train(model, optimizer, data, targets, rank=None):
    """Train on the batches; with ``rank``, return the largest subspace sensitivity seen (``sensitivity``)."""
    worst = 0.0
    for x, y in zip(data, targets):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if rank is not None:
            worst = max([worst] + [sensitivity(p.grad, rank) for p in model.parameters() if p.dim() == 2])
        optimizer.step()
    return worst


def sensitivity(G, rank):
    """sigma_1 / (sigma_r - sigma_{r+1}): how much a relative perturbation of G moves its top-r subspace
    (Davis-Kahan / Wedin). Rounding the same step two ways perturbs G and P^T G by about u relative."""
    s = torch.linalg.svdvals(G.detach().double().cpu())
    return float(s[0] / (s[rank - 1] - s[rank]))


def derived_tolerance(worst_sensitivity, sizes):
    """Relative difference two fp32 evaluations of the same run may show after STEPS steps: each step
    rounds its reductions (length up to max(sizes): about u sqrt(max(sizes)) relative), a refresh
    amplifies what reached the gradient by the subspace sensitivity, and the moments carry it on."""
    return STEPS * 2.0**-24 * math.sqrt(max(sizes)) * worst_sensitivity


@pytest.fixture
def forced_triton(monkeypatch, fused):
    """Route the engine's kernel calls to the Triton backend and count them.

    ``backend="auto"`` means the torch path for CPU tensors, so under the interpreter the engine's
    fused=True call is pinned to backend="triton" here; on CUDA this changes nothing.
    """
    calls = {"n": 0}
    # The module the engine's `from . import kernels` will see, even if another test re-imported it.
    kernels_module = importlib.import_module("scrimp.optim.kernels")
    monkeypatch.setattr(scrimp.optim, "kernels", kernels_module, raising=False)
    original = kernels_module.projected_adam_step

    def triton_step(*args, **kwargs):
        calls["n"] += 1
        kwargs["backend"] = "triton"
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels_module, "projected_adam_step", triton_step)
    return calls


def compare_fused_with_torch_path(make_optimizer, sizes, device, calls, fused_flag=True, rank=5):
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, sizes[0], generator=gen).to(device) for _ in range(STEPS)]
    targets = [torch.randn(16, sizes[-1], generator=gen).to(device) for _ in range(STEPS)]
    models, optimizers = [], []
    for fused in (fused_flag, False):
        model = make_model(sizes, seed=0, device=device)
        models.append(model)
        optimizers.append(make_optimizer(model, fused))
        worst = train(model, optimizers[-1], data, targets, rank=rank)
    tol = derived_tolerance(worst, sizes)
    n_weights = sum(p.dim() == 2 for p in models[0].parameters())
    assert calls["n"] == STEPS * n_weights, "the engine did not route every projected step to the kernels"
    for (name, p_fused), p_torch in zip(models[0].named_parameters(), models[1].parameters()):
        delta = (p_fused - p_torch).double().norm() / p_torch.double().norm()
        assert torch.isfinite(p_fused).all() and delta < tol, f"{name}: relative difference {float(delta):.2e}"
    for p_fused, p_torch in zip(models[0].parameters(), models[1].parameters()):
        s_fused, s_torch = optimizers[0].state[p_fused], optimizers[1].state[p_torch]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s_torch:
                delta = (s_fused[key] - s_torch[key]).double().norm() / s_torch[key].double().norm()
                assert delta < tol, f"{key}: relative difference {float(delta):.2e} (derived limit {tol:.1e})"


def make_galore(model, fused):
    # fused is True (pinned to the kernels) or None (auto: the kernels on CUDA, the torch path on CPU).
    return GaLoreAdamW(groups(model, rank=5, update_proj_gap=8, scale=0.25), lr=1e-2, weight_decay=0.01,
                       fused=fused)


def make_frugal(model, fused):
    # Dense SVD projector (the kernels' case) with FRUGAL's SGD residual; "sgd" rather than
    # "sign_sgd" so that an fp32 rounding near a zero residual cannot flip a step's sign.
    return FrugalAdamW(groups(model, rank=5), lr=1e-2, weight_decay=0.01, update_gap=8, proj_type="svd",
                       inactive_update_rule="sgd", fused=fused)


def make_scaled(model, fused):
    # GaLore's SVD projector with the Fira/APOLLO-style norm-ratio residual ("scaled"), which
    # FrugalAdamW's names do not expose: a group key of the engine. residual_lr_scale != 1 checks
    # that the engine passes it through to the kernels as well.
    return GaLoreAdamW(groups(model, rank=5, update_proj_gap=8, scale=0.25, residual="scaled", residual_lr_scale=0.5),
                       lr=1e-2, weight_decay=0.01, fused=fused)


def test_galore_fused_equals_torch_path_over_20_steps(device, forced_triton):
    compare_fused_with_torch_path(make_galore, (37, 53, 29), device, forced_triton)


def test_frugal_fused_equals_torch_path_over_20_steps(device, forced_triton):
    compare_fused_with_torch_path(make_frugal, (37, 53, 29), device, forced_triton)


def test_scaled_residual_fused_equals_torch_path_over_20_steps(device, forced_triton):
    compare_fused_with_torch_path(make_scaled, (37, 53, 29), device, forced_triton)


@pytest.mark.gpu
def test_galore_uses_kernels_by_default_on_cuda_and_equals_torch_path(forced_triton):
    # fused=None (the default): the call counter proves the engine chose the kernels by itself.
    compare_fused_with_torch_path(make_galore, (256, 700, 300), "cuda", forced_triton, fused_flag=None)


@pytest.mark.gpu
def test_frugal_fused_equals_torch_path_on_cuda(forced_triton):
    compare_fused_with_torch_path(make_frugal, (256, 700, 300), "cuda", forced_triton)


@pytest.mark.gpu
def test_scaled_residual_fused_equals_torch_path_on_cuda(forced_triton):
    compare_fused_with_torch_path(make_scaled, (256, 700, 300), "cuda", forced_triton)
