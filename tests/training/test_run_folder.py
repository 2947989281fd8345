"""Tests of scrimp/training/run_folder.py through real runs: one writer per run folder (a real second
process holds the lock), metrics kept across a resume, orphan temporaries of a SIGKILLed writer
removed, and unwritable or full folders refused before training (real tmpfs mounts)."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scrimp.training.callbacks import AtomicCheckpointIO
from scrimp.training.run import train
from scrimp.training.run_folder import LOCK_NAME, RunFolderError, open_run_folder

REPO = Path(__file__).resolve().parents[2]
FAST = ["optim=adamw", "trainer.val_check_interval=2"]

HOLDER = """
import sys, time
from pathlib import Path
from scrimp.training.run_folder import open_run_folder
with open_run_folder(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(300)
"""

# A writer killed in the middle of torch.save: the object's pickling sends SIGKILL to its own process.
KILLED_WRITER = """
import os, signal, sys, torch
from pathlib import Path
from scrimp.training.callbacks import AtomicCheckpointIO

class DieWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1000), "x": DieWhilePickled()}, Path(sys.argv[1]) / "last.ckpt")
"""


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture
def holder():
    """``holder(folder)``: a real second process that holds ``folder`` until it is killed."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "holding"  # a handshake, not output parsing
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(path, size, read_only)``: a real tmpfs mounted at ``path`` (skips where mounting is not allowed)."""
    mounted = []

    def mount(path: Path, size: str = "1m", read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    busy = []
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            busy.append(str(path))
            subprocess.run(["umount", "-l", str(path)], check=False)  # detach it anyway: no mount outlives the test
    # a file left open on the small disk (a leaked handle of a failed write) keeps it busy
    assert not busy, f"still in use at the end of the test (a leaked file handle?): {busy}"


def test_a_second_process_on_a_run_dir_is_refused_naming_its_pid_and_the_os_releases_a_killed_holder(
        small_cfg, tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    with pytest.raises(RunFolderError, match=rf"run_dir '{re.escape(str(run_dir))}' is in use by process {proc.pid} "):
        train(small_cfg(*FAST, "trainer.max_steps=2"))
    assert sorted(p.name for p in run_dir.rglob("*")) == [LOCK_NAME]  # the holder's, nothing more
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The lock file is still there, but a dead process holds no lock: the next run takes the folder.
    with open_run_folder(run_dir):
        assert (run_dir / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def side_rows(run_dir: Path, n: int) -> list[dict]:
    with open(run_dir / "csv" / "version_0" / f"metrics.replaced-{n}.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_resume_into_the_same_run_dir_keeps_every_row_and_each_step_once_in_metrics_csv(small_cfg, tmp_path):
    run_dir = tmp_path / "run"
    common = [*FAST, "checkpoint.every_n_steps=2", "checkpoint.keep=-1"]
    train(small_cfg(*common, "trainer.max_steps=4"))
    before = metric_rows(run_dir)
    assert {int(r["step"]) for r in before if r["train/loss"]} == {0, 1, 2, 3}
    # The checkpoint of step 2 is resumed: steps 2 and 3 are logged again (Lightning's row step is
    # global_step - 1 for training rows), so the first segment's rows from step 2 on are set aside.
    train(small_cfg(*common, "trainer.max_steps=6", f"ckpt_path={run_dir / 'checkpoints' / 'step000002.ckpt'}"))
    after, replaced = metric_rows(run_dir), side_rows(run_dir, 1)
    kept = [r for r in before if int(r["step"]) < 2]
    assert after[:len(kept)] == kept and replaced == [r for r in before if int(r["step"]) >= 2]  # no row lost
    appended = after[len(kept):]
    assert {int(r["step"]) for r in appended if r["train/loss"]} == {2, 3, 4, 5}  # steps 3..6 of the resumed run
    train_steps = [int(r["step"]) for r in after if r["train/loss"]]
    val_steps = [int(r["step"]) for r in after if r["val/loss"]]
    assert train_steps == [0, 1, 2, 3, 4, 5] and val_steps == [1, 3, 5]  # each step once, in order
    # Resuming the finished run trains nothing more: nothing is set aside, nothing deleted.
    last = sorted((run_dir / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    train(small_cfg(*common, "trainer.max_steps=6", f"ckpt_path={last}"))
    assert metric_rows(run_dir)[:len(after)] == after
    assert not (run_dir / "csv" / "version_0" / "metrics.replaced-2.csv").exists()


def test_a_fresh_run_into_a_used_run_dir_sets_every_earlier_row_aside(small_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(small_cfg(*FAST, "trainer.max_steps=2", "checkpoint.enabled=false"))
    first = metric_rows(run_dir)
    train(small_cfg(*FAST, "trainer.max_steps=2", "checkpoint.enabled=false", "seed=1"))
    second = metric_rows(run_dir)
    assert side_rows(run_dir, 1) == first  # the earlier run, whole
    assert [int(r["step"]) for r in second if r["train/loss"]] == [0, 1] and second != first


def _fill(folder: Path) -> None:
    """Write into ``folder`` until its file system is full (ENOSPC): no byte is left for a rewrite."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_header_rewrite_that_does_not_fit_leaves_every_earlier_row(tmp_path, tmpfs):
    from scrimp.training.run_folder import appending_csv_logger

    disk = tmpfs(tmp_path / "small_disk", size="1m")
    folder = disk / "csv" / "version_0"
    folder.mkdir(parents=True)
    rows = [{"step": str(i), "train/loss": f"{1 / (i + 1):.6f}"} for i in range(20_000)]  # about 300 KB
    with open(folder / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["step", "train/loss"])
        writer.writeheader()
        writer.writerows(rows)
    original = (folder / "metrics.csv").read_bytes()
    _fill(disk)  # the wider file (one more comma a row) cannot fit, even in place of the old one
    writer = appending_csv_logger(disk).experiment  # a later segment, logging a new key
    writer.log_metrics({"val/loss": 1.0}, step=20_000)
    with pytest.raises(RunFolderError, match=r"^metrics file '.*metrics.csv' could not be written \(the disk is "
                                             r"full\); the previous metrics file there is intact"):
        writer.save()
    assert (folder / "metrics.csv").read_bytes() == original
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.csv"]  # no temporary left


def test_an_orphan_temporary_of_a_killed_writer_is_removed_at_start_and_nothing_else(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(run_dir / "checkpoints")], cwd=REPO)
    assert proc.wait() == -signal.SIGKILL
    orphan = run_dir / "checkpoints" / f".last.ckpt.tmp{proc.pid}"
    assert orphan.exists()  # what every crash during a write used to leave behind
    keep = [run_dir / "checkpoints" / "notes.tmp12", run_dir / "checkpoints" / "last.ckpt", run_dir / ".env.tmp"]
    for path in keep:
        path.write_text("user data")
    (run_dir / f".summary.json.tmp{os.getpid() + 1}").write_text("{")
    with open_run_folder(run_dir):
        pass
    assert not orphan.exists() and not list(run_dir.glob(".summary.json.tmp*"))
    assert all(p.read_text() == "user data" for p in keep)


def test_a_checkpoint_that_does_not_fit_is_one_sentence_and_the_previous_one_stays_intact(tmp_path, tmpfs):
    folder = tmpfs(tmp_path / "small_disk", size="2m")
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(1000.0)}, folder / "last.ckpt")
    with pytest.raises(RunFolderError, match=r"could not be written \(the disk is full .*\); the previous checkpoint "
                                             r"there is intact and the partial file was removed"):
        io.save_checkpoint({"w": torch.ones(1_000_000)}, folder / "last.ckpt")  # 4 MB on a 2 MiB disk
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert torch.equal(torch.load(folder / "last.ckpt")["w"], torch.arange(1000.0))


def test_a_full_disk_is_refused_before_the_data_is_touched(small_cfg, tmp_path, tmpfs):
    run_dir = tmpfs(tmp_path / "run", size="1m")  # llama_tiny's checkpoint is about 6 MiB
    fresh_cache = tmp_path / "fresh_cache"  # the tokenizer and token cache would be built here
    with pytest.raises(RunFolderError, match=r"has .* free but this run's checkpoints need about .*; free some space"):
        train(small_cfg(*FAST, "trainer.max_steps=2", f"data.cache_dir={fresh_cache}", run_dir=run_dir))
    assert not (run_dir / "csv").exists() and not list(run_dir.rglob("*.ckpt"))
    assert not fresh_cache.exists()  # sized from the meta-device model: no tokenizer was trained


@pytest.mark.parametrize("read_only", ["run_dir", "checkpoints"])
def test_a_read_only_folder_is_refused_before_training(small_cfg, tmp_path, tmpfs, read_only):
    run_dir = tmp_path / "run"
    mount_at = run_dir if read_only == "run_dir" else run_dir / "checkpoints"
    tmpfs(mount_at, read_only=True)  # chmod would not stop root; a read-only mount does
    where = str(mount_at) if read_only == "run_dir" else str(run_dir / "checkpoints")
    with pytest.raises(RunFolderError, match=rf"'{re.escape(where)}' is not writable \(the file system is read-only\)"):
        train(small_cfg(*FAST, "trainer.max_steps=2"))
    assert not (run_dir / "summary.json").exists()


def test_a_run_dir_that_is_a_file_is_one_sentence(small_cfg, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(RunFolderError, match=rf"run_dir '{re.escape(str(tmp_path / 'run'))}' is a file, not a folder"):
        train(small_cfg(*FAST, "trainer.max_steps=2"))


def test_checkpoints_can_be_turned_off_and_the_switch_is_checked(small_cfg, tmp_path):
    summary = train(small_cfg(*FAST, "trainer.max_steps=2", "checkpoint.enabled=false"))
    assert summary["checkpoint"] is None and not list((tmp_path / "run").rglob("*.ckpt"))
    with pytest.raises(ValueError, match=r"^checkpoint.enabled must be true or false.*, got 'yes'$"):
        train(small_cfg(*FAST, "trainer.max_steps=2", "checkpoint.enabled=yes"))


def test_a_summary_that_does_not_fit_is_one_sentence_and_the_earlier_one_stays(tmp_path, tmpfs):
    from scrimp.training.run import write_json_atomic

    folder = tmpfs(tmp_path / "small_disk", size="1m")
    write_json_atomic(folder / "summary.json", {"status": "completed"})
    with pytest.raises(RunFolderError, match=r"^file '.*summary.json' could not be written \(the disk is full\); the "
                                             r"previous file there is intact and the partial file was removed$"):
        write_json_atomic(folder / "summary.json", {"blob": "x" * 2_000_000})
    assert sorted(p.name for p in folder.iterdir()) == ["summary.json"]
    assert (folder / "summary.json").read_text() == '{\n  "status": "completed"\n}'
