"""Parameter groups for projected optimizers, as transformers' ``optim_target_modules`` does.

    from scrimp.optim import param_groups, GaLoreAdamW
    opt = GaLoreAdamW(param_groups(model, rank=128, update_proj_gap=200, scale=0.25))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn


def _output_head_ids(model: nn.Module) -> set[int]:
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        if head is not None and getattr(head, "weight", None) is not None:
            heads.add(id(head.weight))
    return heads


def param_groups(model: nn.Module, target_modules: str | Sequence[str] = "all-linear",
                 **projection_kwargs: Any) -> list[dict]:
    """Split ``model``'s trainable parameters into a projected group and a plain group.

    ``target_modules="all-linear"`` projects the weight of every ``nn.Linear`` except the output
    head (``lm_head`` / ``get_output_embeddings()``); embeddings, norms and biases stay plain.
    A list of regular expressions selects ``nn.Linear`` modules whose qualified name matches
    (``re.search``). ``projection_kwargs`` (rank, update_proj_gap, scale, proj_type, density, ...)
    go into the projected group. Empty groups are left out.
    """
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    if not isinstance(target_modules, str):
        try:
            patterns = [re.compile(t) for t in target_modules]
        except (TypeError, re.error) as err:
            raise ValueError(f"target_modules must be 'all-linear' or a list of regular expressions ({err})") from err
    heads = _output_head_ids(model)
    projected, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
            continue
        if target_modules == "all-linear":
            chosen = id(module.weight) not in heads and name.split(".")[-1] != "lm_head"
        else:
            chosen = any(p.search(name) for p in patterns)
        if chosen and id(module.weight) not in seen:
            seen.add(id(module.weight))
            projected.append(module.weight)
    if not projected:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear weight of the model")
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [{"params": projected, **projection_kwargs}]
    if plain:
        groups.append({"params": plain})
    return groups
