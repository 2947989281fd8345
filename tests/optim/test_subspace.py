"""The composable engine: composition, resume across a refresh, state-dict contents, bad input."""

import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scrimp.optim import FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, SubspaceAdamW
from scrimp.optim.projection import KINDS, PROJECTORS


def galore_float64_reference(W0, grads, *, rank, gap, lr, scale, betas=(0.9, 0.999), eps=1e-6):
    """GaLore (Zhao et al., 2024, Alg. 1) written out in float64 for a single (m, n) weight, m < n."""
    W = W0.double().clone()
    b1, b2 = betas
    m = v = P = None
    for t, G in enumerate(grads):
        G = G.double()
        if t % gap == 0:
            P = torch.linalg.svd(G, full_matrices=False)[0][:, :rank]
        R = P.t() @ G
        m = (1 - b1) * R if m is None else b1 * m + (1 - b1) * R
        v = (1 - b2) * R * R if v is None else b2 * v + (1 - b2) * R * R
        step = t + 1
        N = m / (v.sqrt() + eps) * math.sqrt(1 - b2**step) / (1 - b1**step)
        W -= lr * scale * (P @ N)
    return W


def test_residual_none_equals_galore_reference():
    torch.manual_seed(0)
    # a gradient stream with a clear spectral gap so the top-r subspace is well defined
    U, V = torch.linalg.qr(torch.randn(10, 10)).Q, torch.linalg.qr(torch.randn(16, 16)).Q
    grads = [U[:, :6] @ torch.diag(torch.tensor([8.0, 6, 4, 1, 0.5, 0.2]) * (1 + 0.1 * t)) @ V[:, :6].t()
             + 0.01 * torch.randn(10, 16) for t in range(12)]
    W = torch.nn.Parameter(torch.randn(10, 16))
    expect = galore_float64_reference(W.detach(), grads, rank=3, gap=5, lr=1e-2, scale=0.5)
    opt = SubspaceAdamW([{"params": [W], "rank": 3}], lr=1e-2, update_proj_gap=5, scale=0.5, stagger=False,
                        projector="svd", residual=None)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    torch.testing.assert_close(W.detach().double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projector", [p for p in PROJECTORS if p not in ("blocks",)])
@pytest.mark.parametrize("residual", [None, "sign_sgd", "sgd", "scaled"])
def test_every_projector_and_residual_reduces_a_regression_loss(projector, residual):
    if residual is not None and not KINDS[projector].orthonormal:
        # G - P P^T G is the complement of the subspace only for an orthonormal P: refused, not trained
        with pytest.raises(ValueError, match=rf"residual={residual!r}.*not orthonormal"):
            SubspaceAdamW([{"params": [torch.nn.Parameter(torch.zeros(16, 12))], "rank": 6}], projector=projector,
                          residual=residual)
        return
    torch.manual_seed(0)
    X = torch.randn(96, 16)
    Y = X @ torch.randn(16, 12) * 0.3
    W = torch.nn.Parameter(torch.zeros(16, 12))
    group = {"params": [W], "rank": 0 if projector == "none" else 6}
    if projector in ("full",):
        group = {"params": [W], "density": 1.0}
    opt = SubspaceAdamW([group], lr=5e-2, update_proj_gap=4, projector=projector, residual=residual,
                        residual_lr_scale=0.2 if residual == "sign_sgd" else 1.0, allow_empty_subspace=True)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = ((X @ W - Y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if projector == "none" and residual is None:
        assert losses[-1] == losses[0]  # no state and no rule: nothing moves
    else:
        assert losses[-1] < 0.7 * losses[0], losses


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10),
                               torch.nn.ReLU(), torch.nn.Linear(10, 3))


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


OPTIMIZERS = {
    "galore-svd": lambda groups: GaLoreAdamW(groups, lr=1e-2, update_proj_gap=4),
    "galore-rsvd": lambda groups: GaLoreAdamW(groups, lr=1e-2, update_proj_gap=4, projector="rsvd"),
    "galore-gram": lambda groups: GaLoreAdamW(groups, lr=1e-2, update_proj_gap=4, projector="gram"),
    "galore-random": lambda groups: GaLoreAdamW(groups, lr=1e-2, update_proj_gap=4, projector="random"),
    "galore-8bit": lambda groups: GaLoreAdamW8bit(groups, lr=1e-2, update_proj_gap=4),
    "frugal-randk": lambda groups: FrugalAdamW(groups, lr=1e-2, update_gap=4, proj_type="randk"),
    "frugal-blocks": lambda groups: FrugalAdamW(groups, lr=1e-2, update_gap=4, proj_type="blocks"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_across_refresh_is_bit_identical_and_loads_weights_only(name, tmp_path):
    def groups(model):
        key = "density" if name.startswith("frugal") else "rank"
        value = 0.5 if key == "density" else 4
        return [{"params": [model[0].weight, model[2].weight], key: value},
                {"params": [model[0].bias, model[2].bias, model[4].weight, model[4].bias]}]

    def make_model():
        if name == "galore-8bit":  # wide enough that the moments are really quantized (>= 4096 entries)
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(12, 400), torch.nn.ReLU(), torch.nn.Linear(400, 10),
                                       torch.nn.ReLU(), torch.nn.Linear(10, 3))
        return _model()

    reference = make_model()
    opt = OPTIMIZERS[name](groups(reference))
    _train(reference, opt, 11)  # refreshes at steps 0, 4, 8 (+ staggered offsets)

    resumed = make_model()
    first = OPTIMIZERS[name](groups(resumed))
    _train(resumed, first, 6)
    path = tmp_path / "opt.pt"
    torch.save({"opt": first.state_dict(), "model": resumed.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    model2 = make_model()
    model2.load_state_dict(blob["model"])
    second = OPTIMIZERS[name](groups(model2))
    second.load_state_dict(blob["opt"])
    _train(model2, second, 5, start=6)
    for a, b in zip(model2.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_state_dict_holds_only_tensors_numbers_and_strings():
    model = _model()
    opt = GaLoreAdamW([{"params": [model[0].weight], "rank": 3, "projector": "random"},
                       {"params": [model[0].bias]}])
    _train(model, opt, 2)

    def check(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, (str, int))
                check(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                check(v)
        else:
            assert value is None or isinstance(value, (torch.Tensor, int, float, str, bool)), type(value)

    sd = opt.state_dict()
    check(sd)
    state = sd["state"][0]
    assert "proj_P" not in state and isinstance(state["proj_seed"], int)  # random projector: the seed only


def test_fused_off_or_auto_on_cpu_never_imports_kernels():
    sys.modules.pop("scrimp.optim.kernels", None)
    model = _model()
    for fused in (None, False):
        _train(model, GaLoreAdamW([{"params": [model[0].weight], "rank": 3}], fused=fused), 2)
    assert "scrimp.optim.kernels" not in sys.modules


BAD_INPUTS = [
    (lambda W, b: GaLoreAdamW([{"params": [W], "rank": 8}]), r"rank must be below min\(m, n\) = 8"),
    (lambda W, b: GaLoreAdamW([{"params": [W], "rank": 12}]), r"rank must be below min\(m, n\) = 8"),
    (lambda W, b: GaLoreAdamW([{"params": [W], "rank": 2, "proj_type": "diag"}]), "proj_type must be one of"),
    (lambda W, b: FrugalAdamW([{"params": [W]}], proj_type="diag", density=0.5), "proj_type must be one of"),
    (lambda W, b: FrugalAdamW([{"params": [W], "density": 0.0}]), r"density must be in \(0, 1\]"),
    (lambda W, b: FrugalAdamW([{"params": [W], "density": 1.5}]), r"density must be in \(0, 1\]"),
    (lambda W, b: GaLoreAdamW([{"params": [b], "rank": 2}]), "projection needs 2-D parameters"),
    (lambda W, b: FrugalAdamW([{"params": [b], "density": 0.5}]), "projection needs 2-D parameters"),
    (lambda W, b: GaLoreAdamW([W], lr=-1e-3), "lr must be a finite number >= 0"),
    (lambda W, b: FrugalAdamW([{"params": [W], "density": 0.5}], lr=-1.0), "lr must be a finite number >= 0"),
    (lambda W, b: FrugalAdamW([{"params": [W], "density": 0.5}], inactive_update_rule="adam"),
     "inactive_update_rule must be one of"),
    (lambda W, b: SubspaceAdamW([{"params": [W], "rank": 2}], projector="qr"), "projector must be one of"),
    (lambda W, b: GaLoreAdamW([W], lr=float("nan")), "lr must be a finite number >= 0"),
    (lambda W, b: GaLoreAdamW([W], eps="1e-8"), "eps must be a finite number >= 0"),
    (lambda W, b: GaLoreAdamW([W], weight_decay=None), "weight_decay must be a finite number >= 0"),
    (lambda W, b: GaLoreAdamW([W], betas=("0.9", 0.999)), r"betas must be two numbers in \[0, 1\)"),
    (lambda W, b: GaLoreAdamW([{"params": [W], "rank": 2, "scale": -0.25}]), "scale must be a finite number >= 0"),
    (lambda W, b: GaLoreAdamW([{"params": [W], "rank": 2, "stagger": "no"}]), "stagger must be True or False"),
    (lambda W, b: SubspaceAdamW([{"params": [W], "rank": 2, "power_iters": -1}], projector="rsvd"),
     "power_iters must be an integer >= 0"),
    (lambda W, b: FrugalAdamW([{"params": [W], "density": 0.5, "update_proj_gap": 5}]),
     r"FrugalAdamW groups take FRUGAL's names: use \['update_gap'\] instead of \['update_proj_gap'\]"),
    (lambda W, b: FrugalAdamW([{"params": [W], "rank": 16}], proj_type="columns"),
     "rank must be below the number of columns projector 'randperm' selects from = 12"),
]


@pytest.mark.parametrize("make,message", BAD_INPUTS)
def test_bad_input_raises_one_clear_sentence_before_any_step(make, message):
    W = torch.nn.Parameter(torch.randn(8, 12))
    b = torch.nn.Parameter(torch.randn(12))
    before = W.detach().clone()
    with pytest.raises(ValueError, match=message):
        make(W, b)
    assert torch.equal(W, before)


def test_bf16_weights_keep_fp32_state_and_follow_the_fp32_run():
    torch.manual_seed(0)
    W32 = torch.nn.Parameter(torch.randn(16, 24))
    W16 = torch.nn.Parameter(W32.detach().to(torch.bfloat16))
    o32 = GaLoreAdamW([{"params": [W32], "rank": 4}], lr=1e-2)
    o16 = GaLoreAdamW([{"params": [W16], "rank": 4}], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        G = torch.randn(16, 24, generator=g)
        W32.grad, W16.grad = G.clone(), G.to(torch.bfloat16)
        o32.step()
        o16.step()
    state = o16.state[W16]
    assert W16.dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.float32
    assert state["proj_P"].dtype == torch.float32
    torch.testing.assert_close(W16.float(), W32.detach(), atol=3e-2, rtol=0)


def test_fused_true_on_cpu_matches_the_torch_path():
    pytest.importorskip("scrimp.optim.kernels")
    models = [_model(), _model()]
    opts = [GaLoreAdamW([{"params": [m[0].weight, m[2].weight], "rank": 3}, {"params": [m[4].weight]}],
                        lr=1e-2, fused=fused) for m, fused in zip(models, (True, False))]
    for m, o in zip(models, opts):
        _train(m, o, 4)
    for a, b in zip(*[m.parameters() for m in models]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class HostToDeviceCopies(TorchDispatchMode):
    """Records ops that take a CPU tensor (not a 0-d scalar) and return a meta one: a host-to-device copy."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = tree_leaves((args, kwargs))  # foreach and fused ops take lists of tensors
        from_host = any(torch.is_tensor(a) and a.device.type == "cpu" and a.dim() > 0 for a in inputs)
        if from_host and any(torch.is_tensor(o) and o.device.type == "meta" for o in tree_leaves(out)):
            self.copies.append(str(func))
        return out


def move_to_meta(opt):
    """Swap every parameter and state tensor of ``opt`` for a meta tensor of the same shape and dtype."""
    swapped = {}
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            swapped[p] = group["params"][i] = torch.nn.Parameter(p.detach().to("meta"))
    for p, q in swapped.items():
        if p in opt.state:
            opt.state[q] = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in opt.state.pop(p).items()}
    return list(swapped.values())


@pytest.mark.parametrize("projector", ["svd", "random", "randperm", "rows", "columns", "randk"])
@pytest.mark.parametrize("residual", [None, "sign_sgd", "scaled"])
def test_steps_between_refreshes_never_wait_on_the_host(projector, residual):
    # A host read (.item(), float()) of a CUDA tensor, or a host-to-device copy from pageable
    # memory, makes the step wait for the GPU. On the meta device the first raises and the second
    # shows up as a CPU -> meta op, so one step there proves neither happens between refreshes.
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.randn(20, 12)),
          torch.nn.Parameter(torch.randn(7))]
    # check_finite=False: the guard's one host read per step is deliberate (tests/optim/test_finite_guard.py);
    # this test is about the update itself.
    opt = SubspaceAdamW([{"params": ps[:2], "rank": 3}, {"params": ps[2:]}], lr=1e-2, projector=projector,
                        update_proj_gap=100, residual=residual, weight_decay=0.1, check_finite=False)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # the refresh: an SVD may read back to the host here, once per gap
    for p in move_to_meta(opt):
        p.grad = torch.empty_like(p)
    with HostToDeviceCopies() as seen:
        opt.step()
    assert seen.copies == []


def relative_update_error(W, start, expect):
    return ((W.detach() - start) - (expect - start)).norm().item() / (expect - start).norm().item()


def test_fp64_weights_are_not_rounded_through_fp32():
    # Moments and projector stay fp32, so each update is fp32-accurate; W itself must stay fp64. With
    # lr 1e-6 the update per step (~2.5e-7) is a few fp32 ulps of |W| ~ 1, so rounding W through fp32
    # at each step would be a ~10% error on the update.
    torch.manual_seed(0)
    U, V = torch.linalg.qr(torch.randn(10, 10)).Q, torch.linalg.qr(torch.randn(16, 16)).Q
    grads = [U[:, :6] @ torch.diag(torch.tensor([8.0, 6, 4, 1, 0.5, 0.2])) @ V[:, :6].t() + 0.01 * torch.randn(10, 16)
             for _ in range(6)]
    W = torch.nn.Parameter(torch.randn(10, 16, dtype=torch.float64))
    start = W.detach().clone()
    expect = galore_float64_reference(start, grads, rank=3, gap=100, lr=1e-6, scale=0.25)
    opt = SubspaceAdamW([{"params": [W], "rank": 3}], lr=1e-6, update_proj_gap=100, scale=0.25, stagger=False,
                        projector="svd")
    for G in grads:
        W.grad = G.double()
        opt.step()
    assert W.dtype == torch.float64 and relative_update_error(W, start, expect) < 1e-3


@pytest.mark.parametrize("projector", ["rows", "randk", None])
def test_fp64_weights_follow_torch_adamw_in_fp64(projector):
    # Coordinate projectors update their selected rows/entries with Adam and leave the rest (no
    # residual, no decay); a plain group is Adam everywhere. torch's AdamW in fp64 is the reference.
    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(10, 16, dtype=torch.float64))
    start = W.detach().clone()
    group = {"params": [W]} if projector is None else {"params": [W], "rank": 3, "projector": projector}
    # eps 1e-12: galore-torch's eps placement (which we follow) and torch's agree when eps is negligible
    opt = SubspaceAdamW([group], lr=1e-6, scale=1.0, update_proj_gap=100, eps=1e-12)
    grads = [torch.randn(10, 16, dtype=torch.float64) for _ in range(6)]
    W.grad = grads[0]
    opt.step()
    index = opt.state[W]["proj_index"].long() if projector else torch.arange(10)
    view = (lambda t: t.reshape(-1)) if projector == "randk" else (lambda t: t)
    ref = torch.nn.Parameter(view(start)[index].clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-6, weight_decay=0.0, eps=1e-12)
    ref.grad = view(grads[0])[index].clone()
    ref_opt.step()
    for G in grads[1:]:
        W.grad, ref.grad = G, view(G)[index].clone()
        opt.step()
        ref_opt.step()
    moved = view(W.detach())[index]
    assert relative_update_error(moved, view(start)[index], ref.detach()) < 1e-3
    untouched = torch.ones(view(start).shape[0], dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(view(W.detach())[untouched], view(start)[untouched])


@pytest.mark.parametrize("make,message", [
    (lambda: SubspaceAdamW([torch.nn.Parameter(torch.randn(4, 3))], eps=0.0), "eps must be a finite number > 0"),
    (lambda: SubspaceAdamW([torch.ones(4, 3, dtype=torch.int64)]), "params must be real floating point"),
    (lambda: SubspaceAdamW([torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))]),
     "params must be real floating point"),
    (lambda: SubspaceAdamW([torch.nn.Parameter(torch.randn(4, 3))], eps_style="keras"), "eps_style must be one of"),
])
def test_settings_that_would_write_nan_or_garbage_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_load_state_dict_validates_the_groups_before_replacing_them():
    W = torch.nn.Parameter(torch.randn(8, 6))
    opt = SubspaceAdamW([{"params": [W], "rank": 2}], lr=1e-2)
    W.grad = torch.randn(8, 6)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1e-2  # the optimizer is as it was
    old = opt.state_dict()  # a state dict from before eps_style and block_order existed
    for key in ("eps_style", "block_order"):
        old["param_groups"][0].pop(key)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["eps_style"] == "hf" and opt.param_groups[0]["block_order"] == "ascending"


def test_fused_true_on_a_cpu_parameter_is_refused_before_any_state_changes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    W = torch.nn.Parameter(torch.randn(8, 6))
    opt = SubspaceAdamW([{"params": [W], "rank": 2}], fused=True)
    W.grad = torch.randn(8, 6)
    with pytest.raises(ValueError, match="fused=True runs the Triton kernels, which need CUDA parameters"):
        opt.step()
    assert opt.state[W] == {}


def test_param_group_typos_and_sparse_gradients_are_refused_before_any_step():
    W = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="unknown param-group key 'rnak'; did you mean 'rank'"):
        GaLoreAdamW([{"params": [W], "rnak": 2}])
    with pytest.raises(ValueError, match="seed must be an integer"):
        GaLoreAdamW([{"params": [W], "rank": 2}], seed="abc")
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SubspaceAdamW([{"params": [W], "rank": 2}, {"params": emb.parameters()}])
    W.grad = torch.randn(8, 6)
    emb(torch.tensor([1, 2])).sum().backward()
    before = W.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(W, before) and opt.state[W] == {}  # the projected group did not step first


def test_keys_that_are_not_typos_pass_through_param_groups():
    W = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([{"params": [W], "rank": 2, "lr_scale": 0.5, "name": "attn", "weight_decay_mult": 0.0}])
    assert opt.param_groups[0]["lr_scale"] == 0.5
