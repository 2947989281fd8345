"""Run folders that keep everything: one writer per folder, checked writability and free space,
orphan temporaries removed, metrics appended across resumes.

A run folder (``run_dir``, a sweep folder, each trial's folder) is owned by the process that holds
an advisory lock on ``<folder>/.scrimp.lock`` (``fcntl.flock``). The OS drops the lock when the
process ends, however it ends (SIGKILL included), so a stale lock file never blocks anyone and no
pid has to be trusted. A second process is refused in one sentence naming the folder and the pid
of the holder. Shared locks exist for sweep folders whose study is named explicitly (several sweep
processes on one study, on purpose).

Before training, ``open_run_folder`` checks what would otherwise fail after work has started:
the folder is a folder, it can be created, a few KB can be written and fsynced in it and in its
``checkpoints/``; ``check_checkpoint_space`` compares the free space with an estimate of the
checkpoints the run will write. A checkpoint write that fails anyway (the disk filled up during
the run) is one sentence too (``checkpoint_write_error``), and the previous checkpoint is intact
because checkpoints are written to a temporary file that is renamed over the target.

    with open_run_folder(Path("outputs/run")) as run_dir:   # refused if another process has it
        ...

Errors are ``RunFolderError``, a ``ValueError``, so that the entry point prints them as one sentence
like every other bad input (``experiments/train.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".scrimp.lock"
PROBE_BYTES = 4096
# Temporary files written next to their target and renamed over it (checkpoints, summary.json):
# ".<name>.tmp<pid>". Only these are ever removed as orphans.
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")
# Below this, a failed torch.save is taken to mean "the disk is full": torch reports a full disk as
# "basic_ios::clear: iostream error" or "file write failed", without the errno.
_NEARLY_FULL_BYTES = 1 << 20


class RunFolderError(ValueError):
    """A run folder that cannot be used: in use by another process, not writable, or full."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _os_reason(err: OSError) -> str:
    """The cause of an OS error in a few words ("the disk is full", "Permission denied", ...)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if err.errno == errno.EROFS:
        return "the file system is read-only"
    return os.strerror(err.errno) if err.errno else str(err)


# -- advisory locks ---------------------------------------------------------------------------------
def is_secondary_process() -> bool:
    """True in a DDP worker that is not global rank 0: the rank-0 process holds the run folder for all.

    Lightning's subprocess launcher re-runs the entry point with ``LOCAL_RANK``/``NODE_RANK`` set,
    torchrun sets ``RANK``; all of these are absent or 0 in the process that owns the folder.
    """
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holders(lock_path: Path) -> list[int]:
    """The pids written in a lock file that are still alive (for the message only)."""
    try:
        pids = [int(p) for p in lock_path.read_text().split() if p.isdigit()]
    except OSError:
        return []
    return sorted({p for p in pids if p != os.getpid() and _pid_alive(p)})


class FolderLock:
    """``fcntl.flock`` on ``<folder>/.scrimp.lock``; exclusive by default, shared for cooperating sweeps.

    The holder's pid is written into the file (appended for shared holders) only to name it in the
    refusal; the lock itself, not the file's content, decides who owns the folder.
    """

    def __init__(self, folder: Path, what: str = "run_dir", shared: bool = False, hint: str = ""):
        self.folder, self.what, self.shared, self.hint = Path(folder), what, shared, hint
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        ensure_folder(self.folder, self.what)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFolderError(f"{self.what} {str(self.folder)!r} is not writable ({_os_reason(err)}); "
                                 f"choose another {self.what} or fix the folder's permissions") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pids = _holders(self.path)
            holder = f"process {', '.join(map(str, pids))}" if pids else "another process"
            raise RunFolderError(
                f"{self.what} {str(self.folder)!r} is in use by {holder} (it holds the lock {str(self.path)!r})"
                f"; wait for it to end or {self.hint or 'choose another ' + self.what}"
            ) from None
        if self.shared:
            os.lseek(fd, 0, os.SEEK_END)
        else:
            os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock (False when the folder or lock file is absent)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


# -- writability, free space and orphans --------------------------------------------------------------
def ensure_folder(folder: Path, what: str) -> None:
    """Create ``folder``; one sentence when it is a file or cannot be created."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{what} {str(folder)!r} is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"{what} {str(folder)!r} cannot be created ({_os_reason(err)})") from None


def probe_writable(folder: Path, what: str) -> None:
    """Create, write ``PROBE_BYTES``, fsync and remove a file in ``folder``; one sentence if any step fails.

    Why a real write and not ``os.access``: root passes ``os.access`` on a read-only mount, and a
    full disk, a quota or a read-only bind mount only show on an actual write.
    """
    probe = folder / f".scrimp-probe.tmp{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise RunFolderError(f"{what} {str(folder)!r} is not writable ({_os_reason(err)}); "
                             f"choose another {what.split('/')[0]} or fix the folder's permissions/space") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def remove_orphan_temporaries(folder: Path) -> list[Path]:
    """Remove ``.<name>.tmp<pid>`` files in ``folder``: left by a process killed while writing.

    Call only while holding the folder's lock: then no live process of ours writes there, whatever
    pid the name carries (a pid may have been reused, so its liveness alone would prove nothing).
    """
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if _TEMPORARY.match(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    if removed:
        log.info(f"removed {len(removed)} orphan temporary file(s) in {folder}: {[p.name for p in removed]}")
    return removed


@contextlib.contextmanager
def open_run_folder(run_dir: Path, checkpoints: bool = True) -> Iterator[Path]:
    """Hold ``run_dir`` for this process: checked, locked, probed and cleaned; released on exit.

    Secondary DDP ranks neither lock nor clean: rank 0 holds the folder for the whole job.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if is_secondary_process():
        yield run_dir
        return
    ensure_folder(run_dir, "run_dir")
    with FolderLock(run_dir, "run_dir", hint="choose another run_dir"):
        probe_writable(run_dir, "run_dir")
        if checkpoints and ckpt_dir.exists():  # else it will be created in run_dir, just probed
            ensure_folder(ckpt_dir, "run_dir/checkpoints")
            probe_writable(ckpt_dir, "run_dir/checkpoints")
        for folder in (run_dir, ckpt_dir):
            remove_orphan_temporaries(folder)
        yield run_dir


def checkpoint_enabled(checkpoint_cfg) -> bool:
    """``checkpoint.enabled`` (default true); one sentence when it is not a boolean."""
    value = (checkpoint_cfg or {}).get("enabled", True)
    if not isinstance(value, bool):
        raise RunFolderError(f"checkpoint.enabled must be true or false, got {value!r}")
    return value


def checkpoint_bytes_estimate(model) -> int:
    """An upper bound of one checkpoint's size: the weights and two Adam moments of the same size.

    The optimizer state does not exist before the first step, so it cannot be measured here; Adam's
    two full moments bound every optimizer of this package (GaLore and FRUGAL keep less).
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * weights + (64 << 10)  # + pickled metadata (config, loop state)


def _checkpoints_at_once(checkpoint_cfg, max_steps) -> int:
    """How many checkpoint files the run may hold at the peak: the kept step files and the new one being
    written before the oldest is removed, plus last.ckpt; or last.ckpt and its temporary when no step
    file is due (``every_n_steps`` 0 or larger than ``max_steps``)."""
    keep, every = int(checkpoint_cfg.get("keep", 1)), int(checkpoint_cfg.get("every_n_steps", 100))
    if every <= 0:
        return 2
    written = int(max_steps) // every if max_steps and int(max_steps) > 0 else 1  # by epochs: at least one
    kept = written if keep < 0 else min(keep, written)
    return kept + 2 if written > 0 else 2


def check_checkpoint_space(run_dir: Path, model, checkpoint_cfg, max_steps) -> None:
    """Refuse, before training, a run whose checkpoints cannot fit in the free space of ``run_dir``.

    Checkpoints already in ``checkpoints/`` are counted as available: the run rotates or replaces
    them. No check when checkpoints are off or on a secondary DDP rank.
    """
    checkpoint_cfg = checkpoint_cfg or {}
    if not checkpoint_enabled(checkpoint_cfg) or is_secondary_process():
        return
    ckpt_dir = Path(run_dir) / "checkpoints"
    each = checkpoint_bytes_estimate(model)
    files = _checkpoints_at_once(checkpoint_cfg, max_steps)
    existing = sum(p.stat().st_size for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else 0
    needed = files * each - existing
    free = shutil.disk_usage(ckpt_dir if ckpt_dir.is_dir() else run_dir).free
    if free < needed:
        raise RunFolderError(
            f"run_dir {str(run_dir)!r} has {_human(free)} free but this run's checkpoints need about "
            f"{_human(needed)} ({files} file(s) of up to {_human(each)}); free some space, choose another run_dir, "
            "lower checkpoint.keep, or set checkpoint.enabled=false"
        )


# torch.save's words for a failed write of the file itself (not for an object that cannot be pickled).
_WRITE_FAILURES = ("iostream error", "file write failed", "PytorchStreamWriter failed", "unexpected pos")


def checkpoint_write_error(path: Path, err: BaseException, what: str = "checkpoint") -> RunFolderError | None:
    """One sentence for a checkpoint that could not be written to its folder, or None when ``err`` is
    not about the folder (an object that cannot be pickled keeps its own error and traceback).

    Call before removing the partial file: torch.save reports a full disk as a RuntimeError without an
    errno ("basic_ios::clear: iostream error"), so the free space, measured while the partial file
    still fills the disk, names the cause.
    """
    if isinstance(err, OSError):
        reason = _os_reason(err)
    else:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        if free is not None and free < _NEARLY_FULL_BYTES:
            reason = f"the disk is full ({_human(free)} free)"
        elif any(words in str(err) for words in _WRITE_FAILURES):
            reason = str(err).strip().splitlines()[0]
        else:
            return None
    previous = f"the previous {what} there is intact" if path.exists() else f"no earlier {what} was there"
    return RunFolderError(f"{what} {str(path)!r} could not be written ({reason}); {previous} "
                          "and the partial file was removed")


# -- metrics that survive a resume ---------------------------------------------------------------------
def appending_csv_logger(save_dir: Path, name: str = "csv", version: int = 0):
    """A Lightning ``CSVLogger`` whose ``metrics.csv`` keeps the rows of earlier run segments.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts (so a resume into the same
    ``run_dir`` lost every earlier row). This one reads the existing header and appends; when a
    later segment logs a new key, Lightning's own header rewrite keeps the old rows.
    """
    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingExperimentWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                import csv

                with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                    # In the file's own column order: rows are appended under this header.
                    self.metrics_keys = next(csv.reader(file), [])

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(str(save_dir), name=name, version=version)
