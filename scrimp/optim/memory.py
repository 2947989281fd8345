"""Exact optimizer-state bytes by category: moments, projectors, other.

    from scrimp.optim.memory import state_bytes
    state_bytes(opt)  # {'moments': ..., 'projectors': ..., 'other': ..., 'total': ...}

Counts every tensor reachable from ``optimizer.state`` (nested lists/dicts included), each
distinct tensor once. Keys starting with ``exp_avg``/``momentum`` (and bitsandbytes'
``state1``/``state2``/``absmax1``/``absmax2``) are moments, keys starting with ``proj`` are
projectors, the rest (step tensors, accumulation buffers, quantization maps) is other.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

MOMENT_PREFIXES = ("exp_avg", "momentum", "state1", "state2", "absmax1", "absmax2", "max_exp_avg_sq")
PROJECTOR_PREFIXES = ("proj",)


def category(key: Any) -> str:
    """The category of a state key."""
    key = str(key)
    if key.startswith(MOMENT_PREFIXES):
        return "moments"
    if key.startswith(PROJECTOR_PREFIXES):
        return "projectors"
    return "other"


def _tensors(value: Any):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def state_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes of the tensors held in ``optimizer.state`` by category, plus ``total``."""
    totals = {"moments": 0, "projectors": 0, "other": 0}
    seen: set[tuple[int, int, tuple]] = set()
    for per_param in optimizer.state.values():
        items = per_param.items() if isinstance(per_param, dict) else [("other", per_param)]
        for key, value in items:
            for t in _tensors(value):
                ident = (t.data_ptr(), t.element_size(), tuple(t.shape)) if t.numel() else (id(t), 0, ())
                if ident in seen:
                    continue
                seen.add(ident)
                totals[category(key)] += t.numel() * t.element_size()
    totals["total"] = sum(totals.values())
    return totals
