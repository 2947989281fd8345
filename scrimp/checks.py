"""One-sentence checks of scalar arguments, shared by ``scrimp.optim``, ``scrimp.allocators`` and ``scrimp.ttc``.

Bad input gets one clear sentence naming the parameter and what is allowed, before any work starts.
Python and NumPy integers and reals are accepted alike; booleans are not numbers here.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_real(value) -> bool:
    """A Python or NumPy integer or float, not a bool."""
    return is_integer(value) or isinstance(value, float | np.floating)


def check_integer(name: str, value, minimum: int, *, minimum_name: str | None = None, optional: bool = False):
    """``value`` as an int (None passes when ``optional``); else a ValueError like
    ``k_max must be an integer >= pilot=2 (or None), got -3``."""
    if optional and value is None:
        return None
    if not is_integer(value) or value < minimum:
        bound = f">= {minimum}" if minimum_name is None else f">= {minimum_name}={minimum}"
        raise ValueError(f"{name} must be an integer {bound}{' (or None)' if optional else ''}, got {value!r}")
    return int(value)


def check_number(name: str, value, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False,
                 open_high: bool = False) -> float:
    """``value`` as a float when it is a finite real in the given range; else a ValueError like
    ``threshold must be a finite number in (0, 1), got '0.9'``."""
    ok = is_real(value) and math.isfinite(value)
    ok = ok and (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
    if not ok:
        if math.isinf(high):
            where = "" if math.isinf(low) else f" {'>' if open_low else '>='} {low:g}"
        else:
            where = f" in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def check_choice(name: str, value, allowed: Collection[str]) -> str:
    """``value`` when it is one of ``allowed``; else ``rule must be one of (...), got 'x'``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value
