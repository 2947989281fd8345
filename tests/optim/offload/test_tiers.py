"""Tests for scrimp/optim/offload/tiers.py: what a tier stores it gives back, the disk tier reads ahead
into a bounded pool, reserves its files before the first step, keeps its path to one optimizer, and refuses
every use after a failed write behind or close() in one sentence."""

import errno
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

from scrimp.optim.offload import tiers
from scrimp.optim.offload.tiers import FILE_ALIGNMENT, CpuTier, DiskTier, TensorSlot, layout_of, make_tier

LAYOUT = {
    "exp_avg": TensorSlot((5, 7), torch.float32),
    "exp_avg_sq_q": TensorSlot((5, 7), torch.uint8),
    "exp_avg_sq_absmax": TensorSlot((1,), torch.float32),
    "count": TensorSlot((), torch.float32),  # 0-d: state keeps scalars as tensors too
}


def state(seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "exp_avg": torch.randn(5, 7, generator=gen),
        "exp_avg_sq_q": torch.randint(0, 256, (5, 7), generator=gen, dtype=torch.uint8),
        "exp_avg_sq_absmax": torch.rand(1, generator=gen),
        "count": torch.tensor(float(seed)),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture
def disk(tmp_path):
    tier = DiskTier(tmp_path / "tier", prefetch=2)
    for key in range(6):
        tier.allocate(key, LAYOUT)
    yield tier
    tier.close()


def test_layout_of_meta_tensors_needs_no_memory():
    meta = {name: torch.empty(slot.shape, dtype=slot.dtype, device="meta") for name, slot in LAYOUT.items()}
    assert layout_of(meta) == LAYOUT


def test_disk_tier_gives_back_what_it_stored(disk):
    expected = {key: state(key) for key in range(6)}
    for key in range(6):
        disk.store(key, {k: v.clone() for k, v in expected[key].items()})
    disk.plan(list(range(6)))
    for key in range(6):
        assert_same(disk.load(key), expected[key])
    for key in range(6):
        assert_same(disk.read_copy(key), expected[key])


def test_a_state_never_stored_or_dropped_loads_empty(disk):
    assert disk.load(0) == {}
    disk.store(1, state(1))
    disk.store(1, {})  # the step dropped it (an inactive block)
    assert disk.read_copy(1) == {}
    disk.store(2, {"exp_avg": state(2)["exp_avg"]})  # a subset of the layout
    assert disk.load(2).keys() == {"exp_avg"}


def test_a_read_after_a_write_sees_the_write(disk):
    for round_ in range(4):
        disk.plan([3])
        loaded = disk.load(3)
        fresh = state(10 + round_)
        for key, value in fresh.items():
            (loaded[key].copy_(value) if key in loaded else loaded.setdefault(key, value.clone()))
        disk.store(3, loaded)
        assert_same(disk.read_copy(3), fresh)  # queued behind the write


def test_the_next_prefetch_states_are_read_ahead(disk):
    for key in range(6):
        disk.store(key, state(key))
    disk.plan([0, 1, 2, 3, 4, 5])
    assert disk.prefetched() == (0, 1)
    assert_same(disk.load(0), state(0))
    assert disk.prefetched() == (1, 2)
    assert_same(disk.load(1), state(1))
    assert disk.prefetched() == (2, 3)
    disk.plan([5, 4])  # a new step: the reads ahead of the last one go back to the pool
    assert disk.prefetched() == (5, 4)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_the_buffer_pool_bounds_what_a_run_allocates(tmp_path, prefetch):
    tier = DiskTier(tmp_path / "tier", prefetch=prefetch)
    for key in range(8):
        tier.allocate(key, LAYOUT)
        tier.store(key, state(key))
    tier.flush()
    allocated_before = tier.pool.allocated
    for _ in range(5):  # 40 loads of 4 tensors each
        tier.plan(list(range(8)))
        for key in range(8):
            loaded = tier.load(key)
            loaded["count"].add_(1)
            tier.store(key, loaded)
    tier.flush()
    # reads ahead + the one in hand + writes waiting (prefetch + 1), per tensor of the layout
    assert tier.pool.allocated - allocated_before <= (2 * prefetch + 2) * len(LAYOUT)
    assert float(tier.read_copy(7)["count"]) == 7 + 5
    tier.close()


def test_files_are_preallocated_page_aligned(tmp_path, disk):
    sizes = [os.path.getsize(tmp_path / "tier" / f"state_{key:06d}.bin") for key in range(6)]
    assert sizes == [4 * FILE_ALIGNMENT] * 6  # four tensors, each on its own page
    assert disk.reserved == sum(sizes)


def test_max_bytes_refuses_before_writing(tmp_path):
    tier = DiskTier(tmp_path / "tier", max_bytes=5 * FILE_ALIGNMENT)
    tier.allocate(0, LAYOUT)
    with pytest.raises(OSError, match="no room for the state of parameter 1: it needs 16384 bytes and 4096"):
        tier.allocate(1, LAYOUT)
    tier.close()


def test_a_disk_without_space_is_one_sentence(tmp_path, monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tiers.os, "posix_fallocate", full)
    tier = DiskTier(tmp_path / "tier")
    with pytest.raises(OSError, match="preallocating 16384 bytes failed .No space left on device."):
        tier.allocate(0, LAYOUT)
    tier.close()


def test_a_filesystem_without_fallocate_gets_written_zeros(tmp_path, monkeypatch):
    def unsupported(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(tiers.os, "posix_fallocate", unsupported)
    tier = DiskTier(tmp_path / "tier")
    tier.allocate(0, LAYOUT)
    assert os.path.getsize(tmp_path / "tier" / "state_000000.bin") == 4 * FILE_ALIGNMENT
    tier.close()


def test_a_path_under_a_file_is_one_sentence(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="path must be a writable directory .* is not"):
        DiskTier(tmp_path / "f" / "tier")


def test_the_lock_dies_with_its_process(tmp_path):
    """A killed run leaves no stale lock: flock is released by the kernel."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom scrimp.optim.offload.tiers import DiskTier\n"
         f"t = DiskTier({str(tmp_path / 'tier')!r})\nprint('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ValueError, match=f"in use by another disk tier .process {holder.pid}."):
            DiskTier(tmp_path / "tier")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    DiskTier(tmp_path / "tier").close()


def test_cpu_tier_hands_out_its_own_tensors():
    tier = CpuTier()
    tier.allocate(0, LAYOUT)
    tier.store(0, state(0))
    tier.load(0)["exp_avg"].zero_()  # the host update works in place on the tier's tensors
    assert not tier.read_copy(0)["exp_avg"].any()


@pytest.mark.parametrize("tier", [CpuTier, "disk"])
def test_a_state_outside_the_layout_is_refused(tier, tmp_path):
    tier = CpuTier() if tier is CpuTier else DiskTier(tmp_path / "tier")
    tier.allocate(0, LAYOUT)
    with pytest.raises(RuntimeError, match="layout of an offloaded state cannot change"):
        tier.store(0, {"exp_avg": torch.zeros(5, 8)})
    tier.close()


@pytest.mark.parametrize("args, kwargs, match", [
    (("tape",), {}, "tier must be one of"),
    (("disk",), {}, "path is required"),
    (("cpu", "/tmp/x"), {}, "belong to tier='disk'"),
    (("disk", "/tmp/x"), {"prefetch": 1.5}, "prefetch must be an integer"),
    (("disk", "/tmp/x"), {"max_bytes": -1}, "max_bytes must be None or an integer"),
])
def test_make_tier_refuses_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_tier(*args, **kwargs)


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_held_bytes_counts_what_is_stored_without_reading_it(kind, tmp_path, monkeypatch):
    tier = CpuTier() if kind == "cpu" else DiskTier(tmp_path / "tier")
    for key in range(3):
        tier.allocate(key, LAYOUT)
    assert tier.held_bytes() == 0
    tier.store(0, state(0))
    tier.store(1, {"exp_avg": state(1)["exp_avg"]})  # a subset of the layout
    tier.store(2, state(2))
    tier.store(2, {})  # dropped: nothing held for it any more

    def no_reads(*args):
        raise AssertionError("held_bytes read a state back")

    monkeypatch.setattr(tiers, "read_into", no_reads)
    expected = sum(t.numel() * t.element_size() for t in state(0).values()) + state(1)["exp_avg"].nbytes
    assert tier.held_bytes() == expected == 5 * 7 * 4 + 5 * 7 + 4 + 4 + 5 * 7 * 4
    tier.close()


def fail_next_write(monkeypatch) -> threading.Event:
    """The next tensor written behind waits for the returned event, then fails with EIO; later writes succeed.
    Waiting keeps the failure from surfacing before the test looks (store settles writes already done)."""
    release, write_whole, calls = threading.Event(), tiers.write_from, []

    def write(fd, tensor, offset):
        calls.append(offset)
        if len(calls) == 1:
            release.wait(30)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        write_whole(fd, tensor, offset)

    monkeypatch.setattr(tiers, "write_from", write)
    return release


@pytest.mark.parametrize("first_use", ["plan", "read_copy"])
def test_a_failed_write_behind_refuses_every_later_use_in_one_sentence(first_use, tmp_path, monkeypatch):
    """The failed file is older than the optimizer's counters: reading any state after it (a checkpoint, the
    next step's plan) must raise, and keep raising, instead of handing out a stale state."""
    tier = DiskTier(tmp_path / "tier", prefetch=2)
    for key in range(2):
        tier.allocate(key, LAYOUT)
    tier.store(0, state(0))
    tier.flush()
    release = fail_next_write(monkeypatch)
    tier.store(1, state(1))  # written behind: nothing has failed yet
    release.set()
    sentence = re.escape(f"could not write the state of parameter 1 to {str(tmp_path / 'tier' / 'state_000001.bin')!r}"
                         f" ({os.strerror(errno.EIO)})")
    with pytest.raises(OSError, match=sentence) as caught:
        tier.plan([0, 1]) if first_use == "plan" else tier.read_copy(0)
    assert caught.value.errno == errno.EIO
    for use in (lambda: tier.plan([0]), lambda: tier.read_copy(0), lambda: tier.load(0),
                lambda: tier.store(0, state(0)), tier.flush):
        with pytest.raises(OSError, match=sentence):
            use()
    tier.close()  # seen already: close releases the path without raising it again
    DiskTier(tmp_path / "tier").close()


def test_a_write_that_fails_unseen_is_raised_by_close_which_still_releases_the_path(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path / "tier")
    tier.allocate(0, LAYOUT)
    release = fail_next_write(monkeypatch)
    tier.store(0, state(0))
    release.set()
    with pytest.raises(OSError, match="could not write the state of parameter 0"):
        tier.close()
    tier.close()  # a second close does nothing
    DiskTier(tmp_path / "tier").close()


def test_a_closed_disk_tier_is_one_sentence(tmp_path):
    tier = DiskTier(tmp_path / "tier")
    tier.allocate(0, LAYOUT)
    tier.close()
    for use in (lambda: tier.store(0, state(0)), lambda: tier.read_copy(0), lambda: tier.plan([0])):
        with pytest.raises(RuntimeError, match="the disk tier under .* was closed; build a new optimizer"):
            use()
