"""``python -m experiments.train optim=galore optim.offload=disk``: the training job with the optimizer state
offloaded (scrimp.optim.offload through scrimp.optim.build's wrapper keys). The reference is the same run
without offload: the validation loss and the weights must be equal bit for bit on the CPU, and summary.json
must show where the state lived. Bad offload settings are one sentence before any work."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from scrimp.optim.offload.tiers import DiskTier
from scrimp.training.run import train
from scrimp.training.run_folder import RunFolderError
from scrimp.training.validate import ConfigError, check_train_config, disk_tier_holder
from training.test_run_folder import tmpfs  # noqa: F401  (the real-tmpfs fixture)

# GaLore at rank 8 with a projector refresh every 2 steps, deterministic, a checkpoint at step 2.
COMMON = ["optim=galore", "optim.rank=8", "optim.update_proj_gap=2", "trainer.max_steps=4",
          "trainer.val_check_interval=4", "trainer.deterministic=true", "checkpoint.every_n_steps=2",
          "checkpoint.keep=-1"]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """The same 4-step run in memory and with optim.offload=disk (default path), and a resume of the disk run
    from its step-2 checkpoint into optim.offload=cpu: three runs shared by the tests below."""
    from training.helpers import SMALL, compose_train

    root = tmp_path_factory.mktemp("offload-runs")

    def run(name: str, *overrides: str) -> dict:
        return train(compose_train([*SMALL, f"data.cache_dir={cache_dir}", f"run_dir={root / name}", *COMMON,
                                    *overrides]))

    plain = run("plain")
    disk = run("disk", "optim.offload=disk")
    resumed = run("resumed", "optim.offload=cpu", f"ckpt_path={root / 'disk' / 'checkpoints' / 'step000002.ckpt'}")
    return root, plain, disk, resumed


def test_disk_offload_gives_the_run_without_offload_bit_for_bit(runs):
    root, plain, disk, _ = runs
    assert disk["status"] == "completed" and disk["steps"] == 4
    assert disk["optimizer"]["class"] == "OffloadedOptimizer" and plain["optimizer"]["class"] == "GaLoreAdamW"
    assert disk["metrics"]["val/loss"] == plain["metrics"]["val/loss"]
    a, b = weights(root / "plain"), weights(root / "disk")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_summary_shows_the_state_on_disk_under_the_run_folder(runs):
    root, plain, disk, _ = runs
    on_disk = json.loads((root / "disk" / "summary.json").read_text())["memory_bytes"]
    in_memory = plain["memory_bytes"]
    # The moments moved to the disk tier; the projectors and counters stayed with the engine.
    assert on_disk["optimizer_state_tier_disk"] == in_memory["optimizer_state_moments"] > 0
    assert on_disk["optimizer_state_tier_device"] == in_memory["optimizer_state"] - in_memory["optimizer_state_moments"]
    assert on_disk["optimizer_state_tier_cpu"] == 0
    assert in_memory["optimizer_state_tier_device"] == in_memory["optimizer_state"]
    assert in_memory["optimizer_state_tier_disk"] == in_memory["optimizer_state_tier_cpu"] == 0
    # The default offload_path is inside the run folder, one preallocated file per parameter.
    files = list((root / "disk" / "offload").glob("state_*.bin"))
    assert len(files) == sum(1 for _ in _tiny_parameters(plain))
    assert sum(f.stat().st_size for f in files) >= on_disk["optimizer_state_tier_disk"]


def _tiny_parameters(summary):
    from scrimp.training.models import build_model

    return build_model("llama_tiny", vocab_size=summary["data"]["vocab_size"]).parameters()


def test_resume_of_a_disk_run_into_the_cpu_tier_equals_no_interruption(runs):
    root, _, disk, resumed = runs
    assert resumed["steps"] == 4 and resumed["memory_bytes"]["optimizer_state_tier_cpu"] > 0
    assert resumed["metrics"]["val/loss"] == disk["metrics"]["val/loss"]
    a, b = weights(root / "disk"), weights(root / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides,start,quoted", [
    (["optim.offload=ssd"], "optim.offload must be one of ['cpu', 'disk']", "'ssd'"),
    (["optim.offload_prefetch=-1"], "optim.offload_prefetch must be an integer >= 0", "-1"),
    (["optim=adamw", "+optim.offload=disk"], "optim.offload='disk' does not apply to adamw", None),
    (["optim=zo_sgd", "+optim.offload=cpu"], "optim.offload='cpu' does not apply to zo_sgd", None),
    (["optim.layerwise=true", "module.grad_clip=null", "optim.offload=disk"],
     "optim.offload='disk' does not work with layerwise=True", None),
    (["optim.offload_path=/tmp/somewhere"], "optim.offload_path applies only with offload='disk'", None),
    (["optim.offload=cpu", "optim.offload_prefetch=3"], "optim.offload_prefetch applies only with offload='disk' "
     "(offload='cpu' keeps the state in memory and reads nothing ahead)", "got 3"),
    (["optim.offload=disk", "optim.offload_path=''"], "optim.offload_path must be a non-empty string", "got ''"),
    (["trainer=ddp_cpu", "optim.offload=disk"], "optim.offload='disk' runs on one process", None),
])
def test_bad_offload_settings_are_one_sentence_before_any_work(small_cfg, tmp_path, monkeypatch, overrides, start,
                                                               quoted):
    _never_built(monkeypatch)
    with pytest.raises(ConfigError) as err:
        train(small_cfg(*overrides))
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message, message
    assert quoted is None or re.search(re.escape(quoted), message)
    assert not (tmp_path / "run").exists()


def _never_built(monkeypatch) -> None:
    import scrimp.training.run as run

    def never(*args, **kwargs):
        raise AssertionError("built before every input was checked")

    monkeypatch.setattr(run, "build_datamodule", never)
    monkeypatch.setattr(run, "build_module", never)


def test_an_offload_path_under_a_file_is_one_sentence_naming_the_key_before_any_work(small_cfg, tmp_path,
                                                                                     monkeypatch):
    _never_built(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        train(small_cfg("optim.offload=disk", f"optim.offload_path={a_file / 'state'}"))
    message = str(err.value)
    assert message.startswith(f"optim.offload_path {str(a_file / 'state')!r} cannot be created"), message
    assert "\n" not in message and a_file.read_text() == "not a folder"
    assert not (tmp_path / "run").exists()


def test_an_offload_path_held_by_a_live_disk_tier_is_refused_and_the_probe_takes_no_lock(small_cfg, tmp_path,
                                                                                        monkeypatch):
    _never_built(monkeypatch)
    held = tmp_path / "held"
    tier = DiskTier(held)
    try:
        with pytest.raises(ConfigError) as err:
            train(small_cfg("optim.offload=disk", f"optim.offload_path={held}"))
        assert str(err.value) == (f"optim.offload_path {str(held)!r} is in use by another optimizer's disk tier "
                                  f"(process {os.getpid()}); give each run its own optim.offload_path or wait for "
                                  "that run to end")
        assert not (tmp_path / "run").exists()
    finally:
        tier.close()
    # Released: the same config passes, and the probe left neither a lock nor a file behind.
    fresh = tmp_path / "fresh" / "state"
    check_train_config(small_cfg("optim.offload=disk", f"optim.offload_path={fresh}"))
    assert fresh.is_dir() and list(fresh.iterdir()) == []
    assert disk_tier_holder(held) is None
    DiskTier(held).close()


def test_checkpoint_space_counts_the_disk_tier_files(small_cfg, tmp_path, monkeypatch):
    """A disk where the checkpoints fit alone but not beside the tier's preallocated files: refused after the
    tier is built, naming it, instead of both checks passing apart and the checkpoints meeting a full disk."""
    import scrimp.training.run_folder as run_folder
    from scrimp.training.run import _fmt_bytes

    run_dir = tmp_path / "run"
    each, files = 1000, 4  # checkpoints at steps 2 and 4 (keep=-1), plus last.ckpt and its temporary

    def tier_bytes() -> int:
        return sum(f.stat().st_size for f in (run_dir / "offload").glob("state_*.bin"))

    monkeypatch.setattr(run_folder, "checkpoint_bytes_estimate", lambda model: each)
    monkeypatch.setattr(run_folder, "shutil", SimpleNamespace(
        disk_usage=lambda path: SimpleNamespace(free=files * each + 1 - tier_bytes())))
    with pytest.raises(RunFolderError) as err:
        train(small_cfg(*COMMON, "optim.offload=disk"))
    message = str(err.value)
    reserved = tier_bytes()
    assert reserved > 0 and "\n" not in message
    assert message.startswith(f"run_dir {str(run_dir)!r} has ") and f"{files} file(s) of up to 1000 B" in message
    assert message.endswith(f"or put optim.offload_path on another disk: the optimizer's disk tier has just reserved "
                            f"{_fmt_bytes(reserved)} under {str(run_dir / 'offload')!r}"), message
    assert disk_tier_holder(run_dir / "offload") is None  # the failed run closed its tier


def test_a_full_offload_path_is_one_sentence_naming_the_key_before_any_work(small_cfg, tmp_path, monkeypatch,
                                                                           request):
    _never_built(monkeypatch)
    mount = request.getfixturevalue("tmpfs")  # a real tmpfs; skipped where mounting is not allowed
    full = mount(tmp_path / "small_disk", size="64k")
    with pytest.raises(OSError), open(full / "filler", "wb") as filler:  # fill it up
        while True:
            filler.write(b"\0" * 4096)
            filler.flush()
    with pytest.raises(ConfigError) as err:
        train(small_cfg("optim.offload=disk", f"optim.offload_path={full}"))
    assert str(err.value).startswith(f"optim.offload_path {str(full)!r} is not writable (the disk is full)")
    assert not (tmp_path / "run").exists()
