"""Parameter groups for projected optimizers, as transformers' ``optim_target_modules`` does.

    from scrimp.optim import param_groups, GaLoreAdamW
    opt = GaLoreAdamW(param_groups(model, rank=128, update_proj_gap=200, scale=0.25))

Projectable modules are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT,
...), whose weight is stored transposed: (in, out) instead of ``nn.Linear``'s (out, in). The
weight is projected as stored, as galore-torch does when its groups are built by name. GaLore's
side rule ``proj_type="std"`` (and ``"reverse_std"``) gives the same subspace either way round,
because the projection of a transposed gradient is the transpose of the projection, except for a
square weight, where the tie goes to the stored matrix's right side. ``proj_type="left"`` /
``"right"`` name a side of the stored matrix: for a ``Conv1D`` "left" is the input dimension,
for an ``nn.Linear`` the output dimension.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

ALL_LINEAR = "all-linear"


def _output_head_ids(model: nn.Module) -> set[int]:
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        if head is not None and getattr(head, "weight", None) is not None:
            heads.add(id(head.weight))
    return heads


def _projectable_types() -> tuple[type, ...]:
    """``nn.Linear`` and, when transformers is already imported, its ``Conv1D``.

    Read from ``sys.modules`` rather than imported: a transformers model has loaded it already, and
    the optimizers must not pull in transformers for a plain torch model.
    """
    kinds: tuple[type, ...] = (nn.Linear,)
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    if isinstance(conv1d, type):
        kinds += (conv1d,)
    return kinds


def _is_all_linear(target_modules: Any) -> bool:
    # transformers accepts "all_linear" too (it compares after replacing "_" with "-")
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == ALL_LINEAR


def _compile_targets(target_modules: str | Sequence[str]) -> list[tuple[str, re.Pattern]]:
    """(entry, compiled pattern) per entry; one sentence for anything that is not a list of strings."""
    entries = [target_modules] if isinstance(target_modules, str) else target_modules
    try:
        entries = list(entries)
    except TypeError:
        entries = None
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"target_modules must be 'all-linear' or a non-empty list of module-name patterns "
                         f"(non-empty strings), got {target_modules!r}")
    compiled = []
    for entry in entries:
        try:
            compiled.append((entry, re.compile(entry)))
        except re.error as err:
            raise ValueError(f"target_modules entry {entry!r} is not a valid regular expression ({err})") from err
    return compiled


def _name_matches(name: str, targets: list[tuple[str, re.Pattern]]) -> bool:
    """transformers' ``check_target_module_exists`` rules (the exact name, a literal substring, or a
    regular expression that ``re.fullmatch``es the qualified name), plus ``re.search`` anywhere in the
    name, which scrimp has accepted from the start: every module transformers' rules select is selected."""
    return any(entry in name or pattern.search(name) is not None for entry, pattern in targets)


def param_groups(model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR,
                 *, optim_target_modules: str | Sequence[str] | None = None,
                 **projection_kwargs: Any) -> list[dict]:
    """Split ``model``'s trainable parameters into a projected group and a plain group.

    ``target_modules="all-linear"`` projects the weight of every ``nn.Linear`` and transformers
    ``Conv1D`` except the output head (``lm_head`` / ``get_output_embeddings()``); embeddings, norms
    and biases stay plain. A pattern or list of patterns selects those modules by qualified name
    (``"c_attn"``, ``[r".*\\.attn\\.c_attn", "mlp"]``): an entry selects a module when it is a
    substring of its name or a regular expression found in it, so every name transformers'
    ``optim_target_modules`` rules select (exact, substring, ``re.fullmatch``) is selected here.
    ``projection_kwargs`` (rank, update_proj_gap, scale, proj_type, density, ...) go into the
    projected group; weights are projected as stored (module docstring: ``Conv1D`` orientation).
    Empty groups are left out. ``optim_target_modules`` is transformers' spelling of
    ``target_modules`` (``TrainingArguments.optim_target_modules``), accepted so HF recipes carry over.
    """
    if optim_target_modules is not None:
        if target_modules is not ALL_LINEAR:
            raise ValueError("param_groups got both target_modules and optim_target_modules; give one of them")
        target_modules = optim_target_modules
    all_linear = _is_all_linear(target_modules)
    targets = [] if all_linear else _compile_targets(target_modules)
    kinds = _projectable_types()
    heads = _output_head_ids(model)
    projected, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or not module.weight.requires_grad:
            continue
        if all_linear:
            chosen = id(module.weight) not in heads and name.split(".")[-1] != "lm_head"
        else:
            chosen = _name_matches(name, targets)
        if chosen and id(module.weight) not in seen:
            seen.add(id(module.weight))
            projected.append(module.weight)
    if not projected:
        conv = " (nor a transformers Conv1D)" if len(kinds) > 1 else ""
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear weight of the model{conv}")
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [{"params": projected, **projection_kwargs}]
    if plain:
        groups.append({"params": plain})
    return groups
