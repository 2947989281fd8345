"""FRUGAL as a thin configuration of the subspace engine (Zmushko et al., 2025, arXiv:2411.07837).

FRUGAL splits each gradient into a state-full part (Adam on a subspace chosen by ``proj_type``)
and a state-free part (the residual, updated by signSGD or SGD). Hyper-parameters keep FRUGAL's
names and are translated to the engine's group keys:

    density / rank          -> size of the state-full subspace (``rank=0``: no state at all)
    update_gap              -> update_proj_gap
    proj_type               -> projector (svd/random/randperm/randk/rows/columns/blocks)
    inactive_update_rule    -> residual (sign_sgd/sgd/no)
    inactive_lr_scale       -> residual_lr_scale
    proj_params_lr_scale    -> scale
    reset_statistics        -> reset the moments at each subspace change

    from scrimp.optim import FrugalAdamW, param_groups
    opt = FrugalAdamW(param_groups(model, density=0.25), lr=1e-3, proj_type="randk")

Groups with ``density``, ``rank`` or ``is_proj_params=True`` are FRUGAL groups; others are AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .subspace import SubspaceAdamW

FRUGAL_PROJ_TYPES = ("svd", "random", "randperm", "randk", "rows", "columns", "blocks")
INACTIVE_RULES = {"sign_sgd": "sign_sgd", "sgd": "sgd", "no": None}
_RENAMES = {
    "update_gap": "update_proj_gap",
    "inactive_lr_scale": "residual_lr_scale",
    "proj_params_lr_scale": "scale",
}


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
    rule = merged.pop("inactive_update_rule")
    if rule not in INACTIVE_RULES:
        raise ValueError(f"inactive_update_rule must be one of {tuple(INACTIVE_RULES)}, got {rule!r}")
    merged["projector"] = proj_type
    merged["residual"] = INACTIVE_RULES[rule]
    merged["proj_type"] = merged.pop("proj_side")
    for old, new in _RENAMES.items():
        merged[new] = merged.pop(old)
    return merged


class FrugalAdamW(SubspaceAdamW):
    """FRUGAL with AdamW as the state-full optimizer and signSGD/SGD for the state-free residual.

    ``density`` in (0, 1] is the fraction of directions (entries for randk, parameters for
    blocks) that keep Adam state; ``density=1`` is AdamW. ``rank`` gives the size directly;
    ``rank=0`` keeps no state (pure signSGD/SGD on the group). ``proj_side`` is GaLore's side
    rule (std/reverse_std/left/right) for svd/random/randperm.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
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
        stagger: bool = True,
        seed: int = 0,
        fused: bool | None = None,
    ):
        defaults = dict(
            density=None if rank is not None else density, rank=rank, update_gap=update_gap, proj_type=proj_type,
            inactive_update_rule=inactive_update_rule, inactive_lr_scale=inactive_lr_scale,
            proj_params_lr_scale=proj_params_lr_scale, reset_statistics=reset_statistics, proj_side=proj_side,
            stagger=stagger, seed=seed,
        )
        frugal_group({"params": [], "is_proj_params": True}, defaults)  # validate the FRUGAL names up front
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [frugal_group(g, defaults) for g in params]
        else:
            groups = [{"params": params}]
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused,
                         allow_empty_subspace=True)
