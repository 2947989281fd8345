"""What a scrimp optimizer checks in a state dict before ``load_state_dict`` replaces anything.

``torch.optim.Optimizer.load_state_dict`` checks only the number of groups and of parameters per
group. Everything else is trusted, and a wrong state fails late or not at all: a moment of another
shape goes into ``torch._fused_adamw_``, which writes out of bounds; another algorithm's state is
taken over silently (GaLore's into FRUGAL, rank 2 into a rank-3 optimizer). So every scrimp
optimizer runs ``check_loadable`` first, in this order, and stops at the first mismatch with one
sentence that names both values:

1. the class that wrote the state (a tag that ``tag_state_dict`` adds to every saved group; for
   state dicts written before the tag existed, the class is inferred from their keys);
2. the group structure: number of groups and of parameters per group;
3. each group's settings that decide what the state means (``settings`` of the optimizer);
4. every state tensor's logical shape against what its parameter and settings imply (the
   optimizer's ``state_spec``). ``Tensor.shape`` of a DTensor is its global shape, so state saved
   from another device, tier or world size is compared unsharded and loads.

The optimizer-specific part (which settings, which shapes) lives with each optimizer; the rule,
the order and the wording live here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

CLASS_TAG = "scrimp_optimizer"  # a key in every saved param group; torch's loader keeps unknown group keys
SCRIMP_FIRST_ORDER = ("SubspaceAdamW", "GaLoreAdamW", "GaLoreAdamW8bit", "FrugalAdamW")
SCRIMP_ZEROTH_ORDER = ("ZOSGD", "ZOAdam")
# Keys of scrimp's first-order per-parameter state that torch's own optimizers never write.
_SCRIMP_STATE_KEYS = ("moment_step", "proj_P", "proj_index", "proj_refresh", "proj_seed", "proj_offset",
                      "block_cycle", "exp_avg_q", "exp_avg_sq_q")


@dataclass(frozen=True)
class Expect:
    """What one state entry of one parameter must be, if present (``absent``: must not be there).

    ``shape`` is the logical shape; ``integer`` asks for a Python int (counters); ``below`` bounds
    the values of an index tensor; ``why`` says where the expectation comes from, for the message.
    """

    shape: tuple[int, ...] | None = None
    integer: bool = False
    absent: bool = False
    below: int | None = None
    why: str = ""


class StateDictMismatch(ValueError):
    """A state dict that does not fit the optimizer it is loaded into (raised before anything changes)."""


def tag_state_dict(state_dict: dict, optimizer) -> dict:
    """``state_dict`` with the writing class's name in every param group (the dicts are torch's copies)."""
    for group in state_dict["param_groups"]:
        group[CLASS_TAG] = type(optimizer).__name__
    return state_dict


def untag_groups(groups: Iterable[dict]) -> list[dict]:
    """Saved groups without the class tag, so that it never becomes a live group key."""
    return [{k: v for k, v in group.items() if k != CLASS_TAG} for group in groups]


def describe(group_index: int, param_index: int, param: Tensor) -> str:
    return f"parameter {param_index} of group {group_index} (shape {tuple(param.shape)})"


def refuse(optimizer, message: str) -> None:
    raise StateDictMismatch(f"cannot load this state dict into {type(optimizer).__name__}: {message}")


# -- 1. the class -------------------------------------------------------------------------------------
def _torch_adam_name(groups: Sequence[dict]) -> str:
    decoupled = {g.get("decoupled_weight_decay") for g in groups}
    if decoupled == {True}:
        return "torch.optim.AdamW"
    if decoupled == {False}:
        return "torch.optim.Adam"
    return "torch.optim.AdamW (or Adam)"


def infer_writer(state_dict: Mapping) -> tuple[tuple[str, ...], str] | None:
    """(classes that may have written an untagged state dict, the evidence), or None if nothing tells.

    State dicts written before the tag existed are recognized by their keys: a ``zo`` entry is a
    zeroth-order optimizer's (with moments: ZOAdam); ``moment_step``, ``proj_*`` or projected
    groups are scrimp's, where 8-bit moments exclude the fp32 classes and a residual rule in a
    projected group excludes GaLore (FRUGAL-like); ``exp_avg`` without ``moment_step`` is torch's
    Adam/AdamW. The candidates are deliberately broad (SubspaceAdamW can write anything the
    others write): the settings and shape checks that follow catch what the keys cannot tell.
    """
    groups = list(state_dict.get("param_groups", []))
    states = [s for s in state_dict.get("state", {}).values() if isinstance(s, Mapping)]
    keys = set().union(*(s.keys() for s in states)) if states else set()
    if "zo" in state_dict:
        if "exp_avg" in keys:
            return ("ZOAdam",), "a zeroth-order state with Adam moments"
        zo = state_dict["zo"]
        if isinstance(zo, Mapping) and zo.get("steps") and states:  # ZOAdam has moments after its first step
            return ("ZOSGD",), "a zeroth-order state without moments after steps"
        return SCRIMP_ZEROTH_ORDER, "a zeroth-order state"
    projected = [g for g in groups if g.get("rank") is not None or g.get("density") is not None]
    if keys & set(_SCRIMP_STATE_KEYS) or projected or any("eps_style" in g for g in groups):
        candidates = list(SCRIMP_FIRST_ORDER)
        evidence = ["scrimp's per-parameter keys"]
        if "exp_avg_q" in keys:
            candidates = [c for c in candidates if c in ("GaLoreAdamW8bit", "SubspaceAdamW")]
            evidence.append("8-bit moments")
        if any(g.get("residual") is not None for g in projected):
            candidates = [c for c in candidates if c in ("FrugalAdamW", "SubspaceAdamW")]
            evidence.append(f"a residual rule ({next(g['residual'] for g in projected if g.get('residual'))!r})")
        return tuple(candidates), " with ".join(evidence)
    if "exp_avg" in keys:
        return (_torch_adam_name(groups),), "exp_avg and exp_avg_sq without moment_step"
    if keys:
        return ("another optimizer",), f"per-parameter keys {sorted(keys)}"
    return None


def check_class(optimizer, state_dict: Mapping) -> None:
    """Refuse state written by another optimizer class (tagged), or whose keys say so (untagged)."""
    tags = {g.get(CLASS_TAG) for g in state_dict.get("param_groups", [])}
    mine = type(optimizer).__name__
    tags.discard(None)
    if len(tags) > 1:
        refuse(optimizer, f"its param groups carry different class tags {sorted(tags)}")
    if tags:
        (tag,) = tags
        if tag != mine:
            refuse(optimizer, f"it was written by {tag}, not {mine}; load it into a {tag} with the same settings")
        return
    inferred = infer_writer(state_dict)
    if inferred is None:
        return
    candidates, evidence = inferred
    lineage = {cls.__name__ for cls in type(optimizer).__mro__}
    if not lineage & set(candidates):
        writers = " or ".join(candidates)
        refuse(optimizer, f"it carries no class tag and its keys ({evidence}) say it was written by {writers}, "
                         f"not {mine}")


# -- 2. the group structure -------------------------------------------------------------------------
def check_structure(optimizer, saved_groups: Sequence[Mapping]) -> None:
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        refuse(optimizer, f"the state dict has {len(saved_groups)} param group(s), this optimizer {len(groups)}")
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            refuse(optimizer, f"group {index} of the state dict holds {len(saved['params'])} parameter(s), this "
                             f"optimizer's group {index} holds {len(group['params'])}")


# -- 3. the settings --------------------------------------------------------------------------------
def check_settings(optimizer, saved_groups: Sequence[Mapping], settings: Callable[[Mapping], dict]) -> None:
    """``settings(group)`` gives the values of a group that must be equal on both sides."""
    for index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        theirs, ours = settings(saved), settings(group)
        # In the settings' own order, not a set's: the sentence must name the same key on every run.
        for key in [*ours, *(k for k in theirs if k not in ours)]:
            if theirs.get(key) != ours.get(key):
                refuse(optimizer, f"group {index}'s {key} is {theirs.get(key)!r} in the state dict and "
                                 f"{ours.get(key)!r} in this optimizer; build the optimizer with the saved value to "
                                 "resume this state")


# -- 4. the state of every parameter ----------------------------------------------------------------
def _check_entry(optimizer, where: str, key: str, value: Any, expect: Expect) -> None:
    if expect.absent:
        refuse(optimizer, f"{where} has {key} in the state dict, but {expect.why}")
    if expect.integer:
        if not isinstance(value, int) or isinstance(value, bool):
            refuse(optimizer, f"{where} has {key} = {value!r:.60} in the state dict, expected an integer")
        return
    if not isinstance(value, Tensor):
        refuse(optimizer, f"{where} has {key} of type {type(value).__name__} in the state dict, expected a tensor")
    if expect.shape is not None and tuple(value.shape) != expect.shape:
        why = f" ({expect.why})" if expect.why else ""
        refuse(optimizer, f"{where} has {key} of shape {tuple(value.shape)} in the state dict, expected "
                         f"{expect.shape}{why}")
    if expect.below is not None and value.numel():
        low, high = int(value.min()), int(value.max())  # one read at load time, not per step
        if low < 0 or high >= expect.below:
            refuse(optimizer, f"{where} has {key} values in [{low}, {high}] in the state dict, expected indices in "
                             f"[0, {expect.below - 1}]")


def check_param_states(optimizer, state_dict: Mapping, saved_groups: Sequence[Mapping],
                       spec: Callable[[Tensor, dict], Mapping[str, Expect]]) -> None:
    """Each saved parameter state against ``spec(param, group)`` (keys it does not name pass)."""
    saved_state = state_dict.get("state", {})
    for gi, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        for pi, (pid, param) in enumerate(zip(saved["params"], group["params"])):
            state = saved_state.get(pid)
            if state is None:
                continue
            if not isinstance(state, Mapping):
                refuse(optimizer, f"{describe(gi, pi, param)} has a state of type {type(state).__name__}, "
                                 "expected a dict")
            expected = spec(param, group)
            for key, value in state.items():
                if key in expected:
                    _check_entry(optimizer, describe(gi, pi, param), key, value, expected[key])


def check_loadable(optimizer, state_dict: Mapping, saved_groups: Sequence[Mapping], *,
                   settings: Callable[[Mapping], dict],
                   spec: Callable[[Tensor, dict], Mapping[str, Expect]]) -> None:
    """All four checks, in order; raises ``StateDictMismatch`` (a ValueError) at the first mismatch.

    ``saved_groups`` are the state dict's groups as the optimizer will load them (with the keys
    added since older versions); nothing is modified here.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        refuse(optimizer, "it is not an optimizer state dict (it needs 'state' and 'param_groups' entries)")
    check_class(optimizer, state_dict)
    check_structure(optimizer, saved_groups)
    check_settings(optimizer, saved_groups, settings)
    check_param_states(optimizer, state_dict, saved_groups, spec)
