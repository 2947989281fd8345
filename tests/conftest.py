import os

import pytest
import torch

# Without CUDA, Triton kernels run in its interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any test module imports scrimp.optim.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic CPU math for parity tests; two threads match the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (marker `gpu`); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """With SCRIMP_FAILURE_LOG set, append each failure's traceback to that file as it happens.

    For runs under a hard time limit (the GPU session script): pytest prints tracebacks only at the
    end, which a killed run never reaches. Under xdist the controller writes it; the workers, which
    see the same report first, do not (the H200 log had every failure twice).
    """
    path = os.environ.get("SCRIMP_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as fh:
            fh.write(f"==== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n")
