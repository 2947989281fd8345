"""Run folders that keep everything: one writer per folder, checked writability and free space,
orphan temporaries removed, metrics kept across resumes (each step once in ``metrics.csv``; the
rows a resume replays are moved to ``metrics.replaced-<n>.csv``, never deleted).

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

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
    """Whether a live process holds ``folder``'s lock, shared or exclusive (False when the folder or
    lock file is absent). The probe asks for an exclusive lock, which any holder blocks."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
REPLACED_METRICS = "metrics.replaced-{n}.csv"


def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    import csv

    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def write_atomic(path: Path, write: Callable[[IO[str]], None], what: str = "file") -> None:
    """Call ``write(file)`` on ``.<name>.tmp<pid>``, fsync it, rename it over ``path``: a kill or a full
    disk mid-write leaves the earlier file whole (one sentence for a failed write; no temporary is left)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise checkpoint_write_error(path, err, what=what) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_csv_atomic(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    """``write_atomic`` of a CSV with these columns and rows."""
    import csv

    def write(file):
        writer = csv.DictWriter(file, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)

    write_atomic(path, write, what="metrics file")


def _step_of(row: dict) -> float | None:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return None


def set_aside_replayed_rows(metrics_file: Path, start_step: int) -> Path | None:
    """Move the rows with ``step >= start_step`` out of ``metrics_file`` into the next free
    ``metrics.replaced-<n>.csv`` beside it; returns that file (None when no row was moved).

    Why: a run resumed from the checkpoint of step ``start_step`` logs those steps again, so readers
    of ``metrics.csv`` would see them twice, from two segments. The rows of the abandoned segment are
    never deleted: the side file is written (atomically) before ``metrics.csv`` is replaced
    (atomically), so a kill in between leaves a row twice, never nowhere.
    """
    if not metrics_file.is_file():
        return None
    fieldnames, rows = _read_rows(metrics_file)
    def is_replayed(row: dict) -> bool:
        step = _step_of(row)
        return step is not None and step >= start_step

    replayed = [r for r in rows if is_replayed(r)]
    if not replayed:
        return None
    n = 1
    while (side := metrics_file.with_name(REPLACED_METRICS.format(n=n))).exists():
        n += 1
    write_csv_atomic(side, fieldnames, replayed)
    write_csv_atomic(metrics_file, fieldnames, [r for r in rows if not is_replayed(r)])
    log.info(f"{len(replayed)} row(s) of {metrics_file} from step {start_step} on, which this run logs again, "
             f"were moved to {side.name}")
    return side


def appending_csv_logger(save_dir: Path, name: str = "csv", version: int = 0, start_step: int | None = None):
    """A Lightning ``CSVLogger`` whose ``metrics.csv`` keeps the rows of earlier run segments, each step once.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts (so a resume into the same
    ``run_dir`` lost every earlier row). This one keeps the rows before the step the run starts at
    (``start_step``, or ``logger.resume_at(step)`` before training: the checkpoint's global step, 0 for
    a fresh run), moves the rows from that step on to ``metrics.replaced-<n>.csv`` (the segment this run
    replays; never deleted) and appends under the existing header. When a later segment logs a new key,
    the file is rewritten with the wider header atomically (temporary file and rename), not in place.
    ``start_step=None`` and no ``resume_at`` call: nothing is set aside, rows are appended.
    """
    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingExperimentWriter(ExperimentWriter):
        def __init__(self, log_dir: str, start_step: int | None):
            self.start_step = start_step
            super().__init__(log_dir)

        def _check_log_dir_exists(self) -> None:
            path = Path(self.metrics_file_path)
            if path.is_file():
                if self.start_step is not None:
                    set_aside_replayed_rows(path, self.start_step)
                # In the file's own column order: rows are appended under this header.
                self.metrics_keys = _read_rows(path)[0]

        def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
            # Lightning's own rewrite truncates the file first: a kill or a full disk would empty it.
            path = Path(self.metrics_file_path)
            write_csv_atomic(path, fieldnames, _read_rows(path)[1])

    class AppendingCSVLogger(CSVLogger):
        def resume_at(self, step: int) -> None:
            """The run starts at optimizer step ``step``: the rows it will log again are set aside."""
            self._start_step = int(step)
            if self._experiment is not None:  # already open: set them aside now
                set_aside_replayed_rows(Path(self._experiment.metrics_file_path), self._start_step)

        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingExperimentWriter(self.log_dir, getattr(self, "_start_step", start_step))
            return self._experiment

    return AppendingCSVLogger(str(save_dir), name=name, version=version)
