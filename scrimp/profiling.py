"""Measured memory on the CPU: the peak of live tensor bytes while a function runs.

The reference that memory estimates and memory claims are checked against (the peak
estimator in ``scrimp.allocators.memory_plan``, the zeroth-order memory tests, benchmarks).
It uses ``torch.profiler`` memory events, which see every allocation of the CPU allocator,
temporaries inside an op included, plus the bytes already live when tracking starts.

    from scrimp.profiling import track_live_bytes
    with track_live_bytes() as report:
        loss = model(x, labels=x).loss; loss.backward()
    print(report.peak_bytes, report.baseline_bytes, report.peak_delta_bytes)
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def live_tensor_bytes(device: str = "cpu") -> int:
    """Bytes of the distinct storages of all tensors reachable by the garbage collector on ``device``."""
    seen: dict[int, int] = {}
    tensor_type = torch.Tensor
    with warnings.catch_warnings():
        # isinstance on deprecated module-level proxies (torch.distributed.reduce_op) warns.
        warnings.simplefilter("ignore", FutureWarning)
        objects = [obj for obj in gc.get_objects() if isinstance(obj, tensor_type)]
    for obj in objects:
        try:
            if obj.device.type != device:
                continue
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # some tensor subclasses have no storage (e.g. fake or meta-like)
            continue
    return sum(seen.values())


@dataclass
class LiveBytesReport:
    baseline_bytes: int = 0  # live before the block started
    peak_delta_bytes: int = 0  # highest net allocation above the baseline during the block
    end_delta_bytes: int = 0  # net allocation still held when the block ended
    n_events: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.baseline_bytes + self.peak_delta_bytes


@contextmanager
def track_live_bytes(device: str = "cpu", include_baseline: bool = True) -> Iterator[LiveBytesReport]:
    """Track allocations inside the block; fills the yielded report when the block ends."""
    from torch.profiler import ProfilerActivity, profile

    report = LiveBytesReport()
    gc.collect()
    if include_baseline:
        report.baseline_bytes = live_tensor_bytes(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield report
    events = []
    for event in prof.profiler.kineto_results.events():
        if event.name() != "[memory]":
            continue
        if str(event.device_type()).rsplit(".", 1)[-1].lower() != device:
            continue
        events.append((event.start_ns(), event.nbytes()))
    events.sort()
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    report.peak_delta_bytes = peak
    report.end_delta_bytes = current
    report.n_events = len(events)
