"""Build an optimizer from a plain dict or Hydra config by name.

    from scrimp.optim import build
    opt = build({"name": "galore", "lr": 1e-2, "rank": 128, "update_proj_gap": 200, "scale": 0.25}, model)

Names: adamw (torch.optim.AdamW), adamw8bit (bitsandbytes AdamW8bit), galore, galore8bit, frugal,
frugal_lion, frugal_sgd, apollo, apollo_mini, natural_galore (scrimp), zo_sgd / zo_adam
(``scrimp.optim.zeroth_order``, resolved lazily). ``target_modules`` ("all-linear" or regexes) picks the projected
weights; ``layerwise=True`` wraps the optimizer in ``scrimp.optim.layerwise`` with ``accumulate`` micro-batches;
``offload="cpu"|"disk"`` wraps it in ``scrimp.optim.offload.OffloadedOptimizer`` (the moments live in host memory or
in files under ``offload_path``, ``offload_prefetch`` states read ahead). Keys set to None count as absent.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from .groups import param_groups
from .layerwise import layerwise as make_layerwise

COMMON_KEYS = ("lr", "weight_decay", "betas", "eps")
WRAPPER_KEYS = ("layerwise", "accumulate", "clip_grad_norm", "offload", "offload_path", "offload_prefetch")
OFFLOAD_TIERS = ("cpu", "disk")
# OffloadedOptimizer drives the SubspaceAdamW engine's stages; these optimizers are not built on it.
NOT_OFFLOADABLE = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes AdamW8bit"}
GALORE_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "projector", "stagger", "seed", "sign_rule",
                     "moment_policy")
GALORE_KEYS = ("target_modules", "eps_style")
FRUGAL_GROUP_KEYS = ("density", "rank")
FRUGAL_KEYS = ("update_gap", "proj_type", "inactive_update_rule", "inactive_lr_scale", "proj_params_lr_scale",
               "reset_statistics", "proj_side", "block_order", "stagger", "seed", "eps_style")
# apollo-torch's Adam adds eps to sqrt(v) (HF style) only, so there is no eps_style.
APOLLO_KEYS = ("rank", "update_proj_gap", "scale", "scale_type", "proj", "proj_type", "norm_growth_limit", "seed",
               "target_modules")
ALLOWED: dict[str, tuple[str, ...]] = {
    "adamw": COMMON_KEYS + ("fused", "foreach", "amsgrad"),
    "adamw8bit": COMMON_KEYS,
    "galore": COMMON_KEYS + GALORE_GROUP_KEYS + GALORE_KEYS + ("fused",),
    "galore8bit": COMMON_KEYS + GALORE_GROUP_KEYS + GALORE_KEYS,
    "frugal": COMMON_KEYS + FRUGAL_GROUP_KEYS + FRUGAL_KEYS + ("target_modules", "fused"),
    "frugal_lion": COMMON_KEYS + FRUGAL_GROUP_KEYS + FRUGAL_KEYS + ("target_modules",),
    "frugal_sgd": COMMON_KEYS + FRUGAL_GROUP_KEYS + FRUGAL_KEYS + ("target_modules", "momentum", "dampening",
                                                                    "nesterov", "sign_update"),
    "natural_galore": COMMON_KEYS + GALORE_GROUP_KEYS + GALORE_KEYS + ("natural_history", "natural_damping"),
    "apollo": COMMON_KEYS + APOLLO_KEYS,
    "apollo_mini": COMMON_KEYS + APOLLO_KEYS,
}
# name -> (module:class, the group's default rank): APOLLO's README rank for 1B/7B models; APOLLO-Mini is rank 1.
APOLLO_CLASSES = {"apollo": ("scrimp.optim.apollo:ApolloAdamW", 256),
                  "apollo_mini": ("scrimp.optim.apollo:ApolloMiniAdamW", 1)}
ZEROTH_ORDER = {"zo_sgd": "scrimp.optim.zeroth_order:ZOSGD", "zo_adam": "scrimp.optim.zeroth_order:ZOAdam"}
# MeZO's zo_update (Malladi et al., 2023, large_models/trainer.py) decays no parameter whose name holds these.
MEZO_NO_DECAY = ("bias", "layer_norm", "layernorm")
KNOWN_NAMES = tuple(ALLOWED) + tuple(ZEROTH_ORDER)


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is optional for users who pass dicts
        pass
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a dict or DictConfig with a 'name' key, got {type(cfg).__name__}")
    return {k: (tuple(v) if k == "betas" else v) for k, v in cfg.items() if v is not None}


def resolve(spec: str):
    """Import ``'module.path:Attr'``."""
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def build(cfg: Any, model: nn.Module):
    """An optimizer for ``model`` from ``cfg`` (``name`` plus keyword arguments); see the module doc."""
    cfg = _plain(cfg)
    name = cfg.pop("name", None)
    if name not in KNOWN_NAMES:
        raise ValueError(f"optimizer name must be one of {list(KNOWN_NAMES)}, got {name!r}")
    wrap = {k: cfg.pop(k) for k in WRAPPER_KEYS if k in cfg}
    use_layerwise = bool(wrap.get("layerwise", False))
    accumulate = wrap.get("accumulate", 1)
    if not use_layerwise and accumulate != 1:
        raise ValueError(f"accumulate={accumulate} applies only with layerwise=True; for ordinary training use the "
                         "trainer's accumulate_grad_batches")
    if not use_layerwise and "clip_grad_norm" in wrap:
        raise ValueError("clip_grad_norm is only read with layerwise=True (where it is refused); set gradient "
                         "clipping on the trainer instead")
    offload = offload_options(name, wrap)
    if name in ZEROTH_ORDER:
        if use_layerwise:
            raise ValueError(f"layerwise=True does not apply to {name}: zeroth-order optimizers run no backward")
        cls = resolve(ZEROTH_ORDER[name])
        try:
            return cls(zeroth_order_groups(model, cfg.get("weight_decay", 0.0)), **cfg)
        except TypeError as err:
            raise ValueError(f"bad arguments for optimizer {name!r}: {err}") from err
    extra = sorted(set(cfg) - set(ALLOWED[name]))
    if extra:
        raise ValueError(f"optimizer {name!r} does not take {extra}; allowed keys are "
                         f"{sorted(ALLOWED[name] + WRAPPER_KEYS)}")
    groups, factory = _groups_and_factory(name, cfg, model)
    if use_layerwise:
        return make_layerwise(model, factory, accumulate, clip_grad_norm=wrap.get("clip_grad_norm"), groups=groups)
    if offload is not None:
        from .offload import OffloadedOptimizer

        return OffloadedOptimizer(factory(groups), **offload)
    return factory(groups)


def offload_options(name: str, wrap: dict) -> dict | None:
    """``OffloadedOptimizer``'s keyword arguments from the wrapper keys, or None without ``offload``.

    Refuses, in one sentence each and before anything is built: a tier other than cpu/disk, the
    disk tier without ``offload_path`` (or with an empty one), ``offload_path``/``offload_prefetch``
    without the disk tier that reads them (null or cpu), and the optimizers the wrapper cannot drive
    (torch AdamW, bitsandbytes AdamW8bit, zeroth-order, layer-wise).
    """
    tier, path, prefetch = wrap.get("offload"), wrap.get("offload_path"), wrap.get("offload_prefetch")
    if tier is None:
        given = [key for key in ("offload_path", "offload_prefetch") if key in wrap]
        if given:
            raise ValueError(f"{given[0]} applies only with offload='disk' (offload is null), got {wrap[given[0]]!r}")
        return None
    if tier not in OFFLOAD_TIERS:
        raise ValueError(f"offload must be one of {list(OFFLOAD_TIERS)} or null (where the optimizer state lives "
                         f"between steps), got {tier!r}")
    _check_disk_keys(tier, path, prefetch)
    _refuse_not_offloadable(name, bool(wrap.get("layerwise", False)), tier)
    options = {"tier": tier, "path": path}
    if prefetch is not None:
        options["prefetch"] = prefetch
    return options


def _check_disk_keys(tier: str, path: Any, prefetch: Any) -> None:
    """``offload_path`` and ``offload_prefetch`` belong to the disk tier: required/valid there, refused with cpu."""
    if tier == "disk" and not path:
        got = "an empty path" if isinstance(path, str) else repr(path)
        raise ValueError(f"offload_path must name a directory for the state files with offload='disk', got {got}")
    if tier == "cpu":
        given = [(key, value) for key, value in (("offload_path", path), ("offload_prefetch", prefetch))
                 if value is not None]
        if given:
            key, value = given[0]
            raise ValueError(f"{key} applies only with offload='disk' (offload='cpu' keeps the state in memory and "
                             f"reads nothing ahead), got {value!r}")
    if prefetch is not None and (not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0):
        raise ValueError(f"offload_prefetch must be an integer >= 0 (states the disk tier reads ahead), got "
                         f"{prefetch!r}")


def _refuse_not_offloadable(name: str, use_layerwise: bool, tier: str) -> None:
    if name in NOT_OFFLOADABLE:
        raise ValueError(f"offload={tier!r} does not apply to {name}: the offloaded optimizer wraps scrimp's "
                         f"SubspaceAdamW family (galore, frugal, apollo, ...), not {NOT_OFFLOADABLE[name]}; use "
                         "another optimizer or offload=null")
    if name in ZEROTH_ORDER:
        raise ValueError(f"offload={tier!r} does not apply to {name}: zeroth-order optimizers keep at most a "
                         "momentum buffer (scrimp.optim.offload.stream streams their parameters instead); use "
                         "offload=null")
    if use_layerwise:
        raise ValueError(f"offload={tier!r} does not work with layerwise=True yet: the layer-wise backward hooks "
                         "do not step through a tier; set one of them to null/false")


def zeroth_order_groups(model: nn.Module, weight_decay: float) -> list:
    """The trainable parameters, with MeZO's weight-decay exemption when there is weight decay.

    Without weight decay they stay one list. With it, parameters whose names hold "bias",
    "layer_norm" or "layernorm" get none: consecutive runs of decayed and exempt parameters become
    groups, so the parameters keep their model order, which keys each perturbation.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not weight_decay or isinstance(weight_decay, bool) or not any(k in n for n, _ in named for k in MEZO_NO_DECAY):
        return [p for _, p in named]
    groups: list[dict] = []
    for name, param in named:
        exempt = any(key in name for key in MEZO_NO_DECAY)
        if not groups or groups[-1]["exempt"] != exempt:
            groups.append({"params": [], "exempt": exempt})
        groups[-1]["params"].append(param)
    return [{"params": g["params"], **({"weight_decay": 0.0} if g["exempt"] else {})} for g in groups]


def _groups_and_factory(name: str, cfg: dict, model: nn.Module):
    target = cfg.pop("target_modules", "all-linear")
    if name == "adamw":
        return [{"params": [p for p in model.parameters() if p.requires_grad]}], \
            lambda groups: torch.optim.AdamW(groups, **cfg)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return [{"params": [p for p in model.parameters() if p.requires_grad]}], \
            lambda groups: bnb.optim.AdamW8bit(groups, **cfg)
    if name in ("galore", "galore8bit", "natural_galore"):
        from .galore import GaLoreAdamW, GaLoreAdamW8bit
        from .natural_galore import NaturalGaLoreAdamW

        group_kwargs = {k: cfg.pop(k) for k in GALORE_GROUP_KEYS if k in cfg}
        group_kwargs.setdefault("rank", 128)
        group_kwargs.setdefault("update_proj_gap", 200)
        group_kwargs.setdefault("scale", 0.25)
        group_kwargs.setdefault("proj_type", "std")
        cls = {"galore": GaLoreAdamW, "galore8bit": GaLoreAdamW8bit, "natural_galore": NaturalGaLoreAdamW}[name]
        return param_groups(model, target, **group_kwargs), lambda groups: cls(groups, **cfg)
    if name in APOLLO_CLASSES:
        spec, default_rank = APOLLO_CLASSES[name]
        cls = resolve(spec)
        return param_groups(model, target, rank=cfg.pop("rank", default_rank)), lambda groups: cls(groups, **cfg)
    from .frugal import FrugalAdamW, FrugalLion, FrugalSGD

    cls = {"frugal": FrugalAdamW, "frugal_lion": FrugalLion, "frugal_sgd": FrugalSGD}[name]
    group_kwargs = {k: cfg.pop(k) for k in FRUGAL_GROUP_KEYS if k in cfg}
    if not group_kwargs:
        group_kwargs["density"] = 0.25
    return param_groups(model, target, **group_kwargs), lambda groups: cls(groups, **cfg)
