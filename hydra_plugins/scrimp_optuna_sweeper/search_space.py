"""Hydra override syntax -> Optuna distributions (pure functions, no Hydra state).

The official hydra-optuna-sweeper's mapping (Hydra 1.1+ sweep grammar), rewritten for Optuna >= 4:
``choice(a, b)`` / ``a,b`` -> ``CategoricalDistribution``; ``range(lo, hi, step)`` (hi exclusive, as
Python) -> ``IntDistribution``/``FloatDistribution`` with that step; ``interval(lo, hi)`` ->
``FloatDistribution`` (Hydra makes interval ends floats; ``int(interval(lo, hi))`` -> ``IntDistribution``);
the ``log`` tag -> ``log=True``.
A plain value is no search dimension: it is passed unchanged to every trial.

    space, fixed = search_space(["optim.lr=tag(log, interval(1e-4, 1e-1))", "optim.rank=choice(16, 32)"])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

try:  # optional: Hydra scans this module even when the `sweep` extra is not installed
    from optuna.distributions import (
        BaseDistribution,
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )
except ImportError:
    BaseDistribution = CategoricalDistribution = FloatDistribution = IntDistribution = None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def distribution_of(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (raises for a non-sweep override)."""
    value = override.value()
    key = override.get_key_element()
    log = "log" in getattr(value, "tags", set())
    if isinstance(value, ChoiceSweep):
        if log:
            raise ValueError(f"hydra.sweeper.params.{key}: the log tag applies to interval or range, not choice")
        return CategoricalDistribution([_categorical(v) for v in value.list])
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if step <= 0 or stop <= start:
            raise ValueError(f"hydra.sweeper.params.{key}: range needs start < stop and a positive step")
        last = start + step * (math.ceil((stop - start) / step) - 1)  # stop is exclusive, as in range()
        if _is_int(start) and _is_int(stop) and _is_int(step):
            if log and step != 1:
                raise ValueError(f"hydra.sweeper.params.{key}: a log range needs step 1 (Optuna)")
            return IntDistribution(int(start), int(last), log=log, step=int(step))
        if log:
            raise ValueError(f"hydra.sweeper.params.{key}: a float range cannot be log-scaled with a step; "
                             "use tag(log, interval(lo, hi))")
        return FloatDistribution(float(start), float(last), step=float(step))
    if isinstance(value, IntervalSweep):
        if value.start is None or value.end is None or not value.start < value.end:
            raise ValueError(f"hydra.sweeper.params.{key}: interval needs lo < hi")
        if _is_int(value.start) and _is_int(value.end):
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ValueError(f"hydra.sweeper.params.{key}={override.get_value_element_as_str()} is not a sweep")


def _categorical(v):
    """Optuna categoricals hold None, bool, int, float or str; other values travel as their string."""
    return v if v is None or isinstance(v, bool | int | float | str) else str(v)


def search_space(overrides: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Split ``key=value`` overrides into a search space and fixed overrides (kept as given)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution_of(override)
        else:
            fixed.append(text)
    return space, fixed


def params_to_overrides(params: dict) -> list[str]:
    """Trial parameters as Hydra overrides (strings quoted so any character survives)."""
    out = []
    for key, value in params.items():
        if isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace("'", "\\'")
            out.append(f"{key}='{escaped}'" if not _is_identifier_like(value) else f"{key}={value}")
        elif value is None:
            out.append(f"{key}=null")
        else:
            out.append(f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}")
    return out


def _is_identifier_like(value: str) -> bool:
    return value.replace("_", "").replace("-", "").replace(".", "").replace("/", "").isalnum()
