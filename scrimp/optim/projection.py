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

PROJECTORS = ("svd", "gram", "rsvd", "random", "randperm", "rows", "columns", "randk", "blocks", "full", "none")
DENSE = ("svd", "gram", "rsvd", "random")
COORDINATE = ("randperm", "rows", "columns", "randk")
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


def coordinate_index(kind: str, shape: tuple[int, int], rank: int, side: str, *, seed: int, refresh: int,
                     device: torch.device) -> Tensor:
    """Sorted int64 indices of the selected rows/columns (or flat entries for ``randk``)."""
    m, n = shape
    if kind == "randk":
        return torch.randperm(m * n, generator=seeded_generator(mix_seed(seed, refresh)))[:rank].sort().values.to(device)
    if kind in ("rows", "columns"):
        dim = m if kind == "rows" else n
    else:
        dim = m if side == "left" else n
    if kind == "randperm":
        idx = torch.randperm(dim, generator=seeded_generator(mix_seed(seed, refresh)))[:rank].sort().values
    else:  # rows / columns: a contiguous cyclic window that moves by `rank` at each refresh
        start = (refresh * rank) % dim
        idx = ((torch.arange(rank) + start) % dim).sort().values
    return idx.to(device)


@dataclass(frozen=True)
class Projector:
    """Configuration of one parameter's projector; its state lives in the optimizer's per-param dict.

    ``rank`` is the subspace size (entries for ``randk``); ``side`` "left"/"right"; ``gap`` the
    refresh period in steps and ``offset`` this parameter's stagger offset (refresh when
    ``(step + offset) % gap == 0``, plus at the first step). ``sign_rule`` orients spectral
    bases (``orient_basis``).
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
    def dense(self) -> bool:
        return self.kind in DENSE

    @property
    def coordinate_dim(self) -> int | None:
        """0 for row selection, 1 for column selection, None for flat entries (randk)."""
        if self.kind == "randk":
            return None
        if self.kind in ("rows", "columns"):
            return 0 if self.kind == "rows" else 1
        return 0 if self.side == "left" else 1

    def moment_shape(self) -> tuple[int, ...]:
        """Shape of the Adam moments in the subspace."""
        m, n = self.shape
        if self.kind in ("full", "blocks"):
            return (m, n)
        if self.kind == "randk":
            return (self.rank,)
        if self.kind in ("rows", "columns"):
            return (self.rank, n) if self.kind == "rows" else (m, self.rank)
        return (self.rank, n) if self.side == "left" else (m, self.rank)

    def refresh_due(self, state: dict, step: int) -> bool:
        """Whether the subspace is recomputed before 0-based step ``step``."""
        if "proj_refresh" not in state:
            return True
        return (step + self.offset) % self.gap == 0

    def refresh(self, G: Tensor, state: dict) -> None:
        """Recompute the subspace from gradient ``G`` and record it in ``state`` (tensors and numbers only)."""
        count = state.get("proj_refresh", -1) + 1
        if self.kind in ("svd", "gram", "rsvd"):
            P = self._spectral_basis(G, state, count)
            if P is not None:
                state["proj_P"] = orient_basis(P, state.get("proj_P"), self.sign_rule)
        state["proj_refresh"] = count
        state["proj_seed"] = self.seed
        if self.kind in COORDINATE:
            # Drawn once per refresh and kept (counted as projector state). Redrawing at every step
            # would cost a CPU randperm (O(mn) for randk) and a host-to-device copy, which makes a
            # CUDA step wait.
            state["proj_index"] = self._draw_index(count, G.device)

    def _spectral_basis(self, G: Tensor, state: dict, count: int) -> Tensor | None:
        """SVD/rSVD with fallbacks: eigh of the Gram matrix, then the previous projector, then random."""
        try:
            if not torch.isfinite(G).all():
                raise torch.linalg.LinAlgError("non-finite gradient")
            if self.kind == "svd":
                P = svd_basis(G, self.rank, self.side)
            elif self.kind == "gram":
                P = eigh_basis(G, self.rank, self.side, dtype=torch.float32)
            else:
                P = rsvd_basis(G, self.rank, self.side, seed=mix_seed(self.seed, count), power_iters=self.power_iters)
            if torch.isfinite(P).all():
                return P
            raise torch.linalg.LinAlgError("non-finite singular vectors")
        except (RuntimeError, torch.linalg.LinAlgError) as err:
            reason = str(err).splitlines()[0][:120]
        try:
            if torch.isfinite(G).all():
                P = eigh_basis(G, self.rank, self.side)
                if torch.isfinite(P).all():
                    warn_once("svd-fallback", f"{self.kind} of a gradient failed ({reason}); using eigh of the "
                                          "Gram matrix instead (warned once)")
                    return P.to(G.device)
        except (RuntimeError, torch.linalg.LinAlgError):
            pass
        if "proj_P" in state:
            warn_once("svd-fallback", f"{self.kind} of a gradient failed ({reason}); keeping the previous "
                                  "projector (warned once)")
            return None
        warn_once("svd-fallback", f"{self.kind} of a gradient failed ({reason}) at the first step; using a "
                                "seeded random projector until the next refresh (warned once)")
        dim = self.shape[0] if self.side == "left" else self.shape[1]
        return random_basis(dim, self.rank, seed=mix_seed(self.seed, count, 1), device=G.device)

    def matrix(self, state: dict, device: torch.device) -> Tensor:
        """The dense (dim, rank) projector for ``svd``/``gram``/``rsvd``/``random`` kinds."""
        if self.kind == "random":
            dim = self.shape[0] if self.side == "left" else self.shape[1]
            return random_basis(dim, self.rank, seed=mix_seed(self.seed, state["proj_refresh"]), device=device)
        return state["proj_P"]

    def index(self, state: dict, device: torch.device) -> Tensor:
        """The selected coordinates for coordinate kinds, drawn at the last refresh."""
        index = state.get("proj_index")
        # Redrawn (the same one: seed and refresh count fix it) from a state saved before
        # rows/columns/randperm kept their index, or after torch.optim.Optimizer.load_state_dict
        # cast it to the parameter's float dtype (its rule for every non-"step" tensor).
        if index is None or index.is_floating_point():
            index = state["proj_index"] = self._draw_index(state["proj_refresh"], device)
        return index

    def _draw_index(self, refresh: int, device: torch.device) -> Tensor:
        """int32 indices (4 bytes per selected row, column or entry); int64 where a flat randk index needs it."""
        index = coordinate_index(self.kind, self.shape, self.rank, self.side, seed=self.seed, refresh=refresh,
                                 device=device)
        m, n = self.shape
        return index.to(torch.int32 if m * n < 2**31 else torch.int64)
