"""Projectors: bases against torch/float64 SVD, seeds, side rule, SVD failure fallbacks."""

import math

import pytest
import torch

from scrimp.optim import GaLoreAdamW, projection
from scrimp.optim.projection import Projector, choose_side


def span_projector(P):
    return P @ P.t()


def low_rank_matrix(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor([10.0 / (i + 1) for i in range(r)])
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return (U * s) @ V.t() + 1e-3 * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("side", ["left", "right"])
def test_svd_gram_and_rsvd_span_the_top_singular_space(side):
    G = low_rank_matrix(20, 30, 4)
    U, _, Vh = torch.linalg.svd(G.double())
    ref = U[:, :4] if side == "left" else Vh[:4].t()
    P = projection.svd_basis(G, 4, side)
    E = projection.eigh_basis(G, 4, side, dtype=torch.float32)
    Q = projection.rsvd_basis(G, 4, side, seed=7, power_iters=2)
    for basis in (P, E, Q):
        torch.testing.assert_close(basis.t().double() @ basis.double(), torch.eye(4, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(span_projector(basis.double()), span_projector(ref), atol=1e-4, rtol=0)


def test_gram_basis_is_as_accurate_as_the_fp32_svd_on_a_decaying_spectrum():
    # Singular values from 1 down to 1e-3 (the r-th near 0.1): the fp32 Gram squares them, so this
    # is where it could lose to the SVD. Measured against a float64 SVD of the same fp32 matrix.
    g = torch.Generator().manual_seed(5)
    m, n, r = 96, 160, 24
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    G = ((U * torch.logspace(0, -3, m, dtype=torch.float64)) @ V.t()).float()
    ref = torch.linalg.svd(G.double(), full_matrices=False).U[:, :r]

    def sin_angle(P):
        cos = torch.linalg.svdvals(ref.t() @ P.double()).min()
        return float((1 - cos**2).clamp(min=0).sqrt())

    svd_err = sin_angle(projection.svd_basis(G, r, "left"))
    gram_err = sin_angle(projection.eigh_basis(G, r, "left", dtype=torch.float32))
    assert gram_err < max(10 * svd_err, 1e-4), (gram_err, svd_err)


def test_gram_basis_signs_do_not_depend_on_the_solver():
    G = low_rank_matrix(20, 30, 4, seed=2)
    a = projection.eigh_basis(G, 4, "left", dtype=torch.float32)
    b = projection.eigh_basis(-G, 4, "left", dtype=torch.float32)  # same Gram, same basis
    flipped = a * torch.tensor([1.0, -1.0, -1.0, 1.0])  # what another solver may return
    oriented = projection.orient_basis(a, None, "canonical")
    assert torch.equal(a, b)
    assert torch.equal(projection.orient_basis(flipped, None, "canonical"), oriented)
    assert ((oriented * projection.sign_reference(20, "cpu")[:, None]).sum(0) >= 0).all()


def test_random_basis_is_orthonormal_and_seeded():
    a = projection.random_basis(16, 5, seed=3, device=torch.device("cpu"))
    b = projection.random_basis(16, 5, seed=3, device=torch.device("cpu"))
    c = projection.random_basis(16, 5, seed=4, device=torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.t() @ a, torch.eye(5), atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_random_basis_on_the_gpu_is_the_cpu_one():
    # The Gaussian is a counter-based draw, so CUDA and the CPU agree up to the last bit of log/cos/sin,
    # and the basis up to the two QRs' rounding.
    cuda = torch.device("cuda")
    torch.testing.assert_close(projection.seeded_gaussian((300, 17), 3, cuda).cpu(),
                               projection.seeded_gaussian((300, 17), 3, "cpu"), rtol=1e-6, atol=1e-6)
    a = projection.random_basis(300, 17, seed=3, device=cuda)
    assert a.device.type == "cuda" and torch.equal(a, projection.random_basis(300, 17, seed=3, device=cuda))
    torch.testing.assert_close(a.cpu(), projection.random_basis(300, 17, seed=3, device=torch.device("cpu")),
                               rtol=0, atol=1e-4)


def test_side_rule_matches_galore():
    # galore-torch: std projects on the right when m >= n, reverse_std the opposite.
    assert choose_side((10, 5), "std") == "right" and choose_side((5, 10), "std") == "left"
    assert choose_side((10, 5), "reverse_std") == "left" and choose_side((5, 10), "reverse_std") == "right"
    assert choose_side((5, 10), "right") == "right" and choose_side((10, 5), "left") == "left"
    with pytest.raises(ValueError, match="proj_type must be one of"):
        choose_side((3, 4), "diagonal")


@pytest.mark.parametrize("kind", ["randperm", "rows", "columns", "randk"])
def test_coordinate_indices_are_distinct_and_in_range(kind):
    for refresh in range(3):
        for side in ("left", "right"):
            idx = projection.coordinate_index(kind, (6, 9), 4, side, seed=1, refresh=refresh,
                                              device=torch.device("cpu"))
            limit = {"randk": 54, "columns": 9, "rows": 6}.get(kind, 6 if side == "left" else 9)
            assert len(set(idx.tolist())) == 4 and int(idx.max()) < limit


def test_rows_window_rotates_through_every_row():
    for side in ("left", "right"):  # the window runs over rows whatever the side rule says
        seen = set()
        for refresh in range(3):
            seen |= set(projection.coordinate_index("rows", (6, 9), 2, side, seed=0, refresh=refresh,
                                                    device=torch.device("cpu")).tolist())
        assert seen == set(range(6))


def test_stagger_spreads_refreshes_and_off_reproduces_original_timing():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 12)) for _ in range(4)]
    for stagger, expected in ((False, [0, 0, 0, 0]), (True, [0, 2, 5, 7])):
        opt = GaLoreAdamW([{"params": weights, "rank": 2, "update_proj_gap": 10}], stagger=stagger)
        offsets = [opt.projector(w, opt.param_groups[0]).offset for w in weights]
        assert offsets == expected
        refresh_steps = {
            i: [t for t in range(1, 30) if opt.projector(w, opt.param_groups[0]).refresh_due({"proj_refresh": 0}, t)]
            for i, w in enumerate(weights)
        }
        if stagger:  # no step after the first recomputes every projector
            all_steps = [t for ts in refresh_steps.values() for t in ts]
            assert max(all_steps.count(t) for t in set(all_steps)) == 1
        else:
            assert all(ts == [10, 20] for ts in refresh_steps.values())


def _run_one_step_with(monkeypatch, svd_behaviour, eigh_behaviour=None):
    projection._warned.clear()
    if svd_behaviour is not None:
        monkeypatch.setattr(torch.linalg, "svd", svd_behaviour)
    if eigh_behaviour is not None:
        monkeypatch.setattr(torch.linalg, "eigh", eigh_behaviour)
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(8, 12))
    opt = GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 2}], lr=0.1, stagger=False)
    G = low_rank_matrix(8, 12, 3, seed=1)
    with pytest.warns(RuntimeWarning) as record:
        for _ in range(5):  # three refreshes: the warning must come once
            W.grad = G.clone()
            opt.step()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert torch.isfinite(W).all()
    return opt.state[W]["proj_P"], G


def test_svd_error_falls_back_to_eigh_with_one_warning(monkeypatch):
    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("svd did not converge")

    P, G = _run_one_step_with(monkeypatch, failing_svd)
    U = torch.linalg.qr(G.double() @ torch.randn(12, 3, dtype=torch.float64)).Q  # same dominant space
    ref = projection.eigh_basis(G, 3, "left").double()
    torch.testing.assert_close(span_projector(P.double()), span_projector(ref), atol=1e-5, rtol=0)
    assert (span_projector(P.double()) - span_projector(U)).abs().max() < 1e-2


def test_nan_svd_and_failed_eigh_keep_weights_finite(monkeypatch):
    def nan_svd(A, full_matrices=False):
        m, n = A.shape
        k = min(m, n)
        nan = torch.full((), float("nan"))
        return torch.full((m, k), nan), torch.full((k,), nan), torch.full((k, n), nan)

    def failing_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("eigh failed")

    P, _ = _run_one_step_with(monkeypatch, nan_svd, failing_eigh)
    assert torch.isfinite(P).all()  # a seeded random projector, then kept at later failed refreshes
    torch.testing.assert_close(P.t() @ P, torch.eye(3), atol=1e-5, rtol=0)


def test_projector_state_holds_only_tensors_and_numbers():
    proj = Projector(kind="svd", shape=(8, 12), rank=3, side="left", gap=5)
    state = {}
    proj.refresh(low_rank_matrix(8, 12, 3), state)
    assert set(state) == {"proj_P", "proj_refresh", "proj_seed"}
    assert isinstance(state["proj_P"], torch.Tensor) and isinstance(state["proj_refresh"], int)


@pytest.mark.parametrize("kind", ["randperm", "rows", "columns", "randk"])
@pytest.mark.parametrize("saved_as", ["missing", "float"])
def test_a_missing_or_float_cast_index_is_redrawn_the_same(kind, saved_as):
    # States saved before rows/columns/randperm kept their index hold only the seed and refresh count;
    # torch.optim.Optimizer.load_state_dict casts every non-"step" tensor to the parameter's dtype.
    proj = Projector(kind, (6, 9), 4, "left", gap=5, seed=2)
    state = {}
    proj.refresh(torch.randn(6, 9), state)
    proj.refresh(torch.randn(6, 9), state)
    kept = state.pop("proj_index")
    if saved_as == "float":
        state["proj_index"] = kept.float()
    redrawn = proj.index(state, torch.device("cpu"))
    assert kept.dtype == redrawn.dtype == torch.int32 and torch.equal(kept, redrawn)
    assert state["proj_index"] is redrawn


def test_randk_index_of_a_matrix_with_2_to_31_entries_is_int64(monkeypatch):
    # Drawing it for real would take a 2^31-entry randperm; the dtype rule is what is checked here.
    monkeypatch.setattr(projection, "coordinate_index", lambda *args, **kwargs: torch.arange(4))
    assert Projector("randk", (1 << 16, 1 << 15), 4, "left", gap=5).index({"proj_refresh": 0}, "cpu").dtype == torch.int64
    assert Projector("randk", (1 << 16, (1 << 15) - 1), 4, "left", gap=5).index({"proj_refresh": 0}, "cpu").dtype == torch.int32


def splitmix_box_muller(count, seed):
    """Pure-Python float64 reference for ``seeded_gaussian``: splitmix64 of the pair index, Box-Muller."""
    mask = (1 << 64) - 1
    out = []
    for i in range(1, (count + 1) // 2 + 1):
        z = (i * 0x9E3779B97F4A7C15 + seed) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        u1, u2 = ((z >> 32) + 0.5) / 2**32, ((z & 0xFFFFFFFF) + 0.5) / 2**32
        out.append((math.sqrt(-2 * math.log(u1)), 2 * math.pi * u2))
    cos = [r * math.cos(a) for r, a in out]
    sin = [r * math.sin(a) for r, a in out]
    return torch.tensor((cos + sin)[:count], dtype=torch.float64)


@pytest.mark.parametrize("shape,seed", [((7, 5), 3), ((40, 13), projection.mix_seed(9, 2)), ((1, 1), 0)])
def test_seeded_gaussian_is_the_counter_based_draw(shape, seed):
    got = projection.seeded_gaussian(shape, seed, "cpu")
    expect = splitmix_box_muller(shape[0] * shape[1], seed).float().reshape(shape)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


def test_seeded_gaussian_is_standard_normal():
    x = projection.seeded_gaussian((500, 400), 11, "cpu").double().flatten()
    # 200k samples: the standard errors of the mean, variance and P(|x| > 2) are about 0.002, 0.003, 0.0005
    assert abs(x.mean()) < 0.01 and abs(x.var() - 1) < 0.015
    assert abs((x.abs() > 2).double().mean() - 0.0455) < 0.003
    assert torch.isfinite(x).all()
