"""The authors' code for teacher-forced parity tests, imported from a local clone named by an env var.

    FRUGAL_SRC=/path/to/FRUGAL                        (github.com/philipzmushko/FRUGAL)
    NATURAL_GALORE_SRC=/path/to/Natural-GaLore/code   (github.com/selfsupervised-ai/Natural-GaLore)

Nothing is downloaded: without the variable the test is skipped. Each package is set up by hand
(an empty module whose ``__path__`` is the clone's folder), so its ``__init__`` does not run (FRUGAL's
needs transformers) and an installed namesake cannot answer instead (PyPI's ``frugal`` is a Thrift
library). Optional imports the authors' modules need only for code these tests never call are
stubbed when absent. Every module loaded this way is dropped afterwards and the earlier ones restored.
"""

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

# package -> (env var naming the folder that holds it, where to get it)
AUTHORS_SOURCES = {
    "frugal": ("FRUGAL_SRC", "a clone of github.com/philipzmushko/FRUGAL"),
    "natural_galore": ("NATURAL_GALORE_SRC", "the code/ folder of a clone of github.com/selfsupervised-ai/Natural-GaLore"),
}


def tensorly_stub() -> dict[str, types.ModuleType]:
    """tensorly, which only Natural GaLore's Tucker projection uses (never called here)."""
    tensorly = types.ModuleType("tensorly")
    tensorly.set_backend = lambda backend: None
    tensorly.decomposition = types.ModuleType("tensorly.decomposition")
    tensorly.decomposition.tucker = None
    tensorly.tenalg = types.ModuleType("tensorly.tenalg")
    return {"tensorly": tensorly, "tensorly.decomposition": tensorly.decomposition, "tensorly.tenalg": tensorly.tenalg}


OPTIONAL_STUBS = {"tensorly": tensorly_stub}


def _owned(name: str, roots: set[str]) -> bool:
    return name.split(".")[0] in roots


@pytest.fixture
def authors_code():
    """``load("frugal.lion")`` -> the authors' module from the clone at ``$FRUGAL_SRC`` (skips without it);
    the first component names the package (``AUTHORS_SOURCES``)."""
    roots = {*AUTHORS_SOURCES, *OPTIONAL_STUBS}
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if _owned(m, roots)}

    def load(module: str) -> types.ModuleType:
        package, _, rest = module.partition(".")
        if package not in AUTHORS_SOURCES:
            raise ValueError(f"module must start with one of {tuple(AUTHORS_SOURCES)}, got {module!r}")
        env, where = AUTHORS_SOURCES[package]
        root = Path(os.environ.get(env, "/nonexistent")) / package
        if not (root / (rest.replace(".", "/") + ".py")).is_file():
            pytest.skip(f"set {env} to {where} to compare with the authors' code")
        if package not in sys.modules:
            shell = types.ModuleType(package)
            shell.__path__ = [str(root)]
            sys.modules[package] = shell
        for name, stub in OPTIONAL_STUBS.items():
            if name not in sys.modules and importlib.util.find_spec(name) is None:
                sys.modules.update(stub())
        return importlib.import_module(module)

    yield load
    for m in [m for m in sys.modules if _owned(m, roots)]:
        del sys.modules[m]
    sys.modules.update(saved)


# -- FRUGAL in float64, for the configurations whose state-full rule is not Adam ----------------------

def used_subspace(opt, p) -> tuple[str, torch.Tensor]:
    """The subspace ``opt`` stepped ``p`` in at its last step, in float64 or int64: ("left" | "right", P)
    for a dense basis, ("flat", index) for randk's entries."""
    state = opt.state[p]
    if "proj_P" in state:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        return opt.projector(p, group).side, state["proj_P"].double().clone()
    return "flat", state["proj_index"].long().clone()


def subspace_maps(side: str, basis: torch.Tensor, shape: tuple[int, int]):
    """FRUGAL's project_down / project_up for one basis (GaLoreProjector with P^T, CoordinateProjector randk)."""
    if side == "left":
        return (lambda G: basis.t() @ G), (lambda R: basis @ R)
    if side == "right":
        return (lambda G: G @ basis), (lambda R: R @ basis.t())

    def up(R):
        return torch.zeros(shape[0] * shape[1], dtype=R.dtype).index_put((basis,), R).reshape(shape)

    return (lambda G: G.reshape(-1)[basis]), up


def check_refreshes(subspaces, grads, gap: int) -> None:
    """The subspace changes exactly at FRUGAL's refreshes (0-based steps 0, gap, 2 gap, ...), and a dense
    one spans the top singular vectors of that step's gradient (GaLore's SVD, float64)."""
    changed = [t for t in range(1, len(subspaces)) if not torch.equal(subspaces[t][1], subspaces[t - 1][1])]
    assert changed == list(range(gap, len(subspaces), gap)), f"refreshed at steps {changed}, FRUGAL refreshes every {gap}"
    for t in range(0, len(subspaces), gap):
        side, P = subspaces[t]
        if side == "flat":
            assert P.unique().numel() == P.numel()
            continue
        U, _, Vh = torch.linalg.svd(grads[t].double(), full_matrices=False)
        top = U[:, :P.shape[1]] if side == "left" else Vh[:P.shape[1]].t()
        torch.testing.assert_close(P @ P.t(), top @ top.t(), rtol=0, atol=1e-4)


def frugal_float64(opt, params, grads, inner, *, lr, wd, pls, ils, gap):
    """Step ``opt`` on ``grads`` (one list per step), then run FRUGAL in float64 on the same gradients and in
    the subspaces the optimizer chose (teacher-forced, after ``check_refreshes``). Returns the float64 weights
    and the smallest nonzero |residual| entry whose sign the state-free part took.

    The step is the authors' (Zmushko et al., 2025, arXiv:2411.07837, Alg. 1; ``ProjOptimizer.step`` and
    ``_proj_params_update`` of ``frugal/proj_optimizer_templates.py``) with ``reset_statistics=True`` and
    ``inactive_update_rule="sign_sgd"``: at a refresh the rule's state restarts (``inner.reset(R)``), then
    W <- W (1 - lr wd) - lr pls up(N) - lr pls ils sign(G - up(R)), N = ``inner.step(R, state)``.
    """
    weights = [p.detach().double().clone() for p in params]
    subspaces = [[] for _ in params]
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for record, p in zip(subspaces, params):
            record.append(used_subspace(opt, p))
    closest = float("inf")
    for i, W in enumerate(weights):
        steps = [gs[i].double() for gs in grads]
        check_refreshes(subspaces[i], steps, gap)
        state = None
        for t, (G, (side, basis)) in enumerate(zip(steps, subspaces[i])):
            down, up = subspace_maps(side, basis, tuple(G.shape))
            R = down(G)
            if t % gap == 0:
                state = inner.reset(R)
            residual = G - up(R)
            closest = min(closest, residual[residual != 0].abs().min().item())
            W.mul_(1 - lr * wd).sub_(lr * pls * up(inner.step(R, state)) + lr * pls * ils * residual.sign())
    return weights, closest


def two_weights() -> list[torch.Tensor]:
    """The two weights every FRUGAL comparison here starts from: (12, 20) and (20, 8), seed 0."""
    torch.manual_seed(0)
    return [torch.randn(12, 20), torch.randn(20, 8)]


# The FRUGAL settings of the float64 comparisons: density 0.25, both lr scales off 1, a reset every 3 steps.
FRUGAL_SETTINGS = types.MappingProxyType(dict(wd=0.1, pls=0.5, ils=0.3, gap=3, steps=7))


def frugal_float64_run(cls, inner, *, lr, proj_type, **rule_settings) -> types.SimpleNamespace:
    """``cls`` (a FRUGAL optimizer, ``FRUGAL_SETTINGS``, decoupled decay) stepped on ``two_weights`` with random
    gradients (seed 9), and ``frugal_float64`` with ``inner`` on the same. Returns the settings with ``params``,
    ``grads``, ``opt``, ``expected`` (the float64 weights) and ``closest_residual``."""
    run = types.SimpleNamespace(lr=lr, **FRUGAL_SETTINGS)
    run.params = [torch.nn.Parameter(w) for w in two_weights()]
    run.opt = cls(run.params, lr=lr, weight_decay=run.wd, density=0.25, update_gap=run.gap, proj_type=proj_type,
                  proj_params_lr_scale=run.pls, inactive_lr_scale=run.ils, reset_statistics=True, stagger=False,
                  **rule_settings)
    gen = torch.Generator().manual_seed(9)
    run.grads = [[torch.randn(p.shape, generator=gen) for p in run.params] for _ in range(run.steps)]
    run.expected, run.closest_residual = frugal_float64(run.opt, run.params, run.grads, inner, lr=lr, wd=run.wd,
                                                        pls=run.pls, ils=run.ils, gap=run.gap)
    return run


@pytest.fixture
def frugal_reference():
    """``frugal_float64_run``: drive a FRUGAL optimizer and compute its float64 reference on the same gradients."""
    return frugal_float64_run


# -- teacher-forced: ours and the authors' optimizer on the same gradients -----------------------------

def twin_params() -> tuple[list[torch.Tensor], list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """``two_weights`` and two separate parameter copies of them: (start, ours, theirs)."""
    start = two_weights()
    return start, [torch.nn.Parameter(w.clone()) for w in start], [torch.nn.Parameter(w.clone()) for w in start]


def step_both(opt, ours, ref, theirs, steps: int = 7, seed: int = 5) -> None:
    """Give ``ours`` and ``theirs`` the same random gradients (``seed``) and step both optimizers, ``steps`` times."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        gs = [torch.randn(p.shape, generator=gen) for p in ours]
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()


@pytest.fixture
def twins():
    """(``twin_params``, ``step_both``) for the engine-against-the-authors tests."""
    return twin_params, step_both
