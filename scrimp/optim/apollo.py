"""APOLLO and APOLLO-Mini as configurations of the subspace engine (Zhu et al., MLSys 2025, arXiv:2412.05270).

APOLLO is a composition of parts plus only its own math (``scrimp.optim.rules.apollo``):

    projector "gaussian"  APOLLO's seeded N(0, 1/r) random projection (``apollo_projection``), redrawn
                          every update_proj_gap steps, on the smaller side (``proj_type="std"``)
    inner rule "adam"     Adam on the projected gradient R, eps added to sqrt(v) (``eps_style="hf"``)
    output rule "apollo"  the raw gradient scaled channel-wise (APOLLO) or tensor-wise (APOLLO-Mini) by
                          ||N|| / ||R||, then Fira's norm-growth limiter (``ApolloScaling``)
    residual              none (the scaled gradient is already a full-size update)

Drop-in for ``apollo_torch.APOLLOAdamW`` (PyPI ``apollo-torch``; HF Transformers' ``optim="apollo_adamw"``):
the same param-group format, whose groups without ``rank`` are plain AdamW,

    {'params': [...], 'rank': 256, 'proj': 'random', 'scale_type': 'channel', 'scale': 1,
     'update_proj_gap': 200, 'proj_type': 'std'}

    from scrimp.optim import param_groups
    from scrimp.optim.apollo import ApolloAdamW, ApolloMiniAdamW
    opt = ApolloMiniAdamW(param_groups(model), lr=1e-2)          # rank 1, tensor-wise, scale 128

apollo-torch's keys become the engine's: ``proj`` -> ``projector`` ("random" -> "gaussian", "svd" ->
GaLore's "svd"), ``scale_type`` -> ``apollo_mode``, and ``scale`` -> ``scale = sqrt(scale)``: apollo-torch
multiplies the update by the square root of its ``scale`` (its README's sweeps are over sqrt(1), sqrt(2),
... for that reason), the engine by ``scale`` itself. Each projected parameter's first projection seed is
its 1-based position among all parameters (apollo-torch's numbering) plus ``seed``, so with ``seed=0`` the
projections are apollo-torch's on the same device.

Differences from apollo-torch, on purpose: weight decay is decoupled and applied before the update
(``torch.optim.AdamW`` order; apollo-torch decays the updated weight, W <- (W - lr u)(1 - lr wd), which
differs by lr^2 wd u per step); the state dict holds only tensors and numbers; ``scale_front`` is not
offered (the limiter compares norms, so scaling before or after it differs only through its 1e-8 guard);
a projected group added after construction (``add_param_group``) is translated and numbered like the
others, continuing the count (apollo-torch numbers only its constructor's groups and fails on a later one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from scrimp.checks import check_number

from .rules.apollo import FIRA_GAMMA, apollo_base_seed, check_apollo_settings
from .subspace import SubspaceAdamW

# apollo-torch's projector names -> the engine's projector kinds
APOLLO_PROJECTORS = {"random": "gaussian", "svd": "svd"}
# Engine names a user might pass by habit; in an APOLLO group they would silently lose to apollo-torch's.
_ENGINE_NAMES = {"projector": "proj", "apollo_mode": "scale_type", "output": None, "inner": None, "residual": None}


def apollo_group(group: dict, defaults: dict[str, Any]) -> dict:
    """Translate one apollo-torch-style param group into the engine's keys (groups without rank pass through)."""
    group = dict(group)
    if group.get("rank") is None:
        group.pop("rank", None)
        return group
    clash = sorted(set(group) & set(_ENGINE_NAMES))
    if clash:
        raise ValueError(f"APOLLO groups take apollo-torch's names (proj, scale_type, scale), not the engine's {clash}; "
                         "use SubspaceAdamW with output='apollo' to compose the parts by hand")
    merged = {**defaults, **group}
    proj = merged.pop("proj")
    if proj not in APOLLO_PROJECTORS:
        raise ValueError(f"proj must be one of {tuple(APOLLO_PROJECTORS)}, got {proj!r}")
    scale = merged.pop("scale")
    check_number("scale", scale, low=0)
    mode = merged.pop("scale_type")
    check_apollo_settings(mode, merged["norm_growth_limit"], mode_name="scale_type")
    # Random projections cost no SVD, so refreshes need no staggering; keeping the moments across a
    # refresh is apollo-torch's behaviour.
    return {**merged, "projector": APOLLO_PROJECTORS[proj], "apollo_mode": mode, "scale": math.sqrt(scale),
            "inner": "adam", "output": "apollo", "residual": None, "stagger": False, "moment_policy": "keep"}


class ApolloAdamW(SubspaceAdamW):
    """APOLLO (channel-wise scaling) on the groups that carry ``rank``; AdamW on the others.

    Defaults are apollo-torch's: lr 1e-3, betas (0.9, 0.999), eps 1e-6 added to sqrt(v) (HF AdamW), no
    weight decay; group defaults rank 256 (its README's choice for 1B and 7B models), update_proj_gap 200,
    scale 1, scale_type "channel", proj "random", proj_type "std", and Fira's ``norm_growth_limit`` 1.01
    (None turns the limiter off, apollo-torch's ``disable_nl``). ``params`` are param groups or a flat list,
    whose 2-D tensors then form one APOLLO group; ``add_param_group`` takes the same format. ``check_finite``
    (default True): ``step()`` raises before any change when a gradient holds inf or NaN.
    """

    setting_names = {"projector": "proj", "apollo_mode": "scale_type"}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        rank: int = 256,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        scale_type: str = "channel",
        proj: str = "random",
        proj_type: str = "std",
        norm_growth_limit: float | None = FIRA_GAMMA,
        seed: int = 0,
        check_finite: bool = True,
    ):
        if correct_bias is not True:
            raise ValueError("correct_bias must be True: ApolloAdamW always applies Adam's bias correction")
        self._apollo_defaults = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, scale_type=scale_type,
                                     proj=proj, proj_type=proj_type, norm_growth_limit=norm_growth_limit, seed=seed)
        apollo_group({"params": [], "rank": rank}, self._apollo_defaults)  # every setting is checked, also unused ones
        params = list(params)
        if not (params and isinstance(params[0], dict)):
            params = [g for g in ({"params": [p for p in params if p.dim() == 2], "rank": rank},
                                  {"params": [p for p in params if p.dim() != 2]}) if g["params"]]
        # torch's constructor adds each group through add_param_group, which translates it.
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eps_style="hf",
                         check_finite=check_finite)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group in apollo-torch's format (``apollo_group``), also after construction, as Lightning's
        finetuning callbacks do. Its projected parameters continue apollo-torch's seed numbering: a
        parameter's position counts every parameter of the groups before it."""
        if not isinstance(param_group, dict):
            param_group = {"params": param_group}
        earlier = sum(len(group["params"]) for group in self.param_groups)
        super().add_param_group(apollo_group(param_group, self._apollo_defaults))
        self._number_projections(self.param_groups[-1], earlier)

    def _number_projections(self, group: dict, earlier: int) -> None:
        """apollo-torch's seeds: each projected parameter's 1-based position among all parameters (``earlier``
        come before ``group``), plus the group's ``seed``, kept in its state as the projector's seed
        (``rules.apollo.apollo_seed`` walks it forward at each refresh)."""
        if group.get("output") != "apollo":
            return
        for position, p in enumerate(group["params"], start=earlier + 1):
            self.state[p].setdefault("proj_seed", apollo_base_seed(position, group["seed"]))


class ApolloMiniAdamW(ApolloAdamW):
    """APOLLO-Mini: a rank-1 auxiliary space and one tensor-wise scaling factor per matrix (SGD-like memory).

    apollo-torch's README defaults for it: rank 1, scale_type "tensor", scale 128 (the update is multiplied
    by sqrt(128); its authors suggest trying larger values for larger models). Everything else as
    ``ApolloAdamW``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int = 1, scale: float = 128.0,
                 scale_type: str = "tensor", **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, scale=scale,
                         scale_type=scale_type, **kwargs)
