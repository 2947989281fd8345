"""One place for the "install this extra" message, so every optional import fails the same way.

The core (``scrimp.optim`` without 8-bit, ``scrimp.allocators``) needs only torch and numpy; the rest
of scrimp imports its heavier dependencies through :func:`require`, which turns a missing module into
one sentence naming the extra that provides it, instead of a bare ``ModuleNotFoundError`` deep inside
a run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> extra that installs it (the pyproject's [project.optional-dependencies]).
EXTRA_OF = {
    "lightning": "train",
    "transformers": "train",
    "datasets": "train",
    "tokenizers": "train",
    "hydra": "train",
    "omegaconf": "train",
    "rich": "train",
    "matplotlib": "train",
    "optuna": "sweep",
    "bitsandbytes": "8bit",
    "triton": "kernels",
    "peft": "lora",
    "accelerate": "hf",
    "vllm": "vllm",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing_extra_message(module: str, feature: str | None = None) -> str:
    """The one sentence for a missing optional ``module`` (``feature`` says what needed it)."""
    top = module.split(".")[0]
    if top not in EXTRA_OF:
        raise ValueError(f"module {top!r} is not an optional dependency of scrimp; known: {sorted(EXTRA_OF)}")
    extra = EXTRA_OF[top]
    what = f"{feature} needs" if feature else "this needs"
    return f"{what} {top}, which is not installed: pip install 'scrimp[{extra}]'"


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        # Only the module itself (or its top package) missing is "install the extra"; an ImportError
        # raised from inside an installed package is a real bug and keeps its own message.
        if err.name is None or module.split(".")[0] != err.name.split(".")[0]:
            raise
        raise MissingExtraError(missing_extra_message(module, feature)) from None
