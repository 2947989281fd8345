"""The engine's parts: inner rules, residual rules and output rules (``base``), found by name (``registry``).

Importing this package registers the built-in rules: inner "adam", "lion", "sgd", "natural"; residual
"sign_sgd", "sgd", "scaled"; output "apollo". A rule of your own registers itself where it is defined
(``registry``).
"""

from __future__ import annotations

from . import adam, apollo, lion, natural, residual, sgd  # noqa: F401  (importing them registers them)
from .base import InnerRule, MomentSpec, OutputRule, ResidualRule, StepHyper
from .registry import (
    INNER_RULES,
    OUTPUT_RULES,
    RESIDUAL_RULES,
    register_inner,
    register_output,
    register_residual,
)

__all__ = [
    "INNER_RULES",
    "OUTPUT_RULES",
    "RESIDUAL_RULES",
    "InnerRule",
    "MomentSpec",
    "OutputRule",
    "ResidualRule",
    "StepHyper",
    "register_inner",
    "register_output",
    "register_residual",
]
