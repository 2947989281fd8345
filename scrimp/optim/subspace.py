"""The composable core: one optimizer engine = projector x inner rule (Adam) x residual rule.

``SubspaceAdamW`` is the single place where a projected step is orchestrated. GaLore
(Zhao et al., 2024) is ``projector=svd, residual=None``; FRUGAL (Zmushko et al., 2025) is any
projector with ``residual="sign_sgd"``/``"sgd"``; Fira/APOLLO-style norm-scaled residuals are
``residual="scaled"``. The design follows optax's ``chain`` / ``scale_by_galore`` idea of
composing pieces rather than re-implementing Adam per class.

Param groups: a group with a ``rank`` or ``density`` key is projected, any other group is plain
AdamW. Group keys of projected groups (defaults in ``PROJECTION_DEFAULTS``):
``rank`` or ``density``, ``update_proj_gap``, ``scale``, ``proj_type`` (std/reverse_std/left/right),
``projector`` (see ``scrimp.optim.projection.PROJECTORS``), ``residual`` (None/sign_sgd/sgd/scaled),
``residual_lr_scale``, ``reset_statistics``, ``stagger``, ``seed``, ``power_iters``, ``sign_rule``,
``moment_policy`` (keep/reset/rotate: how the moments cross a refresh, ``SubspaceAdamW._refresh``),
(align/canonical/solver: how spectral bases get their signs, ``projection.orient_basis``).

State per parameter (only tensors, ints, floats, strings): ``step``, ``moment_step``, ``exp_avg``,
``exp_avg_sq`` (or ``exp_avg_q``/``exp_avg_absmax``/... for 8-bit moments), ``proj_P``
(spectral kinds), ``proj_index`` (coordinate kinds), ``proj_refresh``, ``proj_seed``, ``proj_offset``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from scrimp.checks import check_number, is_real

from . import functional as F
from . import state_check
from .finite_guard import first_nonfinite
from .projection import (
    COORDINATE,
    DENSE,
    PROJ_TYPES,
    PROJECTORS,
    SIGN_RULES,
    Projector,
    choose_side,
    mix_seed,
    seeded_generator,
)

RESIDUALS = (None, "sign_sgd", "sgd", "scaled")
PROJECTION_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "projector": "svd",
    "residual": None,
    "residual_lr_scale": 1.0,
    "reset_statistics": False,
    "stagger": True,
    "seed": 0,
    "power_iters": 2,
    "block_order": "ascending",
    "density_rounding": "round",
    "sign_rule": "align",
    "moment_policy": "keep",
}
MOMENT_POLICIES = ("keep", "reset", "rotate")
BLOCK_ORDERS = ("ascending", "descending", "random", "mirror")
DENSITY_ROUNDINGS = ("round", "floor")
GROUP_KEYS = ("params", "lr", "betas", "eps", "weight_decay", "eps_style", *PROJECTION_DEFAULTS, "rank", "density")
SPARSE_GRADIENTS = ("SubspaceAdamW does not support sparse gradients (nn.Embedding(sparse=True)); use dense "
                    "gradients or torch.optim.SparseAdam for those parameters")
PROJECTION_KEYS = ("rank", "density", *PROJECTION_DEFAULTS)
MIN_8BIT_NUMEL = 4096  # as bitsandbytes' min_8bit_size: tiny tensors keep fp32 moments
BLOCKSIZE_8BIT = 256


def is_projected_group(group: dict) -> bool:
    """A group is projected when it names a subspace size (``rank`` or ``density``)."""
    return group.get("rank") is not None or group.get("density") is not None


def subspace_dim(kind: str, shape: tuple[int, int], side: str) -> int:
    """How many directions a projector of ``kind`` can select from an (m, n) weight.

    Row/column windows select among m rows / n columns; ``randperm`` and ``random`` among the
    vectors of their side (left: m, right: n); the spectral kinds among the min(m, n) singular
    vectors.
    """
    m, n = shape
    if kind == "rows":
        return m
    if kind == "columns":
        return n
    if kind in ("randperm", "random"):
        return m if side == "left" else n
    return min(m, n)


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
    to_size = round if rounding == "round" else math.floor
    m, n = shape
    if kind in ("blocks", "full", "none"):
        return kind, 0
    if kind == "randk":
        total = m * n
        size = to_size(density * total) if rank is None else rank * max(m, n)
    else:
        total = subspace_dim(kind, shape, side)
        side_dim = {"rows": m, "columns": n}.get(kind, m if side == "left" else n)
        size = to_size(density * side_dim) if rank is None else rank
    if size >= total:
        return "full", 0
    if size <= 0:
        return "none", 0
    return kind, int(size)


def validate_group(group: dict, *, allow_empty_subspace: bool = False) -> None:
    """Raise one clear ValueError for a bad hyper-parameter of ``group`` before any step runs."""
    for key in ("lr", "eps", "weight_decay"):
        check_number(key, group[key], low=0)
    if group["eps"] == 0:
        raise ValueError("eps must be a finite number > 0 (Adam divides by sqrt(v) + eps, and v is 0 where a "
                         "gradient entry is 0), got 0")
    if group["eps_style"] not in F.EPS_STYLES:
        raise ValueError(f"eps_style must be one of {F.EPS_STYLES}, got {group['eps_style']!r}")
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(is_real(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    for p in group["params"]:
        if not p.is_floating_point() or p.is_complex():
            raise ValueError(f"params must be real floating point (fp32, bf16, fp16 or fp64), got a {p.dtype} "
                             f"parameter of shape {tuple(p.shape)}")
    if not is_projected_group(group):
        return
    for key in ("scale", "residual_lr_scale"):
        check_number(key, group[key], low=0)
    for key in ("stagger", "reset_statistics"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be True or False, got {group[key]!r}")
    if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
        raise ValueError(f"seed must be an integer, got {group['seed']!r}")
    power_iters = group["power_iters"]
    if not isinstance(power_iters, int) or isinstance(power_iters, bool) or power_iters < 0:
        raise ValueError(f"power_iters must be an integer >= 0, got {power_iters!r}")
    if group["block_order"] not in BLOCK_ORDERS:
        raise ValueError(f"block_order must be one of {BLOCK_ORDERS}, got {group['block_order']!r}")
    if group["moment_policy"] not in MOMENT_POLICIES:
        raise ValueError(f"moment_policy must be one of {MOMENT_POLICIES}, got {group['moment_policy']!r}")
    if group["moment_policy"] != "keep" and group["reset_statistics"]:
        raise ValueError(f"reset_statistics=True is moment_policy='reset'; give one of them, got reset_statistics=True "
                         f"with moment_policy={group['moment_policy']!r}")
    if group["moment_policy"] == "rotate" and group["projector"] not in DENSE:
        raise ValueError(f"moment_policy='rotate' needs a dense projector {DENSE} (their bases can be compared), got "
                         f"projector={group['projector']!r}")
    if group["sign_rule"] not in SIGN_RULES:
        raise ValueError(f"sign_rule must be one of {SIGN_RULES}, got {group['sign_rule']!r}")
    if group["density_rounding"] not in DENSITY_ROUNDINGS:
        raise ValueError(f"density_rounding must be one of {DENSITY_ROUNDINGS}, got {group['density_rounding']!r}")
    kind, proj_type = group["projector"], group["proj_type"]
    if kind not in PROJECTORS:
        raise ValueError(f"projector must be one of {PROJECTORS}, got {kind!r}")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    if group["residual"] not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {group['residual']!r}")
    gap = group["update_proj_gap"]
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise ValueError(f"update_proj_gap must be an integer >= 1, got {gap!r}")
    rank, density = group.get("rank"), group.get("density")
    if rank is not None and density is not None:
        raise ValueError(f"give either rank or density for a projected group, not both (rank={rank}, density={density})")
    if density is not None and not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if kind == "blocks" and density is None:
        raise ValueError("projector 'blocks' needs density in (0, 1] (the fraction of parameters kept active)")
    if kind == "blocks" and group["block_order"] == "mirror" and group["params"]:
        n = len(group["params"])
        k = max(1, round(density * n))
        if n < 2 or k % 2:
            raise ValueError(f"block_order 'mirror' activates blocks in pairs, so round(density * n) must be even "
                             f"with n >= 2; got {k} of n = {n} parameters")
    min_rank = 0 if allow_empty_subspace else 1
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < min_rank):
        raise ValueError(f"rank must be an integer >= {min_rank}, got {rank!r}")
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(
                f"projection needs 2-D parameters, got a {p.dim()}-D parameter of shape {tuple(p.shape)} in a "
                "group with rank/density; put it in a group without projection keys"
            )
        if rank is not None and kind not in ("blocks", "full", "none"):
            side = choose_side(tuple(p.shape), proj_type)
            dim = subspace_dim(kind, tuple(p.shape), side)
            if rank >= dim:
                unit = kind if kind in ("rows", "columns") else ("rows" if side == "left" else "columns")
                what = "min(m, n)" if dim == min(p.shape) else f"the number of {unit} projector {kind!r} selects from"
                raise ValueError(
                    f"rank must be below {what} = {dim} for a parameter of shape {tuple(p.shape)}, got {rank}"
                )


# -- 8-bit moments (bitsandbytes blockwise dynamic quantization; works on CPU) -------------------
_CODES: dict[tuple[bool, str], Tensor] = {}


def _code(signed: bool, device: torch.device) -> Tensor:
    key = (signed, str(device))
    if key not in _CODES:
        import bitsandbytes.functional as bnbf

        _CODES[key] = bnbf.create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def quantize_moment_(x: Tensor, q: Tensor, absmax: Tensor, *, signed: bool) -> None:
    """Blockwise 8-bit quantization of fp32 ``x`` into the state tensors ``q`` (uint8) and ``absmax``."""
    import bitsandbytes.functional as bnbf

    bnbf.quantize_blockwise(x, code=_code(signed, x.device), absmax=absmax, out=q, blocksize=BLOCKSIZE_8BIT)


def dequantize_moment(q: Tensor, absmax: Tensor, *, signed: bool) -> Tensor:
    """fp32 values of a blockwise-quantized moment."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_blockwise(q, absmax=absmax, code=_code(signed, q.device), blocksize=BLOCKSIZE_8BIT)


def _zeros_moments(state: dict, shape: tuple[int, ...], device: torch.device, eight_bit: bool) -> None:
    numel = math.prod(shape)
    if eight_bit and numel >= MIN_8BIT_NUMEL:
        blocks = (numel + BLOCKSIZE_8BIT - 1) // BLOCKSIZE_8BIT
        for name in ("exp_avg", "exp_avg_sq"):
            # code 127 of the signed map and 0 of the unsigned map are the value 0 with absmax 0 anyway
            state[f"{name}_q"] = torch.zeros(shape, dtype=torch.uint8, device=device)
            state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
    else:
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=device)


def _drop_moments(state: dict) -> None:
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
        state.pop(key, None)


def _has_moments(state: dict) -> bool:
    return "exp_avg" in state or "exp_avg_q" in state


def _open_moments(state: dict) -> tuple[Tensor, Tensor, bool]:
    """fp32 views (or dequantized copies) of the moments, and whether they must be written back."""
    if "exp_avg" in state:
        return state["exp_avg"], state["exp_avg_sq"], False
    m = dequantize_moment(state["exp_avg_q"], state["exp_avg_absmax"], signed=True)
    v = dequantize_moment(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], signed=False)
    return m, v, True


def _close_moments(state: dict, m: Tensor, v: Tensor) -> None:
    quantize_moment_(m, state["exp_avg_q"], state["exp_avg_absmax"], signed=True)
    quantize_moment_(v, state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], signed=False)


def _kernels_available(p: Tensor) -> bool:
    """Whether ``fused=None`` (the default) turns the kernels on for this parameter.

    Needs CUDA, Triton, a weight dtype the kernels take (fp32, bf16, fp16: an fp64 weight keeps the
    torch path), and compute capability 8.0 or newer: the kernels' default fp32 dot is ``tf32x3``,
    and TF32 tensor cores start with Ampere. Older GPUs keep the torch path unless ``fused=True``
    asks for the kernels.
    """
    if not p.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from scrimp.optim.kernels.checks import WEIGHT_DTYPES

    if p.dtype not in WEIGHT_DTYPES:
        return False
    return torch.cuda.get_device_capability(p.device) >= (8, 0)


def _one_typo_apart(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` (4+ characters) differ by one insertion, deletion, substitution or swap
    of neighbours: the misspellings of a key worth refusing, not other names that share letters."""
    if min(len(a), len(b)) < 4 or abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


# Keys added after state dicts were first written whose absence says nothing about the run: a
# state without them loads with the loading optimizer's own value (a saved value wins, as in torch).
LIVE_WHEN_ABSENT = ("sign_rule", "moment_policy")


def _with_added_keys(group: dict) -> dict:
    """A saved param group with the keys added since: state dicts from before ``eps_style`` used the
    HF formula, and blocks rotated in ascending order before ``block_order``."""
    group = {"eps_style": "hf", **group}
    if is_projected_group(group):
        group.setdefault("block_order", "ascending")
        group.setdefault("density_rounding", "round")
        group.setdefault("sign_rule", "align")  # before it, signs were the solver's: the fix applies on resume
        group.setdefault("moment_policy", "keep")
    return group


# Group settings a loaded state must match (``SubspaceAdamW.check_state_dict``): they choose the
# algorithm (projector, residual rule, when and how the subspace changes) or the shape of the
# state (rank, density and its rounding, the projected side).
FIXED_PROJECTION_KEYS = ("projector", "rank", "density", "density_rounding", "proj_type", "residual",
                         "update_proj_gap", "reset_statistics", "block_order")


def fixed_group_keys(group: dict) -> tuple[str, ...]:
    """The settings of ``group`` that a loaded state must match (``rank`` and ``density`` also say
    whether the group is projected at all)."""
    return ("rank", "density", *(FIXED_PROJECTION_KEYS if is_projected_group(group) else ()))


_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
_KIND_OF_KEY = {"proj_P": "stored projector", "proj_index": "coordinate indices",
                **{k: f"8-bit moments (moments_8bit=True and {MIN_8BIT_NUMEL} entries or more)"
                   for k in _MOMENT_KEYS if k.endswith(("_q", "_absmax"))},
                "exp_avg": "fp32 moments", "exp_avg_sq": "fp32 moments"}


def _coordinate_bound(kind: str, shape: tuple[int, int], side: str) -> int:
    """How many coordinates a coordinate projector selects from (entries for randk)."""
    m, n = shape
    return m * n if kind == "randk" else subspace_dim(kind, shape, side)


class SubspaceAdamW(torch.optim.Optimizer):
    """AdamW whose projected groups keep moments in a subspace of each 2-D gradient (see module doc).

    ``fused``: None (auto: fused Triton kernels iff the parameter is on CUDA and triton imports),
    True (always call ``scrimp.optim.kernels``), False (torch path). The kernels take the dense
    projected steps (svd/gram/rsvd/random) that get the full gradient, with any residual rule; the other
    steps stay on the torch path whatever ``fused`` says: coordinate projectors, full/blocks/none,
    layer-wise accumulated low-rank gradients, 8-bit moments and plain groups. ``moments_8bit`` stores the
    moments blockwise-quantized with bitsandbytes (Dettmers et al., 2022, "8-bit optimizers").
    ``allow_empty_subspace`` lets ``rank=0`` mean "no state at all" (FRUGAL's density -> 0 limit).
    ``check_finite`` (default True) makes ``step()`` raise, before it changes any weight or state,
    when a gradient holds inf or NaN: one reduction per gradient and one host read per step
    (``benchmarks/optim_step.py`` measures its cost). Turn it off where the caller already checks,
    as ``scrimp.training``'s module does. ``load_state_dict`` refuses a state that does not fit
    (``state_check``).
    ``eps_style`` says where eps enters Adam's denominator (``functional.hf_eps``): "hf" adds it to
    sqrt(v) as galore-torch's GaLoreAdamW does, "torch" to the bias-corrected sqrt(v_hat) as
    torch.optim.AdamW, bitsandbytes and FRUGAL do.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        eps_style: str = "hf",
        fused: bool | None = None,
        moments_8bit: bool = False,
        allow_empty_subspace: bool = False,
        check_finite: bool = True,
        **projection_defaults: Any,
    ):
        unknown = set(projection_defaults) - set(PROJECTION_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown optimizer argument(s) {sorted(unknown)}; projection keys are {list(PROJECTION_KEYS)}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self._projection_defaults = {**PROJECTION_DEFAULTS, **projection_defaults}
        self._allow_empty = allow_empty_subspace
        self.fused = fused
        self.moments_8bit = moments_8bit
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
        self.check_finite = check_finite
        self._projectors: dict[Tensor, Projector] = {}
        self._slots: dict[Tensor, tuple[int, int]] | None = None
        self._random_blocks: dict[int, tuple[tuple[int, int], set[int]]] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      eps_style=eps_style))

    # -- groups ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a group; projected groups get the projection defaults; validated before any step."""
        if not isinstance(param_group, dict):
            param_group = {"params": param_group}
        group = dict(param_group)
        for key in group:
            near = [known for known in GROUP_KEYS if key not in GROUP_KEYS and _one_typo_apart(key, known)]
            if near:  # other unknown keys ("name", "lr_scale", ...) are the caller's and pass through
                raise ValueError(f"unknown param-group key {key!r}; did you mean {near[0]!r}?")
        if is_projected_group(group):
            for key, value in self._projection_defaults.items():
                group.setdefault(key, value)
        else:
            group.pop("rank", None)
            group.pop("density", None)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        # validate the group as it will be stored, before it joins the optimizer
        validate_group({**self.defaults, **group}, allow_empty_subspace=self._allow_empty)
        super().add_param_group(group)
        self._slots = None

    def _stagger_slot(self, p: Tensor) -> tuple[int, int]:
        """(position, count) of ``p`` among all stagger-able projected parameters of this optimizer."""
        if self._slots is None:
            order = [
                q for g in self.param_groups if is_projected_group(g) and g["projector"] in DENSE + COORDINATE
                for q in g["params"]
            ]
            self._slots = {q: (i, len(order)) for i, q in enumerate(order)}
        return self._slots.get(p, (0, 1))

    def projector(self, p: Tensor, group: dict) -> Projector:
        """The projector configuration of parameter ``p`` (cached; offsets persist in the state)."""
        proj = self._projectors.get(p)
        if proj is not None:
            return proj
        shape = (p.shape[0], p.shape[1])
        side = choose_side(shape, group["proj_type"])
        kind, rank = resolve_rank(group["projector"], shape, side, group.get("rank"), group.get("density"),
                                  group["density_rounding"])
        state = self.state[p]
        if "proj_offset" in state:
            offset = state["proj_offset"]
        elif group["stagger"]:
            pos, count = self._stagger_slot(p)
            offset = (pos * group["update_proj_gap"]) // count
        else:
            offset = 0
        seed = state["proj_seed"] if "proj_seed" in state else mix_seed(group["seed"], self._stagger_slot(p)[0])
        proj = Projector(kind=kind, shape=shape, rank=rank, side=side, gap=group["update_proj_gap"], offset=offset,
                         seed=seed, power_iters=group["power_iters"], sign_rule=group["sign_rule"])
        self._projectors[p] = proj
        return proj

    # -- layer-wise hooks use these ------------------------------------------------------------------
    def accumulates_low_rank(self, p: Tensor, group: dict) -> bool:
        """Whether the next step of ``p`` can take a summed projected gradient instead of the full one.

        True for dense/coordinate projectors without a residual rule when no refresh is due; a
        refresh or a residual needs the full gradient, so the caller keeps it then.
        """
        if not is_projected_group(group) or group["residual"] is not None:
            return False
        proj = self.projector(p, group)
        if proj.kind not in DENSE + COORDINATE:
            return False
        state = self.state[p]
        return not proj.refresh_due(state, state.get("step", 0))

    @torch.no_grad()
    def project_grad(self, p: Tensor, group: dict, grad: Tensor) -> Tensor:
        """Low-rank coordinates of ``grad`` in the current subspace of ``p`` (fp32)."""
        proj = self.projector(p, group)
        state = self.state[p]
        if proj.dense:
            return F.project(grad.float(), proj.matrix(state, p.device), proj.side)
        dim = proj.coordinate_dim
        index = proj.index(state, p.device)
        src = grad.reshape(-1) if dim is None else grad
        return src.index_select(0 if dim is None else dim, index).float()

    # -- stepping --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(p.grad is not None and p.grad.is_sparse for group in self.param_groups for p in group["params"]):
            raise RuntimeError(SPARSE_GRADIENTS)  # before any group steps
        if self.check_finite:
            self._refuse_nonfinite_gradients()  # before any weight or state changes
        for group in self.param_groups:
            if is_projected_group(group):
                for p in group["params"]:
                    if p.grad is not None:
                        self.step_param(p, group, p.grad)
            else:
                self._plain_foreach(group)
        return loss

    def _refuse_nonfinite_gradients(self) -> None:
        """Raise before the step when a gradient holds inf or NaN (``check_finite``, on by default).

        One reduction per gradient and one host read per step (``finite_guard``); the first
        offender is looked up only on failure. Only the gradients are checked, not the update:
        for finite gradients the update is finite short of overflow. Adam's direction
        m_hat / (sqrt(v_hat) + eps) is bounded for finite moments (Kingma & Ba, 2015, Sec. 2.1;
        a v that overflows to inf gives 0, not NaN), sign residuals are +-1, and P^T G and
        G - P P^T G with an orthonormal P are bounded by the gradient's Frobenius norm, so
        a non-finite update needs entries near the fp32 maximum divided by sqrt(m n) (about
        1e35 for a 1000 x 1000 matrix): such gradients are already a diverged run. Checking the
        update too would cost a second read of every weight-sized tensor per step, for that case
        alone. bf16 weights share fp32's range; an fp16 weight overflows only next to 65504.
        """
        located = [(g, i, p) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])
                   if p.grad is not None]
        bad = first_nonfinite([p.grad for _, _, p in located])
        if bad is None:
            return
        g, i, p = located[bad]
        where = state_check.describe(g, i, p)
        raise FloatingPointError(
            f"the gradient of {where} holds inf or NaN; step() stopped before changing any weight or optimizer "
            "state (lower the lr, clip gradients or train in a wider dtype; check_finite=False turns this check off)"
        )

    def _plain_foreach(self, group: dict) -> None:
        """Plain AdamW for a whole group with foreach ops, batched by step count."""
        by_step: dict[int, list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["moment_step"] = 0
                _zeros_moments(state, tuple(p.shape), p.device, self.moments_8bit)
            by_step.setdefault(state["moment_step"] + 1, []).append(p)
        beta1, beta2 = group["betas"]
        for step, params in by_step.items():
            dense = [p for p in params if "exp_avg" in self.state[p]]
            for p in params:
                state = self.state[p]
                state["step"] += 1
                state["moment_step"] = step
                if "exp_avg" not in state:
                    self._full_adam(p, group, p.grad, state, scale=1.0)
            F.adam_step_foreach(
                dense, [p.grad for p in dense], [self.state[p]["exp_avg"] for p in dense],
                [self.state[p]["exp_avg_sq"] for p in dense], step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=F.hf_eps(group["eps"], step, beta2, group["eps_style"]), weight_decay=group["weight_decay"],
            )

    def _full_adam(self, p: Tensor, group: dict, grad: Tensor, state: dict, *, scale: float) -> None:
        """Adam on the whole matrix (density 1, active blocks, 8-bit plain parameters)."""
        beta1, beta2 = group["betas"]
        m, v, write_back = _open_moments(state)
        step = state["moment_step"]
        N = F.adam_direction_(grad, m, v, step=step, beta1=beta1, beta2=beta2,
                              eps=F.hf_eps(group["eps"], step, beta2, group["eps_style"]))
        if write_back:
            _close_moments(state, m, v)
        with F.working_copy(p) as W:
            F.decay_(W, lr=group["lr"], weight_decay=group["weight_decay"])
            F.apply_update_(W, N, -group["lr"] * scale)

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict, grad: Tensor | None, low_rank_grad: Tensor | None = None) -> None:
        """Step one parameter of ``group`` with its full ``grad`` or, between refreshes, a projected one."""
        if grad is not None and grad.is_sparse:
            raise RuntimeError(SPARSE_GRADIENTS)
        state = self.state[p]
        if not is_projected_group(group):
            if "step" not in state:
                state["step"] = 0
                state["moment_step"] = 0
                _zeros_moments(state, tuple(p.shape), p.device, self.moments_8bit)
            state["step"] += 1
            state["moment_step"] += 1
            self._full_adam(p, group, grad, state, scale=1.0)
            return
        proj = self.projector(p, group)
        if (self.fused is True and proj.dense and low_rank_grad is None and not p.is_cuda
                and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes")):
            raise ValueError(f"fused=True runs the Triton kernels, which need CUDA parameters (or TRITON_INTERPRET=1 set "
                             f"before import), got a {p.device.type} parameter; use fused=None or fused=False")
        t = state.get("step", 0)
        lr, rule, rscale = group["lr"], group["residual"], group["residual_lr_scale"]
        if proj.kind == "none":
            state["step"] = t + 1
            F.residual_only_step_torch(p, grad, lr=lr, weight_decay=group["weight_decay"], rule=rule,
                                       residual_lr_scale=rscale)
            return
        if proj.kind in ("full", "blocks"):
            cycle = t // group["update_proj_gap"]
            active = proj.kind == "full" or self._block_active(p, group, cycle)
            state["step"] = t + 1
            if not active:
                _drop_moments(state)  # BAdam: an inactive block holds no state
                state["moment_step"] = 0
                F.residual_only_step_torch(p, grad, lr=lr, weight_decay=group["weight_decay"], rule=rule,
                                           residual_lr_scale=rscale)
                return
            if proj.kind == "blocks" and state.get("block_cycle") != cycle:
                # FRUGAL re-initializes every active block at a switch, also one that stays active.
                _drop_moments(state)
                state["block_cycle"] = cycle
            if not _has_moments(state):
                _zeros_moments(state, tuple(p.shape), p.device, self.moments_8bit)
                state["moment_step"] = 0
            state["moment_step"] += 1
            self._full_adam(p, group, grad, state, scale=group["scale"])
            return
        if proj.refresh_due(state, t):
            self._refresh(p, group, proj, state, grad)
        if not _has_moments(state):
            _zeros_moments(state, proj.moment_shape(), p.device, self.moments_8bit)
            state["moment_step"] = 0
        state["step"] = t + 1
        state["moment_step"] += 1
        beta1, beta2 = group["betas"]
        step = state["moment_step"]
        hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=F.hf_eps(group["eps"], step, beta2, group["eps_style"]),
                     weight_decay=group["weight_decay"], scale=group["scale"])
        m, v, write_back = _open_moments(state)
        if proj.dense:
            P = proj.matrix(state, p.device)
            if low_rank_grad is not None:
                F.low_rank_adam_(p, low_rank_grad, P, m, v, side=proj.side, **hyper)
            elif self._use_kernels(p, write_back):
                from . import kernels  # lazy: only when fused is on (Triton is heavy to import)

                # fused=True asks for Triton explicitly (an error on a CPU tensor outside the
                # interpreter); auto lets the kernels package choose.
                backend = "triton" if self.fused is True else "auto"
                kernels.projected_adam_step(p, grad, P, m, v, side=proj.side, residual=rule,
                                            residual_lr_scale=rscale, backend=backend, **hyper)
            else:
                F.projected_adam_step_torch(p, grad, P, m, v, side=proj.side, residual=rule,
                                            residual_lr_scale=rscale, **hyper)
        else:
            F.coordinate_adam_step_torch(p, grad, proj.index(state, p.device), m, v, dim=proj.coordinate_dim,
                                         residual=rule, residual_lr_scale=rscale, R=low_rank_grad, **hyper)
        if write_back:
            _close_moments(state, m, v)

    def _refresh(self, p: Tensor, group: dict, proj: Projector, state: dict, grad: Tensor | None) -> None:
        """A new subspace from ``grad``, and the moments carried across it by the group's ``moment_policy``:
        keep them as they are (galore-torch), reset them (FRUGAL; ``reset_statistics=True``) or rotate them
        into the new basis (``functional.rotate_moments_``)."""
        if grad is None:
            raise RuntimeError("a projector refresh needs the full gradient, got only a projected one")
        first = "proj_refresh" not in state
        policy = "reset" if group["reset_statistics"] else group["moment_policy"]
        previous = proj.matrix(state, p.device) if policy == "rotate" and not first else None
        proj.refresh(grad, state)
        state["proj_offset"] = proj.offset
        if first or policy == "reset":
            _drop_moments(state)
        elif previous is not None and _has_moments(state):
            m, v, write_back = _open_moments(state)
            F.rotate_moments_(m, v, proj.matrix(state, p.device), previous, proj.side)
            if write_back:
                _close_moments(state, m, v)

    def _use_kernels(self, p: Tensor, eight_bit: bool) -> bool:
        """Whether a dense projected step with the full gradient goes to ``scrimp.optim.kernels``.

        Every residual rule (None, "sign_sgd", "sgd", "scaled") is supported by the kernels; only
        8-bit moments (not implemented there) keep the torch path.
        """
        if self.fused is False or eight_bit:
            return False
        if self.fused is None:
            return _kernels_available(p)
        return True

    def _block_active(self, p: Tensor, group: dict, cycle: int) -> bool:
        """Whether ``p`` is among the ``round(density * n)`` active parameters of its group in ``cycle``.

        The active set changes every ``update_proj_gap`` steps, in FRUGAL's ``block_order``s
        (BlockOptimizer of the authors' code; BAdam, Luo et al., 2024): "ascending" moves a window
        of consecutive parameters forward from the first, "descending" backward from the last,
        "random" draws a seeded subset per cycle (the same on every device and after a resume),
        "mirror" pairs the j-th parameter from the front with the j-th from the back and moves k/2
        such pairs forward per cycle.
        """
        params = group["params"]
        n = len(params)
        k = max(1, round(group["density"] * n))
        index = next(i for i, q in enumerate(params) if q is p)
        order = group["block_order"]
        if order == "ascending":
            return (index - cycle * k) % n < k
        if order == "descending":
            return (n - 1 - cycle * k - index) % n < k
        if order == "mirror":
            half, pairs = n // 2, k // 2
            front = {(cycle * pairs + j) % half for j in range(pairs)}
            return index in front or n - 1 - index in front
        key = (cycle, n, k, group["seed"])
        if self._random_blocks.get(id(params), (None,))[0] != key:
            chosen = torch.randperm(n, generator=seeded_generator(mix_seed(group["seed"], cycle)))[:k]
            self._random_blocks[id(params)] = (key, set(chosen.tolist()))
        return index in self._random_blocks[id(params)][1]

    # -- state dicts -----------------------------------------------------------------------------
    # Names the constructor gave an engine key, for the sentences of ``load_state_dict`` (FRUGAL's).
    setting_names: dict[str, str] = {}

    def state_dict(self) -> dict:
        """torch's state dict plus the class tag in every group, which ``load_state_dict`` checks."""
        return state_check.tag_state_dict(super().state_dict(), self)

    def _fixed_settings(self, group: dict) -> dict:
        """The settings of ``group`` a loaded state must match, under the names the constructor took."""
        names = self.setting_names
        return {(f"{names[k]} ({k})" if k in names else k): group.get(k) for k in fixed_group_keys(group)}

    def check_state_dict(self, state_dict: dict) -> None:
        """Raise ``state_check.StateDictMismatch`` (one sentence) if ``state_dict`` does not fit this
        optimizer; change nothing. ``load_state_dict`` runs it first.

        Checked: the class (tagged, or inferred from the keys of a state dict saved before the tag);
        the group structure; each group's settings that fix the algorithm or the layout of the
        state (``fixed_group_keys``); every state tensor's shape against its parameter and those
        settings (8-bit moments or fp32, the projected shape, the projector's (dim, rank),
        coordinate indices against their bound); the counters. Settings a resume may change pass
        and are restored from the state dict, as torch does: lr, betas, eps and eps_style (where eps
        enters the denominator: numerics of the same rule), weight_decay, GaLore's
        ``scale`` and the residual's lr scale (the schedule and the step size, which schedulers
        and users retune on resume), ``power_iters`` and ``sign_rule`` (how accurately and with
        which signs the next bases are computed; the state holds bases of the same shape either
        way), ``seed`` and ``stagger`` (each parameter's seed and refresh offset are in its state
        too, so the restored values continue the saved run), and any key scrimp does not use.
        A torch.optim.AdamW state is refused rather than converted: the moments of projected
        parameters have the full shape, which no projected group can use, and refusing is the
        one rule that cannot go wrong silently.
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
            state_check.refuse(self, "it is not an optimizer state dict (it needs 'state' and 'param_groups' entries)")
        saved_groups = [_with_added_keys(g) for g in state_check.untag_groups(state_dict["param_groups"])]
        state_check.check_loadable(self, state_dict, saved_groups, settings=self._fixed_settings,
                                   spec=self._state_spec)
        for saved, current in zip(saved_groups, self.param_groups):
            validate_group({**saved, "params": current["params"]}, allow_empty_subspace=self._allow_empty)

    def _state_spec(self, p: Tensor, group: dict) -> dict[str, state_check.Expect]:
        """What the state of ``p`` may hold under ``group``'s settings (the shapes ``step`` creates)."""
        Expect = state_check.Expect
        spec = {k: Expect(integer=True) for k in ("step", "moment_step", "proj_refresh", "proj_offset", "proj_seed",
                                                  "block_cycle")}
        for key in ("proj_P", "proj_index", *_MOMENT_KEYS):
            spec[key] = Expect(absent=True, why=f"this optimizer keeps no {_KIND_OF_KEY[key]} for it")
        shape, why = tuple(p.shape), "the parameter's shape"
        if not is_projected_group(group):
            kind, rank, side = "full", 0, ""
        else:
            side = choose_side(shape, group["proj_type"])
            kind, rank = resolve_rank(group["projector"], shape, side, group.get("rank"), group.get("density"),
                                      group["density_rounding"])
        if kind == "none":
            return spec
        if kind not in ("full", "blocks"):
            proj = Projector(kind=kind, shape=shape, rank=rank, side=side, gap=group["update_proj_gap"])
            shape, why = proj.moment_shape(), f"the projected shape of {tuple(p.shape)} at {kind} size {rank}"
            dim = p.shape[0] if side == "left" else p.shape[1]
            if kind in ("svd", "gram", "rsvd"):
                spec["proj_P"] = Expect(shape=(dim, rank), why=f"the {side} side's {dim} by rank {rank}")
            elif kind in COORDINATE:
                spec["proj_index"] = Expect(shape=(rank,), below=_coordinate_bound(kind, tuple(p.shape), side),
                                            why=f"{rank} selected coordinates")
        numel = math.prod(shape)
        if self.moments_8bit and numel >= MIN_8BIT_NUMEL:
            blocks = Expect(shape=(-(-numel // BLOCKSIZE_8BIT),), why=f"one absmax per {BLOCKSIZE_8BIT} entries")
            spec.update(exp_avg_q=Expect(shape=shape, why=why), exp_avg_sq_q=Expect(shape=shape, why=why),
                        exp_avg_absmax=blocks, exp_avg_sq_absmax=blocks)
        else:
            spec.update(exp_avg=Expect(shape=shape, why=why), exp_avg_sq=Expect(shape=shape, why=why))
        return spec

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict that ``check_state_dict`` accepts (else nothing changes), keeping every
        state tensor's dtype (fp32 moments of bf16 weights stay fp32).

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter dtype,
        which would round fp32 moments and projectors of low-precision weights.
        """
        self.check_state_dict(state_dict)  # before anything is replaced
        saved_state = state_dict["state"]
        raw_groups = state_check.untag_groups(state_dict["param_groups"])
        saved_groups = [_with_added_keys(g) for g in raw_groups]
        for raw, saved, live in zip(raw_groups, saved_groups, self.param_groups):
            for key in LIVE_WHEN_ABSENT:  # a state from before the key: this optimizer's own choice holds
                if key not in raw and key in live:
                    saved[key] = live[key]
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid in saved_state:
                self.state[p] = {
                    k: (v.to(device=p.device, copy=True) if isinstance(v, Tensor) else v)
                    for k, v in saved_state[pid].items()
                }
        for group in self.param_groups:  # blocks states saved before block_cycle existed keep their moments
            if is_projected_group(group) and group["projector"] == "blocks":
                for p in group["params"]:
                    state = self.state[p]
                    if _has_moments(state) and "block_cycle" not in state:
                        state["block_cycle"] = (state["step"] - 1) // group["update_proj_gap"]
        self._projectors.clear()
        self._random_blocks.clear()
        self._slots = None
