"""Kernel tests run on CUDA when present, else on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before
``scrimp.optim.kernels.fused`` is first imported; every test imports it lazily, after this file
runs. Set only without CUDA, so that the same tests run the compiled kernels on a GPU machine.
The variable only changes how ``@triton.jit`` wraps functions decorated after this point; no other
helper's code path in this suite runs Triton kernels on the CPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on here: CUDA (compiled) or CPU (interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def fused():
    """The Triton backend module, after checking it runs in the mode this machine needs."""
    from scrimp.optim.kernels import fused as module

    if not torch.cuda.is_available():
        assert module.INTERPRETED, "Triton kernels were imported before TRITON_INTERPRET=1 was set"
    return module
