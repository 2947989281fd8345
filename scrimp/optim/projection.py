"""Projectors: which low-dimensional subspace of a 2-D gradient gets optimizer state.

A projector is a small frozen object (its configuration) plus a per-parameter state dict that
holds only tensors and plain numbers, kept inside ``optimizer.state[p]`` under ``proj_*`` keys so
that ``state_dict()`` loads with ``torch.load(weights_only=True)``.

Kinds (``PROJECTORS``):
- ``svd``: top-r singular vectors of the gradient, computed in fp32 (GaLore, Zhao et al., 2024).
- ``gram``: the same top-r singular subspace as ``svd``, from ``eigh`` of the fp32 Gram matrix of the
  projected side (G G^T for left, G^T G for right). On a 2-core CPU it is about 6x faster than
  LAPACK's SVD at LLaMA-1B's 2048 x 5461 (one matrix product plus an r-side eigensolver, no V), and as
  accurate as an fp32 SVD for singular values above about sqrt(eps_fp32) = 3e-4 of the largest;
  below that, squaring the gradient drowns them in rounding (GaLore's low-rank premise makes those
  directions carry almost none of the update). Use it where refresh steps stall the run.
- ``rsvd``: randomized SVD with power iterations (Halko, Martinsson & Tropp, 2011), seeded.
- ``random``: seeded Gaussian made semi-orthogonal by QR; only the seed and refresh count are
  stored and the matrix is regenerated each step (as Flora/FRUGAL's random projections), on the
  parameter's device.
- ``randperm``: a seeded random subset of r rows (left side) or columns (right side).
  Coordinate kinds (this one, ``rows``/``columns`` and ``randk``) keep their int32 indices from
  one refresh to the next (int64 for a matrix of 2^31 entries or more).
- ``rows`` / ``columns``: a contiguous window of r rows / columns that moves cyclically at each
  refresh (deterministic coordinate rotation).
- ``randk``: a seeded random subset of k entries of the matrix (FRUGAL's RandK); drawing them
  is O(mn).
- ``blocks``: whole parameters in rotation (BAdam, Luo et al., 2024): the engine decides which
  parameters are active; handled in ``subspace.py``.
- ``full``: the identity (density 1: plain Adam); ``none``: an empty subspace (rank 0, state-free).

Sides follow GaLore's ``proj_type``: ``std`` projects from the left when m < n and from the right
otherwise (the smaller side gets the projector), ``reverse_std`` the opposite, ``left``/``right`` fixed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from . import functional as F

PROJECTORS = ("svd", "gram", "rsvd", "random", "gaussian", "randperm", "rows", "columns", "randk", "blocks", "full",
              "none")
DENSE = ("svd", "gram", "rsvd", "random")  # the kinds with an orthonormal (dim, r) matrix P
PROJ_TYPES = ("std", "reverse_std", "left", "right")

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def choose_side(shape: tuple[int, int], proj_type: str) -> str:
    """GaLore's side rule: "left" (P is (m, r)) or "right" (P is (n, r)) for an (m, n) matrix."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64-style), for per-parameter, per-refresh RNGs."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def seeded_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


_U64 = (1 << 64) - 1


def _as_int64(constant: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    constant &= _U64
    return constant - (1 << 64) if constant >= (1 << 63) else constant


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed integers)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def seeded_gaussian(shape: tuple[int, int], seed: int, device: torch.device | str) -> Tensor:
    """Standard normal fp32 samples that depend on ``seed`` and ``shape`` only, not on the device.

    torch's generators give different numbers on CPUs and CUDA, and on CUDA even across GPU
    models (the kernel's grid follows the SM count). This is a counter-based draw made with
    torch ops on ``device``: splitmix64 (Steele, Lea & Flood, 2014) of the pair index gives two
    32-bit uniforms, and Box-Muller turns them into two normals. Integer steps are exact on every
    device; products wrap modulo 2^64, which is what the splitmix constants assume. Only the
    float64 log/cos/sin may differ in the last bit between devices.
    """
    count = shape[0] * shape[1]
    pairs = (count + 1) // 2
    index = torch.arange(1, pairs + 1, dtype=torch.int64, device=device)
    z = index * _as_int64(0x9E3779B97F4A7C15) + _as_int64(seed)
    z = (z ^ _shift_right(z, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _as_int64(0x94D049BB133111EB)
    z = z ^ _shift_right(z, 31)
    scale = 2.0**-32
    u1 = (_shift_right(z, 32).to(torch.float64) + 0.5) * scale  # in (0, 1): the log is finite
    u2 = ((z & 0xFFFFFFFF).to(torch.float64) + 0.5) * scale
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * torch.pi) * u2
    normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
    return normals.to(torch.float32).reshape(shape)


def svd_basis(G: Tensor, rank: int, side: str) -> Tensor:
    """Top-``rank`` singular vectors of ``G`` in fp32: U[:, :r] (left) or V[:, :r] (right). May raise."""
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    return U[:, :rank].contiguous() if side == "left" else Vh[:rank].t().contiguous()


def eigh_basis(G: Tensor, rank: int, side: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """Top-``rank`` eigenvectors of G G^T (left) or G^T G (right), computed in ``dtype``, as fp32.

    float64 is the fallback for a failed SVD; float32 is the ``gram`` projector. Signs are the
    solver's: ``orient_basis`` makes them reproducible.
    """
    A = G.to(dtype)
    gram = A @ A.t() if side == "left" else A.t() @ A
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -rank:].flip(-1).float().contiguous()


SIGN_RULES = ("align", "canonical", "solver")
_SIGN_SEED = 0x5C1A9  # one fixed reference direction per dimension, the same on every device and run


def sign_reference(dim: int, device: torch.device | str) -> Tensor:
    """A fixed Gaussian (dim,) direction that decides the signs no previous basis decides."""
    return seeded_gaussian((dim, 1), mix_seed(_SIGN_SEED, dim), device)[:, 0]


def orient_basis(P: Tensor, previous: Tensor | None, rule: str) -> Tensor:
    """``P`` with each column's sign chosen by ``rule``, so that the basis does not depend on the solver.

    A singular vector is defined up to its sign, and LAPACK, cuSOLVER and different BLAS builds or
    thread counts pick different ones for the same matrix, or for matrices that differ by rounding.
    The projection itself does not care (P diag(s) gives the same P P^T), but the moments carried
    across a refresh do: a flipped column flips the meaning of its row of ``exp_avg``, and every
    later update changes. So a run was not reproducible across machines, and the fused and
    unfused paths could disagree (issue 13).

    - ``"canonical"``: column i gets the sign that makes ``<p_i, z> >= 0`` for a fixed seeded
      Gaussian z (``sign_reference``). A random reference (not "largest entry positive" or "entries
      sum to a positive number") because structured rules have structured ties: two entries of
      almost equal magnitude, or a centred vector, are common in gradients, while ``<p_i, z>`` is
      N(0, 1) for any unit p_i. Its sign flips under a perturbation dp only with probability about
      |dp|, i.e. about 1e-6 for a basis perturbed by rounding.
    - ``"align"`` (the default): as ``canonical`` at the first refresh; afterwards column i gets
      the sign of ``<p_i, q_i + z / sqrt(dim)>``, q_i the previous projector's column i. Where the
      new vector overlaps the old one by more than chance (|<p_i, q_i>| above about 1/sqrt(dim)),
      its sign follows the old one, so the kept moments keep their meaning across the refresh
      (galore-torch keeps them with whatever sign the solver gave); where the overlap is at chance
      level the fixed reference decides, as in ``canonical``. It is one linear functional per
      column, so it has no threshold that a perturbation could cross, only the zero set that every
      sign rule has.
    - ``"solver"``: the signs the solver returned, for exact parity with galore-torch on one machine.

    Limits: no sign rule can fix near-tied singular values at the rank boundary (sigma_r close to
    sigma_{r+1}): there the subspace itself changes under rounding, not only a sign.
    """
    if rule == "solver":
        return P
    if rule not in SIGN_RULES:
        raise ValueError(f"sign_rule must be one of {SIGN_RULES}, got {rule!r}")
    reference = sign_reference(P.shape[0], P.device).to(P.dtype)[:, None]
    if rule == "align" and previous is not None and previous.shape == P.shape:
        reference = previous.to(device=P.device, dtype=P.dtype) + reference / math.sqrt(P.shape[0])
    agreement = (P * reference).sum(0)
    return P * torch.where(agreement < 0, -1.0, 1.0).to(P.dtype)


def rsvd_basis(G: Tensor, rank: int, side: str, *, seed: int, power_iters: int = 2, oversample: int = 8) -> Tensor:
    """Randomized range finder with power iterations (Halko et al., 2011, Alg. 4.4), fp32, seeded."""
    A = G.float() if side == "left" else G.float().t()  # find the column space of A
    k = min(rank + oversample, min(A.shape))
    omega = seeded_gaussian((A.shape[1], k), seed, A.device).to(A.dtype)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(A.t() @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    Ub, _, _ = torch.linalg.svd(Q.t() @ A, full_matrices=False)
    return (Q @ Ub[:, :rank]).contiguous()


def random_basis(dim: int, rank: int, *, seed: int, device: torch.device) -> Tensor:
    """A seeded (dim, rank) matrix with orthonormal columns: QR of a Gaussian (sign-fixed, so unique).

    The ``random`` projector stores only its seed and calls this at every step, so the Gaussian and
    the QR are made on ``device``: on a GPU no host work and no copy make the step wait. The
    Gaussian is the same on every device (``seeded_gaussian``), so a checkpoint or a DDP run moves
    between CPUs and GPU models with the same subspace, up to the QR's rounding.
    """
    Q, R = torch.linalg.qr(seeded_gaussian((dim, rank), seed, device))
    diag = torch.diagonal(R)
    return Q * torch.where(diag != 0, torch.sign(diag), 1.0)


def side_dim(shape: tuple[int, int], side: str) -> int:
    """The size of the projected side of an (m, n) weight: m on the left, n on the right."""
    return shape[0] if side == "left" else shape[1]


def coordinate_index(kind: str, shape: tuple[int, int], rank: int, side: str, *, seed: int, refresh: int,
                     device: torch.device) -> Tensor:
    """Sorted int64 indices of the selected rows/columns (or flat entries for ``randk``)."""
    return KINDS[kind].draw_index(shape, rank, side, seed=seed, refresh=refresh).to(device)


def subspace_dim(kind: str, shape: tuple[int, int], side: str) -> int:
    """How many directions a projector of ``kind`` can select from an (m, n) weight.

    Row/column windows select among m rows / n columns; ``randperm``, ``random`` and ``gaussian``
    among the vectors of their side (left: m, right: n); the spectral kinds among the min(m, n)
    singular vectors.
    """
    return KINDS[kind].subspace_dim(shape, side)


def resolve_rank(kind: str, shape: tuple[int, int], side: str, rank: int | None, density: float | None,
                 rounding: str = "round") -> tuple[str, int]:
    """Map (projector kind, rank or density) to the effective kind and subspace size of one weight.

    Density ``d`` selects ``round(d * dim)`` directions (entries for ``randk``), where ``dim`` is the
    size of the projected side (m for left, n for right), as FRUGAL's GaLoreProjector counts; a
    spectral basis holds at most min(m, n) vectors. A full selection becomes ``full`` (plain
    Adam, so FRUGAL with density 1 is AdamW), an empty one ``none``. An explicit ``rank`` is in
    directions; for ``randk`` it means ``rank * max(m, n)`` entries. ``rounding="floor"`` takes
    ``int(d * dim)`` instead, as FRUGAL's coordinate projector does.
    """
    return KINDS[kind].resolve(shape, side, rank, density, round if rounding == "round" else math.floor)


def coordinate_bound(kind: str, shape: tuple[int, int], side: str) -> int:
    """How many coordinates a coordinate projector selects from (entries for randk)."""
    return KINDS[kind].coordinate_bound(shape, side)


# -- what a step does with each kind: small objects, so that the engine never branches on a kind name --
# What ``Projector.schedule`` says about a parameter's subspace at a step:
KEEP = "keep"  # the subspace stays; the moments go on
REFRESH = "refresh"  # a new subspace from this gradient; the moment policy carries the moments across
RESTART = "restart"  # a new block cycle for a still active block: the moments start from zero (FRUGAL)
PAUSE = "pause"  # an inactive block: no moments and a residual-only step
EMPTY = "empty"  # no subspace ever (rank 0): a residual-only step, no state


class DenseKind:
    """A (dim, r) matrix P with orthonormal columns: R = P^T G (left) or G P (right).

    The base of every kind (``matrix`` is each dense kind's own). Its declarations, which the engine reads instead of kind names:
    ``orthonormal`` (P^T P = I, so G - P P^T G is the complement of the subspace and a residual rule
    applies), ``side_shaped_R`` (R is (r, n) on the left and (m, r) on the right, which output rules
    that scale channels need), ``compares_bases`` (two bases have an overlap P_new^T P_old, for
    ``moment_policy="rotate"``), ``stores_matrix`` (the state keeps P under ``proj_P``).
    """

    low_rank = True  # the step can take an accumulated R (layer-wise) and has a refresh schedule
    compares_bases = True
    has_moments = True
    cycles_blocks = False
    orthonormal = True
    side_shaped_R = True
    stores_matrix = False

    def __init__(self, name: str):
        self.name = name

    # -- sizes (from the settings alone) --
    def subspace_dim(self, shape: tuple[int, int], side: str) -> int:
        return side_dim(shape, side)

    def resolve(self, shape: tuple[int, int], side: str, rank: int | None, density: float | None,
                to_size) -> tuple[str, int]:
        """(kind, size) for ``rank`` directions or a ``density`` of the projected side (``resolve_rank``)."""
        size = to_size(density * self.density_dim(shape, side)) if rank is None else rank
        return self._bounded(size, self.subspace_dim(shape, side))

    def density_dim(self, shape: tuple[int, int], side: str) -> int:
        return side_dim(shape, side)

    def _bounded(self, size: int, total: int) -> tuple[str, int]:
        if size >= total:
            return "full", 0
        if size <= 0:
            return "none", 0
        return self.name, int(size)

    # -- settings checks (``subspace.validate_group``) --
    def check_group(self, group: dict) -> None:
        """Refuse settings this kind cannot follow (one ValueError); most kinds take any."""

    def check_rank(self, rank: int, shape: tuple[int, int], side: str) -> None:
        """Refuse a ``rank`` at or above the number of directions this kind selects from."""
        dim = self.subspace_dim(shape, side)
        if rank >= dim:
            what = ("min(m, n)" if dim == min(shape)
                    else f"the number of {self.selected_unit(side)} projector {self.name!r} selects from")
            raise ValueError(f"rank must be below {what} = {dim} for a parameter of shape {tuple(shape)}, got {rank}")

    def selected_unit(self, side: str) -> str:
        return "rows" if side == "left" else "columns"

    # -- the subspace (refresh, matrix) --
    def refresh_(self, proj: Projector, G: Tensor, state: dict, count: int) -> None:
        """Record the ``count``-th subspace from ``G`` in ``state`` (this kind regenerates it from its seed)."""

    def matrix(self, proj: Projector, state: dict, device: torch.device) -> Tensor:
        """The dense (dim, rank) P of the current subspace."""
        raise NotImplementedError(f"{type(self).__name__} must give its matrix")

    def state_shapes(self, proj: Projector) -> dict[str, tuple[tuple[int, ...], int | None, str]]:
        """The projector's own state tensors: key -> (shape, bound of the values or None, why)."""
        return {}

    # -- the step --
    def schedule(self, proj: Projector, state: dict, step: int, block_active) -> str:
        return REFRESH if proj.refresh_due(state, step) else KEEP

    def basis(self, proj: Projector, state: dict, device: torch.device) -> Tensor:
        return self.matrix(proj, state, device)

    def working_grad(self, G: Tensor, P: Tensor) -> Tensor:
        return G if G.dtype == P.dtype else G.to(P.dtype)

    def project(self, proj: Projector, G: Tensor, P: Tensor) -> Tensor:
        return F.project(G, P, proj.side)

    def residual(self, proj: Projector, G: Tensor, R: Tensor, P: Tensor, dtype: torch.dtype) -> Tensor:
        return F.subspace_residual(G, P, proj.side, R=R)

    def write_(self, proj: Projector, W: Tensor, N: Tensor, P: Tensor, hp, residual: Tensor | None) -> None:
        F.write_dense_step_(W, N, P, hp, residual)

    def moment_shape(self, proj: Projector) -> tuple[int, ...]:
        m, n = proj.shape
        return (proj.rank, n) if proj.side == "left" else (m, proj.rank)


class RandomKind(DenseKind):
    """A seeded Gaussian made orthonormal by QR, regenerated at each step from the parameter's seed and
    refresh count (only those are stored; Flora/FRUGAL's random projections)."""

    def matrix(self, proj: Projector, state: dict, device: torch.device) -> Tensor:
        dim = side_dim(proj.shape, proj.side)
        return random_basis(dim, proj.rank, seed=mix_seed(proj.seed, state["proj_refresh"]), device=device)


class SpectralKind(DenseKind):
    """A basis computed from the gradient at each refresh and kept in the state (``proj_P``): svd/gram/rsvd."""

    stores_matrix = True

    def subspace_dim(self, shape: tuple[int, int], side: str) -> int:
        return min(shape)

    def solve(self, proj: Projector, G: Tensor, count: int) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must compute its basis (solve)")

    def refresh_(self, proj: Projector, G: Tensor, state: dict, count: int) -> None:
        P = self._basis_with_fallbacks(proj, G, state, count)
        if P is not None:
            state["proj_P"] = orient_basis(P, state.get("proj_P"), proj.sign_rule)

    def matrix(self, proj: Projector, state: dict, device: torch.device) -> Tensor:
        return state["proj_P"]

    def state_shapes(self, proj: Projector) -> dict[str, tuple[tuple[int, ...], int | None, str]]:
        dim = side_dim(proj.shape, proj.side)
        return {"proj_P": ((dim, proj.rank), None, f"the {proj.side} side's {dim} by rank {proj.rank}")}

    def _basis_with_fallbacks(self, proj: Projector, G: Tensor, state: dict, count: int) -> Tensor | None:
        """``solve``, else eigh of the float64 Gram matrix, else the previous projector (None), else random."""
        try:
            if not torch.isfinite(G).all():
                raise torch.linalg.LinAlgError("non-finite gradient")
            P = self.solve(proj, G, count)
            if torch.isfinite(P).all():
                return P
            raise torch.linalg.LinAlgError("non-finite singular vectors")
        except (RuntimeError, torch.linalg.LinAlgError) as err:
            reason = str(err).splitlines()[0][:120]
        P = _float64_gram_basis(G, proj)
        if P is not None:
            warn_once("svd-fallback", f"{self.name} of a gradient failed ({reason}); using eigh of the "
                                      "Gram matrix instead (warned once)")
            return P
        if "proj_P" in state:
            warn_once("svd-fallback", f"{self.name} of a gradient failed ({reason}); keeping the previous "
                                      "projector (warned once)")
            return None
        warn_once("svd-fallback", f"{self.name} of a gradient failed ({reason}) at the first step; using a "
                                  "seeded random projector until the next refresh (warned once)")
        return random_basis(side_dim(proj.shape, proj.side), proj.rank, seed=mix_seed(proj.seed, count, 1),
                            device=G.device)


def _float64_gram_basis(G: Tensor, proj: Projector) -> Tensor | None:
    """The first fallback of a failed spectral solve: eigh of the float64 Gram matrix (None if that fails too)."""
    try:
        if torch.isfinite(G).all():
            P = eigh_basis(G, proj.rank, proj.side)
            if torch.isfinite(P).all():
                return P.to(G.device)
    except (RuntimeError, torch.linalg.LinAlgError):
        pass
    return None


class SvdKind(SpectralKind):
    """Top-r singular vectors by LAPACK/cuSOLVER's SVD (GaLore)."""

    def solve(self, proj: Projector, G: Tensor, count: int) -> Tensor:
        return svd_basis(G, proj.rank, proj.side)


class GramKind(SpectralKind):
    """Top-r eigenvectors of the fp32 Gram matrix of the projected side."""

    def solve(self, proj: Projector, G: Tensor, count: int) -> Tensor:
        return eigh_basis(G, proj.rank, proj.side, dtype=torch.float32)


class RsvdKind(SpectralKind):
    """Randomized SVD with ``power_iters`` power iterations, seeded per refresh."""

    def solve(self, proj: Projector, G: Tensor, count: int) -> Tensor:
        return rsvd_basis(G, proj.rank, proj.side, seed=mix_seed(proj.seed, count), power_iters=proj.power_iters)


class GaussianKind(DenseKind):
    """APOLLO's seeded N(0, 1/r) projection (``rules.apollo.apollo_projection``), regenerated at each step from
    the parameter's seed and refresh count (``rules.apollo.apollo_seed``). Not orthonormal, so two bases have
    no meaningful overlap (no ``rotate``) and G - P P^T G is not the complement of the subspace (no residual
    rule); its back-projection P P^T G is unbiased (E[P P^T] = I, Flora's sketch), but APOLLO uses it through
    its output rule."""

    compares_bases = False
    orthonormal = False

    def matrix(self, proj: Projector, state: dict, device: torch.device) -> Tensor:
        from .rules.apollo import apollo_projection, apollo_seed

        dim = side_dim(proj.shape, proj.side)
        return apollo_projection(dim, proj.rank, proj.side, apollo_seed(proj.seed, state["proj_refresh"]), device)


class CoordinateKind(DenseKind):
    """Selected coordinates (a 0/1 orthonormal P, never built), drawn at each refresh and kept under
    ``proj_index``: ``randperm``, a seeded random subset of r rows (left side) or columns (right side).

    Drawn once per refresh and kept (counted as projector state): redrawing at every step would cost a
    CPU randperm (O(mn) for randk) and a host-to-device copy, which makes a CUDA step wait.
    """

    compares_bases = False

    def coordinate_dim(self, proj: Projector) -> int | None:
        """0 for row selection, 1 for column selection, None for flat entries."""
        return 0 if proj.side == "left" else 1

    def coordinate_bound(self, shape: tuple[int, int], side: str) -> int:
        return self.subspace_dim(shape, side)

    def draw_index(self, shape: tuple[int, int], rank: int, side: str, *, seed: int, refresh: int) -> Tensor:
        dim = self.subspace_dim(shape, side)
        return torch.randperm(dim, generator=seeded_generator(mix_seed(seed, refresh)))[:rank].sort().values

    def refresh_(self, proj: Projector, G: Tensor, state: dict, count: int) -> None:
        state["proj_index"] = proj.draw_index(count, G.device)

    def matrix(self, proj: Projector, state: dict, device: torch.device) -> Tensor:
        raise ValueError(f"projector {self.name!r} selects coordinates and builds no matrix")

    def state_shapes(self, proj: Projector) -> dict[str, tuple[tuple[int, ...], int | None, str]]:
        bound = self.coordinate_bound(proj.shape, proj.side)
        return {"proj_index": ((proj.rank,), bound, f"{proj.rank} selected coordinates")}

    def basis(self, proj: Projector, state: dict, device: torch.device) -> Tensor:
        return proj.index(state, device)

    def working_grad(self, G: Tensor, index: Tensor) -> Tensor:
        return G

    def project(self, proj: Projector, G: Tensor, index: Tensor) -> Tensor:
        return F.select_coordinates(G, index, self.coordinate_dim(proj))

    def residual(self, proj: Projector, G: Tensor, R: Tensor, index: Tensor, dtype: torch.dtype) -> Tensor:
        return F.coordinate_residual(G, index, self.coordinate_dim(proj), dtype)

    def write_(self, proj: Projector, W: Tensor, N: Tensor, index: Tensor, hp, residual: Tensor | None) -> None:
        F.write_coordinate_step_(W, N, index, self.coordinate_dim(proj), hp, residual)

    def moment_shape(self, proj: Projector) -> tuple[int, ...]:
        m, n = proj.shape
        dim = self.coordinate_dim(proj)
        return (proj.rank,) if dim is None else ((proj.rank, n) if dim == 0 else (m, proj.rank))


class WindowKind(CoordinateKind):
    """A contiguous cyclic window of r rows (``axis=0``) or columns (``axis=1``) that moves by r at each
    refresh (deterministic coordinate rotation). The axis is fixed, whatever the side: R is laid out
    along it, not along the side (``side_shaped_R`` is False)."""

    side_shaped_R = False

    def __init__(self, name: str, axis: int):
        super().__init__(name)
        self.axis = axis

    def coordinate_dim(self, proj: Projector) -> int:
        return self.axis

    def subspace_dim(self, shape: tuple[int, int], side: str) -> int:
        return shape[self.axis]

    def density_dim(self, shape: tuple[int, int], side: str) -> int:
        return shape[self.axis]

    def selected_unit(self, side: str) -> str:
        return self.name

    def draw_index(self, shape: tuple[int, int], rank: int, side: str, *, seed: int, refresh: int) -> Tensor:
        dim = shape[self.axis]
        start = (refresh * rank) % dim
        return ((torch.arange(rank) + start) % dim).sort().values


class RandKKind(CoordinateKind):
    """A seeded random subset of k entries of the matrix (FRUGAL's RandK); drawing them is O(mn). R is flat
    (``side_shaped_R`` is False); an explicit ``rank`` means ``rank * max(m, n)`` entries."""

    side_shaped_R = False

    def coordinate_dim(self, proj: Projector) -> None:
        return None

    def subspace_dim(self, shape: tuple[int, int], side: str) -> int:
        return min(shape)

    def coordinate_bound(self, shape: tuple[int, int], side: str) -> int:
        return shape[0] * shape[1]

    def resolve(self, shape: tuple[int, int], side: str, rank: int | None, density: float | None,
                to_size) -> tuple[str, int]:
        total = shape[0] * shape[1]
        return self._bounded(to_size(density * total) if rank is None else rank * max(shape), total)

    def draw_index(self, shape: tuple[int, int], rank: int, side: str, *, seed: int, refresh: int) -> Tensor:
        total = shape[0] * shape[1]
        return torch.randperm(total, generator=seeded_generator(mix_seed(seed, refresh)))[:rank].sort().values


class FullKind(DenseKind):
    """The identity (density 1, and the parameters of plain groups): R = G, no residual, Adam on the whole matrix."""

    low_rank = False
    compares_bases = False

    def subspace_dim(self, shape: tuple[int, int], side: str) -> int:
        return min(shape)

    def resolve(self, shape: tuple[int, int], side: str, rank: int | None, density: float | None,
                to_size) -> tuple[str, int]:
        return self.name, 0

    def check_rank(self, rank: int, shape: tuple[int, int], side: str) -> None:
        """No bound: the rank does not size this kind's subspace."""

    def matrix(self, proj: Projector, state: dict, device: torch.device) -> Tensor:
        raise ValueError(f"projector {self.name!r} projects nothing and builds no matrix")

    def schedule(self, proj: Projector, state: dict, step: int, block_active) -> str:
        return KEEP

    def basis(self, proj: Projector, state: dict, device: torch.device) -> None:
        return None

    def working_grad(self, G: Tensor, basis: None) -> Tensor:
        return G

    def project(self, proj: Projector, G: Tensor, basis: None) -> Tensor:
        return G

    def residual(self, proj: Projector, G: Tensor, R: Tensor, basis: None, dtype: torch.dtype) -> None:
        return None  # G - G

    def write_(self, proj: Projector, W: Tensor, N: Tensor, basis: None, hp, residual: Tensor | None) -> None:
        F.write_full_step_(W, N, hp, residual)

    def moment_shape(self, proj: Projector) -> tuple[int, ...]:
        return tuple(proj.shape)


class BlocksKind(FullKind):
    """Whole parameters in rotation (BAdam, Luo et al., 2024; FRUGAL's blocks): the active ones take Adam,
    with fresh moments at each cycle; the others a residual-only step without state."""

    cycles_blocks = True

    def check_group(self, group: dict) -> None:
        """Blocks are counted by ``density`` (the fraction of the group's parameters kept active)."""
        density = group.get("density")
        if density is None:
            raise ValueError("projector 'blocks' needs density in (0, 1] (the fraction of parameters kept active)")
        if group["block_order"] == "mirror" and group["params"]:
            n = len(group["params"])
            k = max(1, round(density * n))
            if n < 2 or k % 2:
                raise ValueError(f"block_order 'mirror' activates blocks in pairs, so round(density * n) must be even "
                                 f"with n >= 2; got {k} of n = {n} parameters")

    def schedule(self, proj: Projector, state: dict, step: int, block_active) -> str:
        cycle = step // proj.gap
        if not block_active(cycle):
            return PAUSE
        if state.get("block_cycle") == cycle:
            return KEEP
        # FRUGAL re-initializes every active block at a switch, also one that stays active.
        state["block_cycle"] = cycle
        return RESTART


class EmptyKind(FullKind):
    """No subspace (rank 0 / density -> 0): the residual rule alone, no state."""

    has_moments = False

    def schedule(self, proj: Projector, state: dict, step: int, block_active) -> str:
        return EMPTY


KINDS: dict[str, DenseKind] = {
    "svd": SvdKind("svd"), "gram": GramKind("gram"), "rsvd": RsvdKind("rsvd"), "random": RandomKind("random"),
    "gaussian": GaussianKind("gaussian"), "randperm": CoordinateKind("randperm"), "rows": WindowKind("rows", axis=0),
    "columns": WindowKind("columns", axis=1), "randk": RandKKind("randk"), "blocks": BlocksKind("blocks"),
    "full": FullKind("full"), "none": EmptyKind("none"),
}
assert tuple(KINDS) == PROJECTORS, "every projector name has its kind object"


@dataclass(frozen=True)
class Projector:
    """Configuration of one parameter's projector; its state lives in the optimizer's per-param dict.

    ``rank`` is the subspace size (entries for ``randk``); ``side`` "left"/"right"; ``gap`` the
    refresh period in steps and ``offset`` this parameter's stagger offset (refresh when
    ``(step + offset) % gap == 0``, plus at the first step). ``sign_rule`` orients spectral
    bases (``orient_basis``). What a kind does lives in its object, ``ops`` (``KINDS``).
    """

    kind: str
    shape: tuple[int, int]
    rank: int
    side: str
    gap: int
    offset: int = 0
    seed: int = 0
    power_iters: int = 2
    sign_rule: str = "align"

    @property
    def stores_matrix(self) -> bool:
        """Whether the state keeps the basis (spectral kinds) rather than regenerating it from a seed."""
        return self.ops.stores_matrix

    @property
    def ops(self) -> DenseKind:
        """The object that says what a step does with this kind (``KINDS``)."""
        return KINDS[self.kind]

    def schedule(self, state: dict, step: int, block_active=None) -> str:
        """What happens to the subspace before 0-based step ``step``: KEEP, REFRESH, RESTART, PAUSE or EMPTY.

        ``block_active(cycle)`` says whether this parameter is an active block in ``cycle`` (blocks only).
        """
        return self.ops.schedule(self, state, step, block_active)

    @property
    def coordinate_dim(self) -> int | None:
        """0 for row selection, 1 for column selection, None for flat entries (randk); coordinate kinds only."""
        return self.ops.coordinate_dim(self)

    def moment_shape(self) -> tuple[int, ...]:
        """Shape of the moments in the subspace (of R)."""
        return self.ops.moment_shape(self)

    def refresh_due(self, state: dict, step: int) -> bool:
        """Whether the subspace is recomputed before 0-based step ``step``."""
        if "proj_refresh" not in state:
            return True
        return (step + self.offset) % self.gap == 0

    def refresh(self, G: Tensor, state: dict) -> None:
        """Recompute the subspace from gradient ``G`` and record it in ``state`` (tensors and numbers only)."""
        count = state.get("proj_refresh", -1) + 1
        self.ops.refresh_(self, G, state, count)
        state["proj_refresh"] = count
        state["proj_seed"] = self.seed

    def matrix(self, state: dict, device: torch.device) -> Tensor:
        """The dense (dim, rank) projector of a kind that has one (spectral, ``random``, ``gaussian``)."""
        return self.ops.matrix(self, state, device)

    def index(self, state: dict, device: torch.device) -> Tensor:
        """The selected coordinates for coordinate kinds, drawn at the last refresh."""
        index = state.get("proj_index")
        # Redrawn (the same one: seed and refresh count fix it) from a state saved before
        # rows/columns/randperm kept their index, or after torch.optim.Optimizer.load_state_dict
        # cast it to the parameter's float dtype (its rule for every non-"step" tensor).
        if index is None or index.is_floating_point():
            index = state["proj_index"] = self.draw_index(state["proj_refresh"], device)
        return index

    def draw_index(self, refresh: int, device: torch.device) -> Tensor:
        """int32 indices (4 bytes per selected row, column or entry); int64 where a flat randk index needs it."""
        index = coordinate_index(self.kind, self.shape, self.rank, self.side, seed=self.seed, refresh=refresh,
                                 device=device)
        m, n = self.shape
        return index.to(torch.int32 if m * n < 2**31 else torch.int64)
