"""scrimp.profiling: the measured peak equals the analytic bytes of a known allocation pattern."""

import torch

from scrimp.profiling import live_tensor_bytes, track_live_bytes


def test_peak_of_known_pattern_matches_analytic_bytes():
    keep = torch.randn(300, 400)  # live before tracking: part of the baseline
    n = 500 * 500 * 4
    with track_live_bytes() as report:
        a = torch.randn(500, 500)
        b = a @ a  # a and b live together: 2n
        del a
        c = b * 2  # b and c live together: 2n again
        del b, c
    assert report.baseline_bytes >= keep.numel() * 4
    # The allocator rounds tiny sizes, never these; allow a few bytes of bookkeeping.
    assert abs(report.peak_delta_bytes - 2 * n) <= 64
    assert report.end_delta_bytes == 0


def test_live_tensor_bytes_counts_shared_storage_once():
    base = live_tensor_bytes()
    x = torch.zeros(1000, 1000)
    view = x[:10]  # a view shares the storage
    assert live_tensor_bytes() - base == x.numel() * 4
    del view
