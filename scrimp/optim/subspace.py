"""The composable core: one optimizer engine = projector x inner rule x residual rule x output rule.

``SubspaceAdamW`` is the single place where a projected step is orchestrated, in public stages
(``begin``: refresh if due and project, ``run_inner``: the inner rule on R, ``finish``: decay,
back-projection or an output rule, residual, apply); ``step_param`` runs the three, or the fused
kernels where ``scrimp.optim.kernels.fuses`` declares the composition (on a plain group, the batched
AdamW of ``step()`` for one parameter). A driver may hold the inner rule's moments itself (offload):
``moment_layout`` says what to allocate, ``begin(..., defer_moments=True)`` records how the moments
cross the step (``MomentEvent``) and ``prepare_moments`` applies that to the driver's dict;
``step_param(..., moments=...)`` does all of it. Each part is an object:
the projector kind (``projection.KINDS``), the inner rule and the residual and output rules
(``scrimp.optim.rules``, found by name in their registry), the moment store (``moments``); the
engine never branches on a part's name. GaLore (Zhao et al., 2024) is ``projector=svd,
residual=None``; FRUGAL (Zmushko et al., 2025) is any projector with ``residual="sign_sgd"``/``"sgd"``;
Fira/APOLLO-style norm-scaled residuals are ``residual="scaled"``. The design follows optax's
``chain`` / ``scale_by_galore`` idea of composing pieces rather than re-implementing Adam per class.

Param groups: a group with a ``rank`` or ``density`` key is projected, any other group is plain
AdamW. Group keys of projected groups (defaults in ``PROJECTION_DEFAULTS``):
``rank`` or ``density``, ``update_proj_gap``, ``scale``, ``proj_type`` (std/reverse_std/left/right),
``projector`` (see ``scrimp.optim.projection.PROJECTORS``), ``inner`` (a registered inner rule,
default "adam"), ``output`` (None: back-projection, or a registered output rule), ``residual``
(None or a registered residual rule: sign_sgd/sgd/scaled built in), ``residual_lr_scale``,
``reset_statistics``, ``stagger``, ``seed``, ``power_iters``, ``sign_rule`` (align/canonical/solver:
how spectral bases get their signs, ``projection.orient_basis``), ``moment_policy`` (keep/reset/rotate:
how the moments cross a refresh, ``SubspaceAdamW._refresh``), and the keys the inner and output rules
declare (``group_keys``).

State per parameter (only tensors, ints, floats, strings): ``step``, ``moment_step``, the inner rule's
moments (Adam: ``exp_avg``, ``exp_avg_sq``, or ``exp_avg_q``/``exp_avg_absmax``/... in the 8-bit
store), ``proj_P`` (spectral kinds), ``proj_index`` (coordinate kinds), ``proj_refresh``, ``proj_seed``,
``proj_offset``, ``block_cycle`` (blocks).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from scrimp.checks import check_number, is_real

from . import functional as F
from . import state_check
from .finite_guard import first_nonfinite
from .moments import BLOCKSIZE_8BIT, MIN_8BIT_NUMEL, Fp32Store, moment_store, stored_keys
from .projection import (
    EMPTY,
    KINDS,
    PAUSE,
    PROJ_TYPES,
    PROJECTORS,
    REFRESH,
    RESTART,
    SIGN_RULES,
    Projector,
    choose_side,
    mix_seed,
    resolve_rank,
    seeded_generator,
    subspace_dim,
)
from .rules import INNER_RULES, OUTPUT_RULES, RESIDUAL_RULES
from .rules.adam import AdamRule
from .rules.base import InnerRule, OutputRule, ResidualRule, StepHyper
from .rules.registry import declared_moment_specs

__all__ = ["MIN_8BIT_NUMEL", "BLOCKSIZE_8BIT", "MomentEvent", "MomentSlot", "ParamStep", "Parts", "SubspaceAdamW",
           "resolve_rank", "subspace_dim"]

PROJECTION_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "projector": "svd",
    "inner": "adam",
    "output": None,
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


def rule_group_defaults(cls: type) -> dict[str, Any]:
    """The group keys a rule class takes (``group_keys``), with their defaults (from the constructor for names)."""
    return dict(_rule_group_defaults(cls))


@functools.cache
def _rule_group_defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    keys = getattr(cls, "group_keys", ())
    if isinstance(keys, dict):
        return tuple(keys.items())
    params = inspect.signature(cls).parameters
    return tuple((k, params[k].default) for k in keys
                 if k in params and params[k].default is not inspect.Parameter.empty)


def make_rule(cls: type, group: dict):
    """An instance of a rule class with the group's values of the keys it declares."""
    return cls(**{k: group[k] for k in rule_group_defaults(cls) if k in group})


def rule_keys() -> set[str]:
    """Every group key a registered inner or output rule declares."""
    return {k for table in (INNER_RULES, OUTPUT_RULES) for cls in table.values() for k in rule_group_defaults(cls)}


class Parts(NamedTuple):
    """The parts of one group's steps: inner rule, residual rule (or None), output rule (or None), moment store."""

    inner: InnerRule
    residual: ResidualRule | None
    output: OutputRule | None
    store: Fp32Store


class MomentEvent(NamedTuple):
    """What happens to a parameter's inner-rule moments at a step, wherever they are held.

    ``drop``: discard them (the first subspace, ``moment_policy="reset"``, a new block cycle, an
    inactive block); ``overlap``: rotate them into the new basis by ``O = P_new^T P_old``
    (``moment_policy="rotate"``; moments not held are not rotated); ``shape``: the shape of the fresh
    zeros they start from when none are held after that (None: this step keeps no moments).
    """

    drop: bool
    overlap: Tensor | None
    shape: tuple[int, ...] | None


class MomentSlot(NamedTuple):
    """The shape and dtype of one state tensor of the inner rule (``SubspaceAdamW.moment_layout``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class ParamStep:
    """One parameter's step between the stages: ``begin`` fills it, ``run_inner`` and ``finish`` read it.

    ``grad`` is the full gradient as the projector works on it (None for a layer-wise low-rank step),
    ``basis`` the projector's matrix or coordinate index for this step (None for full/blocks/none),
    ``R`` the projected gradient (None when the parameter has no subspace this step: a residual-only
    step). A caller may change ``R`` in place between ``begin`` and ``run_inner`` (an FSDP collective).
    ``moment_event`` is how the inner rule's moments cross this step; ``prepare_moments`` applies it to
    the dict that holds them and sets ``moments`` (that dict) and ``hp`` (which counts the moments' steps).
    """

    p: Tensor
    group: dict
    grad: Tensor | None
    state: dict
    projector: Projector
    parts: Parts
    moment_event: MomentEvent
    active: bool
    hp: StepHyper | None = None
    moments: dict | None = None
    basis: Tensor | None = None
    R: Tensor | None = None


def is_projected_group(group: dict) -> bool:
    """A group is projected when it names a subspace size (``rank`` or ``density``)."""
    return group.get("rank") is not None or group.get("density") is not None


def _refuse_unprepared(s: ParamStep) -> None:
    if s.hp is None:
        raise RuntimeError("begin(..., defer_moments=True) leaves the moments to the caller: call "
                           "prepare_moments(s, moments) before run_inner and finish")


def _adam_path(p: Tensor, grad: Tensor, moments: dict) -> tuple[torch.device, bool]:
    """Which of ``F.adam_step_foreach``'s paths ``p`` takes when stepped alone (torch's fused kernel or not),
    on which device: a batch of one key takes the same path as each member alone."""
    return p.device, F.fused_adamw_ok([p], [grad], 1.0, ([moments["exp_avg"]], [moments["exp_avg_sq"]]))


def validate_group(group: dict, *, allow_empty_subspace: bool = False) -> None:
    """Raise one clear ValueError for a bad hyper-parameter of ``group`` before any step runs."""
    _validate_adam_settings(group)
    if not is_projected_group(group):
        return
    _validate_projection_flags(group)
    _validate_parts(group)
    _validate_subspace_settings(group)
    _validate_rank(group, allow_empty_subspace)


def _validate_adam_settings(group: dict) -> None:
    """lr, eps, weight_decay, eps_style, betas and the parameters' dtype: every group has them."""
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


def _validate_projection_flags(group: dict) -> None:
    """The scales, flags, seed and orders of a projected group, and how its moments cross a refresh."""
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


def _validate_subspace_settings(group: dict) -> None:
    """Sign rule, rounding, side, refresh gap, rank or density, and what the projector kind itself needs."""
    if group["sign_rule"] not in SIGN_RULES:
        raise ValueError(f"sign_rule must be one of {SIGN_RULES}, got {group['sign_rule']!r}")
    if group["density_rounding"] not in DENSITY_ROUNDINGS:
        raise ValueError(f"density_rounding must be one of {DENSITY_ROUNDINGS}, got {group['density_rounding']!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
    gap = group["update_proj_gap"]
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise ValueError(f"update_proj_gap must be an integer >= 1, got {gap!r}")
    rank, density = group.get("rank"), group.get("density")
    if rank is not None and density is not None:
        raise ValueError(f"give either rank or density for a projected group, not both (rank={rank}, density={density})")
    if density is not None and not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    KINDS[group["projector"]].check_group(group)


def _validate_rank(group: dict, allow_empty_subspace: bool) -> None:
    """``rank`` is an integer the projector kind can select for each (2-D) parameter of the group."""
    rank, kind = group.get("rank"), KINDS[group["projector"]]
    min_rank = 0 if allow_empty_subspace else 1
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < min_rank):
        raise ValueError(f"rank must be an integer >= {min_rank}, got {rank!r}")
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(
                f"projection needs 2-D parameters, got a {p.dim()}-D parameter of shape {tuple(p.shape)} in a "
                "group with rank/density; put it in a group without projection keys"
            )
        if rank is not None:
            shape = tuple(p.shape)
            kind.check_rank(rank, shape, choose_side(shape, group["proj_type"]))


def _validate_parts(group: dict) -> None:
    """The group's part names are registered, they compose, and its moment policy is one they can follow."""
    kind, inner = group["projector"], group.get("inner", "adam")
    if kind not in PROJECTORS:
        raise ValueError(f"projector must be one of {PROJECTORS}, got {kind!r}")
    if inner not in INNER_RULES:
        raise ValueError(f"inner must be one of {tuple(sorted(INNER_RULES))}, got {inner!r}")
    if group.get("output") is not None and group["output"] not in OUTPUT_RULES:
        raise ValueError(f"output must be None or one of {tuple(sorted(OUTPUT_RULES))}, got {group['output']!r}")
    if group["residual"] is not None and group["residual"] not in RESIDUAL_RULES:
        raise ValueError(f"residual must be one of {(None, *sorted(RESIDUAL_RULES))}, got {group['residual']!r}")
    _validate_composition(group)
    if group["moment_policy"] == "rotate" and not KINDS[kind].compares_bases:
        dense = tuple(k for k, ops in KINDS.items() if ops.compares_bases)
        raise ValueError(f"moment_policy='rotate' needs a dense projector {dense} (their bases can be compared), got "
                         f"projector={kind!r}")
    if group["moment_policy"] == "rotate" and not INNER_RULES[inner].rotatable:
        raise ValueError(f"moment_policy='rotate' needs an inner rule that can rotate its state, got inner={inner!r}")
    _refuse_keys_of_other_rules(group)
    # Built once here so that a rule's own settings (natural_history, momentum, ...) are refused at
    # construction, not at the first step.
    for cls in group_rule_classes(group):
        make_rule(cls, group)


def _validate_composition(group: dict) -> None:
    """The output and residual rules get from the projector what they need, as the projector kind declares it."""
    kind, output, residual = group["projector"], group.get("output"), group["residual"]
    if output is not None and OUTPUT_RULES[output].needs_side_shaped_R and not KINDS[kind].side_shaped_R:
        fitting = tuple(k for k, ops in KINDS.items() if ops.side_shaped_R)
        raise ValueError(f"output={output!r} reads R per channel of the projected side ((r, n) on the left, (m, r) on "
                         f"the right), and projector={kind!r} lays R out otherwise; use one of {fitting}")
    if residual is not None and not KINDS[kind].orthonormal:
        fitting = tuple(k for k, ops in KINDS.items() if ops.orthonormal)
        raise ValueError(f"residual={residual!r} updates G - P P^T G, the part of G outside the subspace only for an "
                         f"orthonormal P, and projector={kind!r} is not orthonormal; use one of {fitting}")


def group_rule_classes(group: dict) -> list[type]:
    """The registered inner and output rule classes ``group`` names (names not registered are left out)."""
    classes = [INNER_RULES.get(group.get("inner", "adam"))]
    if group.get("output") is not None:
        classes.append(OUTPUT_RULES.get(group["output"]))
    return [cls for cls in classes if cls is not None]


def _refuse_keys_of_other_rules(group: dict) -> None:
    """A key of a registered rule that this group's rules do not take would be silently ignored: refuse it.

    Constructor defaults land in every projected group, so a constructor key must be taken by the rule of
    every projected group too.
    """
    roles = (("inner rule", INNER_RULES, group.get("inner", "adam")), ("output rule", OUTPUT_RULES, group.get("output")))
    taken = {k for cls in group_rule_classes(group) for k in rule_group_defaults(cls)}
    for key in group:
        if key in taken:
            continue
        for role, table, mine in roles:
            owner = next((name for name, cls in sorted(table.items()) if key in rule_group_defaults(cls)), None)
            if owner is not None:
                takes = sorted(rule_group_defaults(table[mine])) if mine is not None else []
                raise ValueError(f"{key} is a setting of {role} {owner!r}; this group's {role} {mine!r} takes {takes}")


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
        group.setdefault("inner", "adam")  # before the parts were named, every inner rule was Adam
        group.setdefault("output", None)
        for cls in group_rule_classes(group):  # a rule key saved before the rule took it: the rule ran its default
            for key, value in rule_group_defaults(cls).items():
                group.setdefault(key, value)
    return group


# Group settings a loaded state must match (``SubspaceAdamW.check_state_dict``): they choose the
# algorithm (projector, residual rule, when and how the subspace changes) or the shape of the
# state (rank, density and its rounding, the projected side).
FIXED_PROJECTION_KEYS = ("projector", "rank", "density", "density_rounding", "proj_type", "inner", "output",
                         "residual", "update_proj_gap", "reset_statistics", "block_order")


def fixed_group_keys(group: dict) -> tuple[str, ...]:
    """The settings of ``group`` that a loaded state must match (``rank`` and ``density`` also say
    whether the group is projected at all): the projection's, and every key of the group's inner and
    output rules but those a rule declares resumable (``resumable_keys``), since a rule's setting may
    change what its state means (SGD's ``momentum`` buffer, Natural GaLore's ``natural_history`` stack,
    APOLLO's ``apollo_mode``)."""
    if not is_projected_group(group):
        return ("rank", "density")
    rule_keys = (k for cls in group_rule_classes(group) for k in rule_group_defaults(cls) if k not in cls.resumable_keys)
    return ("rank", "density", *FIXED_PROJECTION_KEYS, *rule_keys)


def _state_key_kinds(specs) -> dict[str, str]:
    """Every state key a parameter may hold under an inner rule's ``specs``, with what it is (for messages)."""
    kinds = {"proj_P": "stored projector", "proj_index": "coordinate indices"}
    for spec in specs:
        fp32, *eight_bit = stored_keys(spec)
        kinds[fp32] = "fp32 moments"
        for key in eight_bit:
            kinds[key] = f"8-bit moments (moments_8bit=True and {MIN_8BIT_NUMEL} entries or more)"
    return kinds


class SubspaceAdamW(torch.optim.Optimizer):
    """AdamW whose projected groups keep moments in a subspace of each 2-D gradient (see module doc).

    ``fused``: None (auto: fused Triton kernels iff the parameter is on CUDA and triton imports),
    True (always call ``scrimp.optim.kernels``), False (torch path). The kernels take the steps whose
    composition ``kernels.fuses`` declares (``kernels.FUSED``: a dense projector, Adam, fp32 moments,
    back-projection and a built-in residual rule) and that get the full gradient; every other step stays
    on the torch path whatever ``fused`` says (coordinate projectors, full/blocks/none, layer-wise
    accumulated low-rank gradients, 8-bit moments, other inner/output/residual rules, plain groups). ``moments_8bit`` stores the
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
        unknown = set(projection_defaults) - set(PROJECTION_DEFAULTS) - rule_keys()
        group_only = sorted(unknown & {"rank", "density"})
        if group_only:  # they say which groups are projected, so they cannot be a default for every group
            raise ValueError(f"{group_only[0]} goes in a param group (e.g. [{{'params': [...], '{group_only[0]}': ...}}] "
                             "or scrimp.optim.param_groups(model, ...)), not in the constructor")
        if unknown:
            raise ValueError(f"unknown optimizer argument(s) {sorted(unknown)}; projection keys are {list(PROJECTION_KEYS)} "
                             f"and the keys of registered rules {sorted(rule_keys())}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self._projection_defaults = {**PROJECTION_DEFAULTS, **projection_defaults}
        self._allow_empty = allow_empty_subspace
        self.fused = fused
        self.moments_8bit = moments_8bit
        self.store = moment_store(moments_8bit)
        self._plain_parts = Parts(inner=AdamRule(), residual=None, output=None, store=self.store)
        self._parts: dict[int, tuple[tuple, Parts]] = {}
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
            for key, value in self._rule_defaults(group).items():
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

    def _rule_defaults(self, group: dict) -> dict[str, Any]:
        """The keys the group's inner and output rules declare, with the engine's or the rules' defaults."""
        classes = [INNER_RULES.get(group["inner"]), OUTPUT_RULES.get(group["output"])]
        return {k: self._projection_defaults.get(k, v) for cls in classes if cls is not None
                for k, v in rule_group_defaults(cls).items()}

    def parts(self, group: dict) -> Parts:
        """The part objects of ``group``'s steps (cached per group; rebuilt when a part's key changes)."""
        if not is_projected_group(group):
            return self._plain_parts
        inner_cls, output_cls = INNER_RULES[group["inner"]], OUTPUT_RULES.get(group["output"])
        declared = [k for cls in (inner_cls, output_cls) if cls is not None for k, _ in _rule_group_defaults(cls)]
        key = (group["inner"], group["output"], group["residual"], *(group.get(k) for k in declared))
        cached = self._parts.get(id(group))
        if cached is not None and cached[0] == key:
            return cached[1]
        residual = None if group["residual"] is None else RESIDUAL_RULES[group["residual"]]
        output = None if output_cls is None else make_rule(output_cls, group)
        parts = Parts(inner=make_rule(inner_cls, group), residual=residual, output=output, store=self.store)
        self._parts[id(group)] = (key, parts)
        return parts

    def _stagger_slot(self, p: Tensor) -> tuple[int, int]:
        """(position, count) of ``p`` among all stagger-able projected parameters of this optimizer."""
        if self._slots is None:
            order = [
                q for g in self.param_groups if is_projected_group(g) and KINDS[g["projector"]].low_rank
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
    def low_rank_shape(self, p: Tensor, group: dict) -> tuple[int, ...] | None:
        """The shape of ``p``'s projected gradient under ``group``'s settings (None: not projected).

        Computed from the settings alone, without ``projector()``, which would add an entry to ``p``'s
        state (drivers ask this while checking a state they are about to load).
        """
        if not is_projected_group(group):
            return None
        shape = (p.shape[0], p.shape[1])
        side = choose_side(shape, group["proj_type"])
        kind, rank = resolve_rank(group["projector"], shape, side, group.get("rank"), group.get("density"),
                                  group["density_rounding"])
        return tuple(Projector(kind=kind, shape=shape, rank=rank, side=side, gap=group["update_proj_gap"]).moment_shape())

    def accumulates_low_rank(self, p: Tensor, group: dict) -> bool:
        """Whether the next step of ``p`` can take a summed projected gradient instead of the full one.

        True for dense/coordinate projectors without a residual or output rule when no refresh is
        due; a refresh, a residual or an output rule (APOLLO scales G itself) needs the full
        gradient, so the caller keeps it then.
        """
        if not is_projected_group(group) or group["residual"] is not None or group["output"] is not None:
            return False
        proj = self.projector(p, group)
        if not proj.ops.low_rank:
            return False
        state = self.state[p]
        return not proj.refresh_due(state, state.get("step", 0))

    @torch.no_grad()
    def project_grad(self, p: Tensor, group: dict, grad: Tensor) -> Tensor:
        """Low-rank coordinates of ``grad`` in the current subspace of ``p`` (fp32)."""
        proj = self.projector(p, group)
        ops = proj.ops
        basis = ops.basis(proj, self.state[p], p.device)
        return ops.project(proj, ops.working_grad(grad, basis), basis).float()

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
            self.refuse_nonfinite_gradients()  # before any weight or state changes
        for group in self.param_groups:
            if is_projected_group(group):
                for p in group["params"]:
                    if p.grad is not None:
                        self.step_param(p, group, p.grad)
            else:
                self._plain_foreach(group)
        return loss

    def refuse_nonfinite_gradients(self) -> None:
        """Raise before the step when a gradient (``.grad``) holds inf or NaN; ``step()`` runs it when
        ``check_finite`` is on (the default), and drivers that step through the stages (offload) call it
        too, so that every driver refuses in the same sentence.

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

    def moment_layout(self, p: Tensor, group: dict) -> dict[str, MomentSlot]:
        """The inner rule's state tensors the store keeps for ``p`` under ``group``: key -> (shape, dtype).

        From the settings alone (no tensor is made, nor an entry in ``p``'s state): what a driver that
        holds the moments itself (``scrimp.optim.offload``) allocates. Empty for a parameter that never
        keeps moments (rank 0); the moments of 8-bit stores as their codes and absmax.
        """
        proj = self._described_projector(p, group)
        if not proj.ops.has_moments:
            return {}
        parts = self.parts(group)
        specs = parts.inner.moment_specs()
        # stored_keys: (fp32 name, 8-bit codes, their absmax); only the codes are not fp32
        dtypes = {key: torch.uint8 if key == stored_keys(spec)[1] else torch.float32
                  for spec in specs for key in stored_keys(spec)}
        shapes = parts.store.expected_shapes(specs, tuple(proj.moment_shape()))
        return {key: MomentSlot(tuple(shape), dtypes[key]) for key, shape in shapes.items()}

    def _plain_foreach(self, group: dict) -> None:
        """Plain AdamW for a whole group, batched by step count (``_plain_adam``)."""
        by_step: dict[int, list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_step.setdefault(self._count_plain_step(p, self.state[p]), []).append(p)
        for step, params in by_step.items():
            self._plain_adam(group, params, [p.grad for p in params], [self.state[p] for p in params], step)

    def _count_plain_step(self, p: Tensor, moments: dict) -> int:
        """Advance a plain parameter's counters, with zero moments in ``moments`` at its first step; its moment step."""
        state, specs = self.state[p], self._plain_parts.inner.moment_specs()
        state.setdefault("step", 0)
        if not self.store.has(moments, specs):
            self.store.zeros(moments, specs, tuple(p.shape), p.device)
            state["moment_step"] = 0
        state["step"] += 1
        state["moment_step"] += 1
        return state["moment_step"]

    def _plain_adam(self, group: dict, params: list[Tensor], grads: list[Tensor], moments: list[dict],
                    step: int) -> None:
        """AdamW on plain parameters at one moment step: ``F.adam_step_foreach`` on fp32 moments, 8-bit
        moments one by one through the stages.

        The foreach batches are split by the path each parameter takes alone (torch's fused kernel or
        foreach ops, which round differently; ``_adam_path``), so a parameter stepped alone
        (``step_param``) equals it stepped in its group, bitwise.
        """
        specs = self._plain_parts.inner.moment_specs()
        batches: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            if self.store.holds_fp32(moments[i], specs):
                batches.setdefault(_adam_path(p, grads[i], moments[i]), []).append(i)
            else:
                self._run_stages(self._plain_step(p, group, grads[i], moments[i]), None)
        beta1, beta2 = group["betas"]
        eps = F.hf_eps(group["eps"], step, beta2, group["eps_style"])
        for batch in batches.values():
            F.adam_step_foreach(
                [params[i] for i in batch], [grads[i] for i in batch], [moments[i]["exp_avg"] for i in batch],
                [moments[i]["exp_avg_sq"] for i in batch], step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                eps=eps, weight_decay=group["weight_decay"],
            )

    def _plain_step(self, p: Tensor, group: dict, grad: Tensor, moments: dict) -> ParamStep:
        """The stages' record of a plain-group parameter whose counters are already advanced."""
        proj = self._projectors.get(p) or self._full_projector(p)
        state = self.state[p]
        return ParamStep(p=p, group=group, grad=grad, state=state, projector=proj, parts=self._plain_parts,
                         moment_event=MomentEvent(drop=False, overlap=None, shape=tuple(p.shape)), active=True,
                         hp=self._hyper(group, state, proj), moments=moments)

    def _full_projector(self, p: Tensor) -> Projector:
        """The identity projector of a plain-group parameter (any shape): Adam on the whole tensor."""
        proj = self._projectors[p] = Projector(kind="full", shape=tuple(p.shape), rank=0, side="left", gap=1)
        return proj

    # -- the step, in stages ------------------------------------------------------------------------
    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict, grad: Tensor | None, low_rank_grad: Tensor | None = None, *,
                   moments: dict | None = None) -> None:
        """Step one parameter of ``group`` with its full ``grad`` or, between refreshes, a projected one.

        A projected group runs ``begin``, ``run_inner`` and ``finish``, or the fused kernels where
        ``kernels.fuses`` declares the step's composition (and ``fused`` allows them). A plain group runs
        ``step()``'s batched AdamW on this parameter alone (same counters, ``F.adam_step_foreach([p], ...)``),
        bitwise equal to it. ``moments`` is the dict that holds the inner rule's moments: the engine's
        state by default, or a driver's (an offload tier's), which the step reads and changes in place.
        """
        if not is_projected_group(group):
            self._plain_param_step(p, group, grad, self.state[p] if moments is None else moments)
            return
        s = self._start(p, group, grad, low_rank_grad)
        self.prepare_moments(s, s.state if moments is None else moments)
        if low_rank_grad is None and self._fuses(s):
            self._fused_step(s)
            return
        self._run_stages(s, low_rank_grad)

    def _plain_param_step(self, p: Tensor, group: dict, grad: Tensor | None, moments: dict) -> None:
        if grad is None:
            raise ValueError("grad must be the full gradient for a parameter of a plain group (no rank or density), "
                             "got None")
        if grad.is_sparse:
            raise RuntimeError(SPARSE_GRADIENTS)
        self._plain_adam(group, [p], [grad], [moments], self._count_plain_step(p, moments))

    def _run_stages(self, s: ParamStep, low_rank_grad: Tensor | None) -> None:
        self._project(s, low_rank_grad)
        self.finish(s, self.run_inner(s))

    @torch.no_grad()
    def begin(self, p: Tensor, group: dict, grad: Tensor | None, low_rank_grad: Tensor | None = None, *,
              defer_moments: bool = False) -> ParamStep:
        """Stage 1: advance the parameter's counters and subspace (a refresh when due; a block switch), carry
        the moments across under the group's ``moment_policy``, then project: ``s.R`` is ``low_rank_grad`` or
        the projection of ``grad`` (None when the parameter has no subspace this step).

        ``defer_moments=True``: the moments are not in the engine's state but the caller's (an offload
        tier); their transition waits in ``s.moment_event`` for ``prepare_moments(s, moments)``, which
        must run before ``run_inner`` and ``finish``.
        """
        s = self._start(p, group, grad, low_rank_grad)
        if not defer_moments:
            self.prepare_moments(s, s.state)
        self._project(s, low_rank_grad)
        return s

    def prepare_moments(self, s: ParamStep, moments: dict, device: torch.device | None = None) -> None:
        """Apply ``s.moment_event`` to ``moments``, the dict that holds the inner rule's moments (the
        engine's state, or a driver's), and make the step read them there.

        Drop them or rotate them by the overlap; if none are held then, start fresh zeros on ``device``
        (default: the parameter's) and the moment counter at 0. Count the step; set ``s.moments`` and
        ``s.hp`` (whose bias correction counts the moments' steps). Once per step.
        """
        if s.moments is not None:
            raise RuntimeError("prepare_moments runs once per step, and this step's moments are prepared already")
        event, store, specs = s.moment_event, s.parts.store, s.parts.inner.moment_specs()
        if event.drop:
            store.drop(moments, specs)
        elif event.overlap is not None and store.has(moments, specs):
            opened = store.open(moments, specs)
            s.parts.inner.rotate(opened, event.overlap, s.projector.side)
            store.close(moments, specs, opened)
        if event.shape is not None:
            if not store.has(moments, specs):
                store.zeros(moments, specs, event.shape, s.p.device if device is None else device)
                s.state["moment_step"] = 0
            s.state["moment_step"] += 1
        s.moments = moments
        s.hp = self._hyper(s.group, s.state, s.projector)

    def run_inner(self, s: ParamStep) -> Tensor | None:
        """Stage 2: the inner rule's direction N from ``s.R`` and its moments (opened from the store and
        closed again); None for a step without a subspace."""
        _refuse_unprepared(s)
        if s.R is None:
            return None
        moments = self.open_moments(s)
        N = s.parts.inner.direction(s.R, moments, s.hp)
        self.close_moments(s, moments)
        return N

    @torch.no_grad()
    def finish(self, s: ParamStep, N: Tensor | None) -> None:
        """Stage 3: decay, ``-lr scale`` times the back-projected N (or the output rule's full-size update),
        and the residual rule's update; a step without a subspace (N None) applies the residual rule alone."""
        _refuse_unprepared(s)
        hp, rule = s.hp, s.parts.residual
        if N is None:
            update = None if rule is None else rule.alone(s.grad)
            F.write_residual_only_(s.p, update, lr=hp.lr, weight_decay=hp.weight_decay,
                                   residual_lr_scale=hp.residual_lr_scale)
            return
        proj, ops = s.projector, s.projector.ops
        residual = None
        if rule is not None:
            res = ops.residual(proj, s.grad, s.R, s.basis, N.dtype)
            residual = None if res is None else rule.update(res, s.R, N)
        if s.parts.output is None:
            ops.write_(proj, s.p, N, s.basis, hp, residual)
        else:
            F.write_full_step_(s.p, s.parts.output.full_update(s.grad, s.R, N, s.state, hp), hp, residual)

    def open_moments(self, s: ParamStep) -> dict[str, Tensor]:
        """fp32 tensors of the inner rule's moments for ``s`` (an offloaded inner rule reads copies of them)."""
        return s.parts.store.open(s.moments, s.parts.inner.moment_specs())

    def close_moments(self, s: ParamStep, moments: dict[str, Tensor]) -> None:
        """Store moments opened by ``open_moments`` (after they were changed out of place, copy them in first)."""
        s.parts.store.close(s.moments, s.parts.inner.moment_specs(), moments)

    def _start(self, p: Tensor, group: dict, grad: Tensor | None, low_rank_grad: Tensor | None) -> ParamStep:
        """Counters, subspace and what happens to the moments at this step; no moment touched, no projection yet."""
        if grad is not None and grad.is_sparse:
            raise RuntimeError(SPARSE_GRADIENTS)
        projected = is_projected_group(group)
        proj = self.projector(p, group) if projected else (self._projectors.get(p) or self._full_projector(p))
        if low_rank_grad is None:
            self._refuse_kernels_off_cuda(p, proj)
        parts, state = self.parts(group), self.state[p]
        event = self._advance(p, group, proj, state, grad)
        active = event.shape is not None
        basis = proj.ops.basis(proj, state, p.device) if active else None
        return ParamStep(p=p, group=group, grad=grad, state=state, projector=proj, parts=parts, moment_event=event,
                         active=active, basis=basis)

    def _advance(self, p: Tensor, group: dict, proj: Projector, state: dict, grad: Tensor | None) -> MomentEvent:
        """Count the step and move the subspace as the projector's schedule says; what that does to the moments."""
        t = state.get("step", 0)
        event = proj.schedule(state, t, lambda cycle: self._block_active(p, group, cycle))
        state["step"] = t + 1
        if event == PAUSE:  # BAdam: an inactive block holds no state
            state["moment_step"] = 0
            return MomentEvent(drop=True, overlap=None, shape=None)
        if event == EMPTY:
            return MomentEvent(drop=False, overlap=None, shape=None)
        drop, overlap = self._refresh(p, group, proj, state, grad) if event == REFRESH else (event == RESTART, None)
        return MomentEvent(drop=drop, overlap=overlap, shape=tuple(proj.moment_shape()))

    def _hyper(self, group: dict, state: dict, proj: Projector) -> StepHyper:
        """The ``StepHyper`` of this step (plain groups: scale 1, no residual)."""
        beta1, beta2 = group["betas"]
        step = state.get("moment_step", 0)
        projected = is_projected_group(group)
        return StepHyper(step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                         eps=F.hf_eps(group["eps"], step, beta2, group["eps_style"]),
                         weight_decay=group["weight_decay"], scale=group["scale"] if projected else 1.0,
                         side=proj.side, residual=group["residual"] if projected else None,
                         residual_lr_scale=group["residual_lr_scale"] if projected else 1.0)

    def _project(self, s: ParamStep, low_rank_grad: Tensor | None) -> None:
        """``s.R`` from ``low_rank_grad`` or by projecting ``s.grad`` (kept as the projector works on it)."""
        if not s.active:
            return
        ops = s.projector.ops
        if low_rank_grad is not None:
            R = low_rank_grad
        else:
            s.grad = ops.working_grad(s.grad, s.basis)
            R = ops.project(s.projector, s.grad, s.basis)
        s.R = R if R.dtype == torch.float32 else R.float()  # the moments are fp32

    def _refresh(self, p: Tensor, group: dict, proj: Projector, state: dict,
                 grad: Tensor | None) -> tuple[bool, Tensor | None]:
        """A new subspace from ``grad``, and how the moments cross it by the group's ``moment_policy``, as
        (drop, overlap): keep them as they are (galore-torch), reset them (FRUGAL; ``reset_statistics=True``;
        and at the first subspace) or rotate them into the new basis by ``O = P_new^T P_old`` (the inner
        rule's ``rotate``; Adam's is ``functional.rotate_moments_``)."""
        if grad is None:
            raise RuntimeError("a projector refresh needs the full gradient, got only a projected one")
        first = "proj_refresh" not in state
        policy = "reset" if group["reset_statistics"] else group["moment_policy"]
        previous = proj.matrix(state, p.device) if policy == "rotate" and not first else None
        proj.refresh(grad, state)
        state["proj_offset"] = proj.offset
        if first or policy == "reset":
            return True, None
        return False, None if previous is None else F.basis_overlap(proj.matrix(state, p.device), previous)

    # -- the fused kernels ----------------------------------------------------------------------------
    def _fuses(self, s: ParamStep) -> bool:
        """Whether ``fused`` and the kernels' declaration (``kernels.fuses``) send this step to the kernels."""
        if not s.active or self.fused is False or (self.fused is None and not _kernels_available(s.p)):
            return False
        from . import kernels  # lazy: only when fused is on (Triton is heavy to import)

        store = s.parts.store.format_of(s.moments, s.parts.inner.moment_specs())
        output = None if s.parts.output is None else s.parts.output.name
        residual = None if s.parts.residual is None else s.parts.residual.name
        return kernels.fuses(s.projector.kind, inner=s.parts.inner.name, store=store, output=output,
                             residual=residual)

    def _fused_step(self, s: ParamStep) -> None:
        from . import kernels

        # fused=True asks for Triton explicitly (an error on a CPU tensor outside the interpreter);
        # auto lets the kernels package choose.
        backend = "triton" if self.fused is True else "auto"
        kernels.fused_step(s.p, s.grad, s.basis, self.open_moments(s), s.hp, backend)

    def _refuse_kernels_off_cuda(self, p: Tensor, proj: Projector) -> None:
        """fused=True on a CPU parameter outside Triton's interpreter: one sentence before any state changes."""
        if self.fused is not True or p.is_cuda:
            return
        from . import kernels

        if (proj.kind in kernels.FUSED.projectors
                and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes")):
            raise ValueError(f"fused=True runs the Triton kernels, which need CUDA parameters (or TRITON_INTERPRET=1 set "
                             f"before import), got a {p.device.type} parameter; use fused=None or fused=False")

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
        state (``fixed_group_keys``: the projection's, and the inner and output rules' own keys
        unless a rule declares them resumable); every state tensor's shape against its parameter
        and those settings (8-bit moments or fp32, history stacks, the projected shape, the
        projector's (dim, rank), coordinate indices against their bound, an output rule's state,
        and no state of a rule the group does not run); the counters. Settings a resume may change pass
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
        parts = self.parts(group)
        specs = parts.inner.moment_specs()
        # Every registered rule's state is refused where this group's rules keep none of it.
        for key, what in _state_key_kinds((*declared_moment_specs(), *specs)).items():
            spec[key] = Expect(absent=True, why=f"this optimizer keeps no {what} for it")
        for cls in OUTPUT_RULES.values():
            for key in cls.state_keys:
                spec[key] = Expect(absent=True, why=f"it belongs to output rule {cls.name!r}, which this group has not")
        proj = self._described_projector(p, group)
        if not proj.ops.has_moments:
            return spec
        for key, (shape, below, why) in proj.ops.state_shapes(proj).items():
            spec[key] = Expect(shape=shape, below=below, why=why)
        spec.update(self._moment_expectations(p, proj, specs))
        if parts.output is not None:
            for key, shape in parts.output.state_shapes(tuple(p.shape)).items():
                spec[key] = Expect(shape=shape, why=f"output rule {parts.output.name!r}")
        return spec

    def _moment_expectations(self, p: Tensor, proj: Projector, specs) -> dict[str, state_check.Expect]:
        """The shapes of the inner rule's state in this optimizer's store (history stacks and 8-bit forms too)."""
        shape = proj.moment_shape()
        why = (f"the projected shape of {tuple(p.shape)} at {proj.kind} size {proj.rank}" if proj.ops.low_rank
               else "the parameter's shape")
        return {key: state_check.Expect(shape=key_shape, why=f"one absmax per {BLOCKSIZE_8BIT} entries"
                                        if key.endswith("_absmax") else why)
                for key, key_shape in self.store.expected_shapes(specs, shape).items()}

    def _described_projector(self, p: Tensor, group: dict) -> Projector:
        """The projector ``group`` gives ``p`` (identity for plain groups), built without touching the state."""
        shape = tuple(p.shape)
        if not is_projected_group(group):
            return Projector(kind="full", shape=shape, rank=0, side="left", gap=1)
        side = choose_side(shape, group["proj_type"])
        kind, rank = resolve_rank(group["projector"], shape, side, group.get("rank"), group.get("density"),
                                  group["density_rounding"])
        return Projector(kind=kind, shape=shape, rank=rank, side=side, gap=group["update_proj_gap"])

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
            specs = self.parts(group).inner.moment_specs()
            for p in group["params"]:
                state = self.state[p]
                if self._described_projector(p, group).ops.cycles_blocks and self.store.has(state, specs):
                    state.setdefault("block_cycle", (state["step"] - 1) // group["update_proj_gap"])
        self._projectors.clear()
        self._random_blocks.clear()
        self._slots = None
