"""FRUGAL as a thin configuration of the subspace engine (Zmushko et al., 2025, arXiv:2411.07837).

FRUGAL splits each gradient into a state-full part (Adam on a subspace chosen by ``proj_type``)
and a state-free part (the residual, updated by signSGD or SGD). Hyper-parameters keep FRUGAL's
names and are translated to the engine's group keys:

    density / rank          -> size of the state-full subspace (``rank=0``: no state at all)
    update_gap              -> update_proj_gap
    proj_type               -> projector (svd/random/randperm/randk/blocks; FRUGAL's coordinate
                               ``columns``/``rows`` are a random subset of columns/rows drawn at each
                               refresh, i.e. the engine's ``randperm`` on the right/left side)
    inactive_update_rule    -> residual (sign_sgd/sgd/no, or any registered residual rule)
    proj_params_lr_scale    -> scale, and a factor of the state-free lr too
    inactive_lr_scale       -> residual_lr_scale = inactive_lr_scale * proj_params_lr_scale
    reset_statistics        -> reset the moments at each subspace change
    block_order             -> block_order (random/ascending/descending/mirror)

The update is FRUGAL's (``frugal/proj_optimizer_templates.py`` of the authors' code): the state-full
part moves with lr * proj_params_lr_scale, the state-free part with lr * proj_params_lr_scale *
inactive_lr_scale, and Adam adds eps to the bias-corrected sqrt(v) (``eps_style="torch"``), with
FRUGAL's AdamW defaults eps 1e-8 and weight decay 0.01. One difference stays on purpose:
refreshes are staggered across parameters (``stagger=True``); ``stagger=False`` refreshes every
matrix on the same steps, as FRUGAL does.

    from scrimp.optim import FrugalAdamW, param_groups
    opt = FrugalAdamW(param_groups(model, density=0.25), lr=1e-3, proj_type="randk")

Groups with ``density``, ``rank`` or ``is_proj_params=True`` are FRUGAL groups; others are AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from scrimp.checks import check_number

from .rules import INNER_RULES, RESIDUAL_RULES
from .subspace import PROJECTION_DEFAULTS, SubspaceAdamW, rule_group_defaults, validate_group

FRUGAL_PROJ_TYPES = ("svd", "random", "randperm", "randk", "rows", "columns", "blocks")
INACTIVE_RULES = {"sign_sgd": "sign_sgd", "sgd": "sgd", "no": None}  # FRUGAL's names; any registered rule too


def inactive_rule(name: str) -> str | None:
    """The engine's residual rule for FRUGAL's ``inactive_update_rule``: FRUGAL's names ("no": none) or the
    name of any registered residual rule (``scrimp.optim.rules.registry.register_residual``)."""
    if name in INACTIVE_RULES:
        return INACTIVE_RULES[name]
    if isinstance(name, str) and name in RESIDUAL_RULES:
        return name
    raise ValueError(f"inactive_update_rule must be one of {tuple(INACTIVE_RULES)} or a registered residual rule "
                     f"{tuple(sorted(set(RESIDUAL_RULES) - set(INACTIVE_RULES)))}, got {name!r}")
_RENAMES = {
    "update_gap": "update_proj_gap",
    "inactive_lr_scale": "residual_lr_scale",
    "proj_params_lr_scale": "scale",
}
# FRUGAL's CoordinateProjector: a random subset of columns (right side) or rows (left side).
_COORDINATE_SIDES = {"columns": "right", "rows": "left"}


def frugal_group(group: dict, defaults: dict[str, Any]) -> dict:
    """Translate one FRUGAL-style param group into the engine's keys (plain groups pass through)."""
    group = dict(group)
    wants_projection = group.pop("is_proj_params", None)
    if not (wants_projection or "density" in group or "rank" in group):
        return group
    engine_names = {new: old for old, new in _RENAMES.items()} | {"projector": "proj_type",
                                                                   "residual": "inactive_update_rule"}
    clash = sorted(set(group) & set(engine_names))
    if clash:
        # These would be overwritten by FRUGAL's own names below; say so instead of ignoring them.
        raise ValueError(f"FrugalAdamW groups take FRUGAL's names: use {[engine_names[k] for k in clash]} instead of "
                         f"{clash} (or use SubspaceAdamW with the engine's names)")
    merged = {**defaults, **group}
    if merged.get("rank") is not None:
        merged.pop("density", None)
    proj_type = merged.pop("proj_type")
    if proj_type not in FRUGAL_PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {FRUGAL_PROJ_TYPES}, got {proj_type!r}")
    for name in ("inactive_lr_scale", "proj_params_lr_scale"):
        check_number(name, merged[name], low=0)
    merged["residual"] = inactive_rule(merged.pop("inactive_update_rule"))
    side = merged.pop("proj_side")
    merged["projector"], merged["proj_type"] = (
        ("randperm", _COORDINATE_SIDES[proj_type]) if proj_type in _COORDINATE_SIDES else (proj_type, side))
    # FRUGAL's CoordinateProjector (columns, rows, randk) takes int(d * n); its GaLoreProjector round(d * n).
    merged["density_rounding"] = "floor" if proj_type in (*_COORDINATE_SIDES, "randk") else "round"
    for old, new in _RENAMES.items():
        merged[new] = merged.pop(old)
    # FRUGAL scales the state-free lr by proj_params_lr_scale too (inactive_lr = lr * both scales).
    merged["residual_lr_scale"] = merged["residual_lr_scale"] * merged["scale"]
    return merged


def check_inner_settings(inner: str, settings: dict[str, Any]) -> None:
    """Refuse, in one sentence, an unknown state-full rule or a setting it does not take."""
    if inner not in INNER_RULES:
        raise ValueError(f"inner must be one of {tuple(sorted(INNER_RULES))}, got {inner!r}")
    unknown = sorted(set(settings) - set(rule_group_defaults(INNER_RULES[inner])))
    if unknown:
        raise ValueError(f"FRUGAL with inner={inner!r} does not take {unknown}; its rule's settings are "
                         f"{sorted(rule_group_defaults(INNER_RULES[inner]))}")


class FrugalAdamW(SubspaceAdamW):
    """FRUGAL with AdamW as the state-full optimizer and signSGD/SGD for the state-free residual.

    ``params`` are param groups (``param_groups(model, density=...)``; groups with ``density``,
    ``rank`` or ``is_proj_params=True`` are FRUGAL's) or a flat list, whose 2-D tensors then form
    one FRUGAL group (embeddings and the head too: ``param_groups`` keeps those plain, as FRUGAL's
    ``prepare_proj_params`` does). ``density`` in (0, 1] is the fraction of directions (entries for randk,
    parameters for blocks) that keep Adam state; ``density=1`` is AdamW. ``rank`` gives the size directly;
    ``rank=0`` keeps no state (pure signSGD/SGD on the group). ``proj_side`` is GaLore's side
    rule (std/reverse_std/left/right) for svd/random/randperm. ``check_finite`` (default True):
    ``step()`` raises before any change when a gradient holds inf or NaN. ``inner`` names the state-full
    rule of the projected part ("adam" by default; ``FrugalLion`` and ``FrugalSGD`` set "lion" and "sgd"),
    and ``inner_settings`` are that rule's own keys (``momentum`` for "sgd", ...). Plain groups (norms,
    embeddings) keep AdamW whatever ``inner`` says; FRUGAL's code runs its Lion/SGD on them too.
    """

    # FRUGAL's names of the engine keys, for the sentences of load_state_dict.
    setting_names = {"update_proj_gap": "update_gap", "projector": "proj_type", "proj_type": "proj_side",
                     "residual": "inactive_update_rule"}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        density: float | None = 0.25,
        rank: int | None = None,
        update_gap: int = 200,
        proj_type: str = "randk",
        inactive_update_rule: str = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        proj_params_lr_scale: float = 1.0,
        reset_statistics: bool = True,
        proj_side: str = "std",
        block_order: str = "random",
        stagger: bool = True,
        seed: int = 0,
        eps_style: str = "torch",
        fused: bool | None = None,
        check_finite: bool = True,
        inner: str = "adam",
        **inner_settings: Any,
    ):
        check_inner_settings(inner, inner_settings)
        defaults = dict(inner=inner, **inner_settings,
            density=None if rank is not None else density, rank=rank, update_gap=update_gap, proj_type=proj_type,
            inactive_update_rule=inactive_update_rule, inactive_lr_scale=inactive_lr_scale,
            proj_params_lr_scale=proj_params_lr_scale, reset_statistics=reset_statistics, proj_side=proj_side,
            block_order=block_order, stagger=stagger, seed=seed,
        )
        # Every setting is checked up front, also ones no group ends up using.
        validate_group({**PROJECTION_DEFAULTS, **frugal_group({"params": [], "is_proj_params": True}, defaults),
                        "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "eps_style": eps_style},
                       allow_empty_subspace=True)
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [frugal_group(g, defaults) for g in params]
        else:
            # A flat list: its matrices get the state-full subspace, everything else plain AdamW
            # (FRUGAL leaves norms, biases and vectors to AdamW too).
            matrices = [p for p in params if p.dim() == 2]
            groups = [g for g in (frugal_group({"params": matrices, "is_proj_params": True}, defaults),
                                  {"params": [p for p in params if p.dim() != 2]}) if g["params"]]
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eps_style=eps_style,
                         fused=fused, allow_empty_subspace=True, check_finite=check_finite)


class FrugalLion(FrugalAdamW):
    """FRUGAL with Lion (Chen et al., 2023, arXiv:2302.06675) as the state-full rule of the projected part:
    ``sign(b1 m + (1 - b1) R)``, one momentum m in the subspace, no bias correction (``rules.lion``), as the
    authors' ``frugal/lion.py``. Defaults are theirs: lr 1e-4, betas (0.9, 0.99), no weight decay."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, inner="lion", **kwargs)


class FrugalSGD(FrugalAdamW):
    """FRUGAL with SGD with momentum as the state-full rule of the projected part (``rules.sgd``), as the
    authors' ``frugal/sgd.py``: ``momentum`` 0.9 (0 keeps no state), ``dampening``, ``nesterov``,
    ``sign_update``. Defaults: lr 1e-3, no weight decay."""

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs: Any):
        super().__init__(params, lr=lr, weight_decay=weight_decay, inner="sgd", **kwargs)
