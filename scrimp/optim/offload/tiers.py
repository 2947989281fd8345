"""Where offloaded optimizer state lives between steps: host memory (``CpuTier``) or files (``DiskTier``).

A tier holds, per parameter key, the state tensors of a fixed ``Layout`` (names, shapes, dtypes),
declared once with ``allocate`` before the first step. ``load(key)`` hands the present tensors to
the step, ``store(key, tensors)`` takes them back (any subset of the layout: a state that was never
created or was dropped, BAdam's inactive blocks say, is stored as ``{}``). ``plan(keys)`` announces
the order of the coming loads, so that the disk tier can read ahead. ``read_copy(key)`` gives tensors
for a state dict, and ``held_bytes()`` what the tier holds, counted from the layouts (nothing is read).
The checkpoint, not the tier, is the source of truth: the tier's files are scratch.

A write behind that fails (EIO, say) leaves a file older than the optimizer's counters, so the disk
tier settles the pending writes before every ``plan`` and ``read_copy`` and, once one has failed,
refuses every further step and state dict in the same sentence: never a silently stale checkpoint.

The disk tier follows MemAscend (one of this project's founding papers) in reading into a reusable
pool of host buffers bucketed by (shape, dtype), and ZeRO-Infinity (Rajbhandari et al., 2021) in
overlapping the state's I/O with compute: a background thread reads the next ``prefetch`` parameters'
state ahead of the step and writes each state back behind it. I/O is plain ``pread``/``pwrite``
through the page cache; O_DIRECT is not done yet.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = ["BufferPool", "CpuTier", "DiskTier", "Layout", "StateTier", "TensorSlot", "layout_of", "make_tier"]

TIERS = ("cpu", "disk")
FILE_ALIGNMENT = 4096  # each tensor starts on a page boundary: what O_DIRECT will need
LOCK_NAME = ".scrimp-offload.lock"
ZERO_CHUNK = 1 << 20


class TensorSlot(NamedTuple):
    """The shape and dtype one state tensor of a parameter always has."""

    shape: tuple[int, ...]
    dtype: torch.dtype


Layout = dict[str, TensorSlot]


def layout_of(tensors: dict[str, Tensor]) -> Layout:
    """The layout of a state (any device, ``meta`` included: no memory needed to describe it)."""
    return {name: TensorSlot(tuple(t.shape), t.dtype) for name, t in tensors.items()}


def slot_bytes(slot: TensorSlot) -> int:
    return math.prod(slot.shape) * slot.dtype.itemsize


def file_offsets(layout: Layout) -> tuple[dict[str, int], int]:
    """Each tensor's byte offset in its parameter's file (page aligned) and the file's size."""
    offsets, end = {}, 0
    for name, slot in layout.items():
        offsets[name] = end
        end += -(-slot_bytes(slot) // FILE_ALIGNMENT) * FILE_ALIGNMENT
    return offsets, end


def check_fits(key: int, layout: Layout, tensors: dict[str, Tensor]) -> None:
    """A stored state must be a subset of the layout its key was allocated with (else the file would be wrong)."""
    for name, t in tensors.items():
        slot = layout.get(name)
        if slot is None or tuple(t.shape) != slot.shape or t.dtype != slot.dtype:
            raise RuntimeError(f"state {name!r} of parameter {key} is a {t.dtype} tensor of shape {tuple(t.shape)}, "
                               f"and the tier allocated {slot}; the layout of an offloaded state cannot change")


class StateTier(Protocol):
    """The interface ``OffloadedOptimizer`` steps through (see the module doc)."""

    def allocate(self, key: int, layout: Layout) -> None: ...

    def plan(self, keys: list[int]) -> None: ...

    def load(self, key: int) -> dict[str, Tensor]: ...

    def store(self, key: int, tensors: dict[str, Tensor]) -> None: ...

    def read_copy(self, key: int) -> dict[str, Tensor]: ...

    def held_bytes(self) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class CpuTier:
    """State tensors kept in host memory. ``load`` hands out the tier's own tensors, which the step updates
    in place (the host update); on a CPU-only machine that is the device's memory too, as separate tensors."""

    name = "cpu"

    def __init__(self) -> None:
        self._layouts: dict[int, Layout] = {}
        self._held: dict[int, dict[str, Tensor]] = {}

    def allocate(self, key: int, layout: Layout) -> None:
        self._layouts[key] = dict(layout)
        self._held[key] = {}

    def plan(self, keys: list[int]) -> None:
        """Nothing to read ahead: the state is already in memory."""

    def load(self, key: int) -> dict[str, Tensor]:
        return dict(self._held[key])

    def store(self, key: int, tensors: dict[str, Tensor]) -> None:
        check_fits(key, self._layouts[key], tensors)
        self._held[key] = {name: t if t.device.type == "cpu" else t.to("cpu") for name, t in tensors.items()}

    def read_copy(self, key: int) -> dict[str, Tensor]:
        """The held tensors themselves, as ``torch.optim.Optimizer.state_dict`` returns references."""
        return dict(self._held[key])

    def held_bytes(self) -> int:
        """Bytes of the state tensors held now."""
        return sum(slot_bytes(self._layouts[key][name]) for key, held in self._held.items() for name in held)

    def flush(self) -> None:
        """Nothing is in flight."""

    def close(self) -> None:
        self._held.clear()


class BufferPool:
    """Reusable host buffers bucketed by (shape, dtype), as MemAscend's pool: a read-ahead takes one per
    tensor and the write-behind gives it back, so a run allocates at most what a step holds at once, once.

    ``keep`` bounds each bucket; buffers beyond it are left to the allocator. Thread safe.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.allocated = 0  # buffers ever created: what the tests bound
        self._free: dict[TensorSlot, list[Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, slot: TensorSlot) -> Tensor:
        with self._lock:
            free = self._free.get(slot)
            if free:
                return free.pop()
            self.allocated += 1
        return torch.empty(slot.shape, dtype=slot.dtype)

    def give(self, t: Tensor) -> None:
        slot = TensorSlot(tuple(t.shape), t.dtype)
        with self._lock:
            free = self._free.setdefault(slot, [])
            if len(free) < self.keep:
                free.append(t)

    def held(self) -> int:
        """Buffers waiting in the pool."""
        with self._lock:
            return sum(len(free) for free in self._free.values())


def _bytes_of(t: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, 0-d included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_into(fd: int, t: Tensor, offset: int) -> None:
    view, done = _bytes_of(t), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(errno.EIO, f"the state file ended {len(view) - done} bytes early at offset {offset + done}")
        done += got


def write_from(fd: int, t: Tensor, offset: int) -> None:
    view, done = _bytes_of(t.contiguous()), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def state_file(key: int) -> str:
    return f"state_{key:06d}.bin"


def write_failure(path: Path, key: int, err: BaseException) -> Exception:
    """The one sentence for a failed write behind (an ``OSError`` keeps its errno)."""
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    message = (f"the disk tier could not write the state of parameter {key} to {str(path / state_file(key))!r} "
               f"({reason}), so that file is older than the optimizer's counters and the tier refuses every further "
               "step and state dict: close this optimizer and resume from the last checkpoint with a new one")
    failure = OSError(err.errno, message) if isinstance(err, OSError) else RuntimeError(message)
    failure.__cause__ = err
    return failure


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes on disk now, so a full disk fails here and not in the middle of training."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    zeros, done = bytes(min(size, ZERO_CHUNK)), 0  # a filesystem without fallocate: write the bytes
    while done < size:
        done += os.pwrite(fd, zeros[: min(len(zeros), size - done)], done)


def _make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".scrimp-offload.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"path must be a writable directory for the disk tier's state files, and {str(path)!r} is "
                         f"not ({err.strerror or err})") from err


def _acquire_lock(path: Path) -> int:
    """An exclusive ``flock`` on the directory's lock file: released by the kernel if the process dies."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ValueError(f"path {str(path)!r} is in use by another disk tier (process {holder}); give each "
                         "optimizer its own path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _release(executor: ThreadPoolExecutor, fds: dict[int, int], lock_fd: list[int]) -> None:
    """Finish the queued I/O, close the files and drop the lock (``DiskTier.close`` and its finalizer)."""
    executor.shutdown(wait=True)
    for fd in fds.values():
        os.close(fd)
    fds.clear()
    while lock_fd:
        os.close(lock_fd.pop())  # closing the descriptor releases the flock


class DiskTier:
    """Each parameter's state in one preallocated file ``state_<key>.bin`` under ``path``.

    A background thread reads the next ``prefetch`` planned states ahead into a ``BufferPool`` and
    writes stored states behind; one FIFO worker orders every read after the writes submitted before
    it. At most ``prefetch + 1`` writes wait at a time (``store`` blocks on the oldest beyond that),
    which bounds the resident state. ``max_bytes`` caps what the files may reserve (a disk smaller
    than the free space, and the tests' way to fill one). Page cache I/O; O_DIRECT is not done yet.
    """

    name = "disk"

    def __init__(self, path: str | os.PathLike, *, prefetch: int = 2, max_bytes: int | None = None) -> None:
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0 (states read ahead), got {prefetch!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
            raise ValueError(f"max_bytes must be None or an integer >= 0, got {max_bytes!r}")
        if path is None:
            raise ValueError("path is required for tier='disk': a directory for the state files")
        self.path, self.prefetch, self.max_bytes = Path(path), prefetch, max_bytes
        _make_directory(self.path)
        self._lock_fd = [_acquire_lock(self.path)]
        self.reserved = 0
        self._layouts: dict[int, Layout] = {}
        self._offsets: dict[int, dict[str, int]] = {}
        self._present: dict[int, tuple[str, ...]] = {}
        self._fds: dict[int, int] = {}
        # what a step holds at once: reads ahead, the state in hand, writes waiting (all back after a plan)
        self.pool = BufferPool(keep=2 * prefetch + 2)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrimp-disk-tier")
        self._reads: dict[int, Future] = {}
        self._ahead: deque[int] = deque()
        self._writes: deque[tuple[int, Future]] = deque()
        self._failure: Exception | None = None  # the first failed write behind: every later use raises it
        self._closed = False
        self._finalizer = weakref.finalize(self, _release, self._io, self._fds, self._lock_fd)

    # -- allocation ---------------------------------------------------------------------------------
    def allocate(self, key: int, layout: Layout) -> None:
        """Create and preallocate the parameter's file: a full disk is one sentence here, before any step."""
        self._check_usable()
        offsets, size = file_offsets(layout)
        if self.max_bytes is not None and self.reserved + size > self.max_bytes:
            raise OSError(errno.ENOSPC, f"the disk tier under {str(self.path)!r} has no room for the state of parameter "
                          f"{key}: it needs {size} bytes and {self.max_bytes - self.reserved} of max_bytes="
                          f"{self.max_bytes} are left; free space, raise max_bytes or choose another path")
        fd = os.open(self.path / state_file(key), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fds[key] = fd
        try:
            preallocate(fd, size)
        except OSError as err:
            raise OSError(err.errno, f"the disk tier under {str(self.path)!r} has no room for the state of parameter "
                          f"{key}: preallocating {size} bytes failed ({err.strerror}); free space or choose another "
                          "path") from err
        self.reserved += size
        self._layouts[key], self._offsets[key], self._present[key] = dict(layout), offsets, ()

    # -- the step's traffic ---------------------------------------------------------------------------
    def plan(self, keys: list[int]) -> None:
        """The order of the coming ``load``s: read the first ``prefetch`` states ahead now, once every
        write behind has landed (a failed one raises here, before the step changes anything)."""
        self._check_usable()
        self._settle_writes(limit=0)
        self._drop_reads()
        self._ahead = deque(keys)
        self._read_ahead()

    def load(self, key: int) -> dict[str, Tensor]:
        """The parameter's present state in pool buffers (its read-ahead, or a read now), and the next read-ahead."""
        self._check_usable()
        while self._ahead and self._ahead[0] != key and key in self._ahead:
            self._ahead.popleft()  # planned keys that were skipped keep no read
        if self._ahead and self._ahead[0] == key:
            self._ahead.popleft()
        future = self._reads.pop(key, None) or self._submit_read(key, self.pool.take)
        self._read_ahead()
        return future.result()

    def store(self, key: int, tensors: dict[str, Tensor]) -> None:
        """Write the state behind (its buffers go back to the pool once written)."""
        self._check_usable()
        check_fits(key, self._layouts[key], tensors)
        self._present[key] = tuple(tensors)
        if tensors:
            self._writes.append((key, self._io.submit(self._write, key, dict(tensors))))
        self._settle_writes(limit=self.prefetch + 1)

    def read_copy(self, key: int) -> dict[str, Tensor]:
        """Fresh tensors of the parameter's state, once every write behind has landed (a failed one raises)."""
        self._check_usable()
        self._settle_writes(limit=0)
        return self._submit_read(key, lambda slot: torch.empty(slot.shape, dtype=slot.dtype)).result()

    def prefetched(self) -> tuple[int, ...]:
        """Keys whose state is being or has been read ahead."""
        return tuple(self._reads)

    def held_bytes(self) -> int:
        """Bytes of the state tensors the files hold now, from the layouts: nothing is read."""
        return sum(slot_bytes(self._layouts[key][name]) for key, names in self._present.items() for name in names)

    def flush(self) -> None:
        """Wait for every write; raise the first I/O error."""
        self._check_usable()
        self._settle_writes(limit=0)

    def close(self) -> None:
        """Finish the I/O, close the files and release ``path`` for another optimizer, whatever failed.
        Raises a failed write that nobody has seen yet; a second ``close`` does nothing."""
        if self._closed:
            return
        try:
            self._drop_reads()
            if self._failure is None:
                self._settle_writes(limit=0)
        finally:
            self._closed = True
            self._finalizer()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"the disk tier under {str(self.path)!r} was closed; build a new optimizer (and tier) "
                               "and load its state from a checkpoint")
        if self._failure is not None:
            raise self._failure.with_traceback(None)  # the same error each time, its traceback not grown

    # -- the worker's side ----------------------------------------------------------------------------
    def _submit_read(self, key: int, buffer) -> Future:
        names = self._present[key]
        return self._io.submit(self._read, key, {name: buffer(self._layouts[key][name]) for name in names})

    def _read(self, key: int, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        for name, t in buffers.items():
            read_into(self._fds[key], t, self._offsets[key][name])
        return buffers

    def _write(self, key: int, tensors: dict[str, Tensor]) -> None:
        for name, t in tensors.items():
            write_from(self._fds[key], t, self._offsets[key][name])
            self.pool.give(t)

    def _read_ahead(self) -> None:
        while self._ahead and len(self._reads) < self.prefetch:
            key = self._ahead.popleft()
            self._reads[key] = self._submit_read(key, self.pool.take)

    def _drop_reads(self) -> None:
        """Give back the buffers of reads ahead that no load will take (an interrupted step)."""
        for future in self._reads.values():
            if future.exception() is None:  # a failed read of a state nobody takes matters to no one
                for t in future.result().values():
                    self.pool.give(t)
        self._reads.clear()
        self._ahead.clear()

    def _settle_writes(self, limit: int) -> None:
        while self._writes and (len(self._writes) > limit or self._writes[0][1].done()):
            key, future = self._writes.popleft()
            error = future.exception()  # waits for the write
            if error is not None:
                self._failure = write_failure(self.path, key, error)
                raise self._failure


def make_tier(tier: str, path: str | os.PathLike | None = None, *, prefetch: int = 2,
              max_bytes: int | None = None) -> CpuTier | DiskTier:
    """The tier named ``tier`` ("cpu" or "disk"; disk needs ``path``)."""
    if tier == "cpu":
        if path is not None or max_bytes is not None:
            raise ValueError(f"path and max_bytes belong to tier='disk'; tier='cpu' keeps the state in memory, got "
                             f"path={path!r}, max_bytes={max_bytes!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0 (states read ahead), got {prefetch!r}")
        return CpuTier()
    if tier == "disk":
        return DiskTier(path, prefetch=prefetch, max_bytes=max_bytes)
    raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
