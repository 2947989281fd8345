"""Lightning callbacks and plugins of the training stack: throughput, memory by category, pruning,
cross-rank state checks and atomic checkpoints.

Memory categories follow the GaLore paper's accounting (Zhao et al., 2024, Fig. 1 / Table 1):
weights, gradients, optimizer state; the optimizer state is measured exactly from the tensors
held in ``optimizer.state`` by ``scrimp.optim.memory.state_bytes``, and split by where it lives
(``optimizer_state_tier_<device|cpu|disk>``: an offloaded optimizer keeps its moments in a tier). The peak is
``torch.cuda.max_memory_allocated`` on a GPU; on the CPU it is the process peak RSS plus the
bytes of live tensors (``scrimp.profiling.live_tensor_bytes``).

    trainer = lightning.Trainer(callbacks=[ThroughputMemoryCallback()], plugins=[AtomicCheckpointIO()])
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


def tensor_bytes(tensors) -> int:
    """Bytes of the given tensors (``numel * element_size``), skipping ``None``."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Exact optimizer-state bytes by category via ``scrimp.optim.memory.state_bytes``."""
    from scrimp.optim.memory import state_bytes

    return {k: int(v) for k, v in state_bytes(optimizer).items()}


def state_bytes_by_tier(optimizer) -> dict[str, int]:
    """``optimizer_state_tier_<device|cpu|disk>``: where the optimizer state lives between steps.

    ``device`` is what ``optimizer.state`` holds (on a CPU-only machine the device is the CPU). An
    offloaded optimizer (``scrimp.optim.offload``) counts its tier's share itself, from the tier's
    layouts: reading a disk tier's moments back here would inflate the peak RSS measured next."""
    from scrimp.optim.memory import state_bytes

    by_tier = getattr(optimizer, "state_bytes_by_tier", None)
    counts = by_tier() if by_tier is not None else {"device": state_bytes(optimizer)["total"], "cpu": 0, "disk": 0}
    return {f"optimizer_state_tier_{tier}": int(size) for tier, size in counts.items()}


def peak_rss_bytes() -> int:
    """The process's peak resident set size (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def is_logging_step(trainer) -> bool:
    """Whether values logged in this training batch reach the loggers, or are the run's final ones.

    Lightning's logger connector writes step metrics only every ``log_every_n_steps`` optimizer steps
    (``_batches_that_stepped + 1``, its own rule); the last batch of the run (``max_steps`` or the end
    of the data) is added so the final metrics are current. Logging only on these batches saves the
    per-call cost of ``LightningModule.log`` (about 1 ms on a 2-core CPU) on every other step.
    Without a fit loop running (``trainer`` None or detached), every batch is a logging step.
    """
    loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
    if loop is None:
        return True
    step = loop.epoch_loop._batches_that_stepped + 1
    every = trainer.log_every_n_steps
    if (every and step % every == 0) or trainer.should_stop:
        return True
    if trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps:
        return True
    return bool(loop.epoch_loop.batch_progress.is_last_batch)


class ThroughputMemoryCallback(L.Callback):
    """Training tokens/s (all ranks, validation time excluded) and memory by category.

    ``skip_first`` steps are left out of the throughput (one-time warm-up: allocator, lazy state).
    Results are logged (``train/tokens_per_s``) and kept in ``self.summary()``.
    """

    def __init__(self, skip_first: int = 1):
        self.skip_first = skip_first
        self.tokens = 0
        self.seconds = 0.0
        self.batches = 0
        self._t0 = None
        self.grad_bytes = 0
        self.memory: dict[str, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Gradients are all present here (before zero_grad); layer-wise updates free them earlier.
        # Their size is fixed after the first step, so the scan runs on logging steps only.
        if self.batches == 0 or is_logging_step(trainer):
            self.grad_bytes = max(self.grad_bytes, tensor_bytes(p.grad for p in pl_module.parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - self._t0
        self.batches += 1
        if self.batches > self.skip_first:
            self.tokens += batch["input_ids"].numel() * trainer.world_size
            self.seconds += elapsed
            if is_logging_step(trainer):
                pl_module.log("train/tokens_per_s", self.tokens_per_s, on_step=True, on_epoch=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def measure_memory(self, pl_module, optimizer) -> dict[str, int]:
        """Memory by category now; the peak is since process start (CPU) or the last reset (GPU)."""
        params = list(pl_module.parameters())
        grads_now = tensor_bytes(p.grad for p in params)
        memory = {
            "params": tensor_bytes(params),
            "grads": max(self.grad_bytes, grads_now),
        }
        state = optimizer_state_bytes(optimizer)
        memory["optimizer_state"] = state["total"]
        memory.update({f"optimizer_state_{k}": v for k, v in state.items() if k != "total"})
        memory.update(state_bytes_by_tier(optimizer))
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            memory["peak_cuda_allocated"] = int(torch.cuda.max_memory_allocated(pl_module.device))
        else:
            from scrimp.profiling import live_tensor_bytes

            memory["peak_rss"] = peak_rss_bytes()
            memory["live_tensors"] = live_tensor_bytes("cpu")
        self.memory = memory
        return memory

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is not None:
            self.measure_memory(pl_module, optimizer)

    def summary(self) -> dict:
        return {"tokens_per_s": self.tokens_per_s, "timed_tokens": self.tokens, "timed_seconds": self.seconds,
                "memory_bytes": dict(self.memory)}


def state_digest(optimizer) -> str:
    """SHA-256 of every tensor in the optimizer state, in a fixed order (equal state <=> equal digest)."""
    h = hashlib.sha256()
    state = optimizer.state_dict().get("state", {})
    for key in sorted(state, key=str):
        for name in sorted(state[key], key=str):
            value = state[key][name]
            h.update(f"{key}/{name}".encode())
            if isinstance(value, torch.Tensor):
                h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


class RankConsistencyCallback(L.Callback):
    """Under DDP, checks at the end of training that every rank holds the same optimizer state.

    GaLore/FRUGAL projectors come from the SVD of the all-reduced gradient; they are the same on
    every rank only if computed deterministically. Any difference raises, naming the ranks.
    """

    def __init__(self):
        self.identical: bool | None = None
        self.digest: str | None = None

    def on_train_end(self, trainer, pl_module):
        if not trainer.optimizers:
            return
        self.digest = state_digest(trainer.optimizers[0])
        if trainer.world_size == 1:
            self.identical = True
            return
        local = torch.tensor(list(bytes.fromhex(self.digest)), dtype=torch.int64, device=pl_module.device)
        gathered = trainer.strategy.all_gather(local)
        gathered = gathered.reshape(trainer.world_size, -1)
        self.identical = bool((gathered == gathered[0]).all())
        if not self.identical:
            raise RuntimeError(
                "optimizer state differs across DDP ranks (projectors not computed deterministically); "
                "set trainer.deterministic=true"
            )


class OptunaPruningCallback(L.Callback):
    """Reports the validation loss to an Optuna trial through its storage, and prunes.

    The trial is identified by (storage URL, study name, trial number), so the job and the
    sweeper may be different processes or machines. The pruner is rebuilt from the ``_target_``
    config the sweeper stored in the study's user attribute ``hydra_pruner`` (Optuna keeps no
    pruner in its storage); without one, Optuna's default (median) pruner decides.
    Multi-objective studies cannot prune (Optuna limitation): they only record.
    """

    def __init__(self, storage: str, study_name: str, trial_number: int, monitor: str = "val/loss"):
        import optuna
        from hydra.utils import instantiate

        self.monitor = monitor
        study = optuna.load_study(study_name=study_name, storage=storage)
        pruner_cfg = study.user_attrs.get("hydra_pruner")
        pruner = instantiate(pruner_cfg) if pruner_cfg else None
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        trials = self.study.get_trials(deepcopy=False)
        matching = [t for t in trials if t.number == trial_number]
        if not matching:
            raise ValueError(f"optuna trial number {trial_number} is not in study {study_name!r}")
        self.trial = optuna.trial.Trial(self.study, matching[0]._trial_id)
        self.pruned = False

    def on_validation_end(self, trainer, pl_module):
        import optuna

        if trainer.sanity_checking or len(self.study.directions) > 1:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        step = trainer.global_step
        if trainer.is_global_zero:
            self.trial.report(float(value), step=step)
        if self.trial.should_prune():
            self.pruned = True
            raise optuna.TrialPruned(f"pruned at step {step} with {self.monitor}={float(value):.4f}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the same folder, then renamed over the target.

    A run killed mid-write leaves the previous checkpoint intact and loadable (``os.replace`` is
    atomic on POSIX and Windows within one filesystem); the orphan temporary it leaves is removed
    when the folder is next opened (``scrimp.training.run_folder.open_run_folder``). A write that
    fails (disk full, folder made read-only during the run) removes the temporary and raises one
    sentence (``RunFolderError``) instead of torch's "basic_ios::clear: iostream error".
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        from scrimp.training.run_folder import checkpoint_write_error, ensure_folder

        path = Path(path)
        ensure_folder(path.parent, "checkpoint folder")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            # our own handle, closed however torch.save ends: torch's writer, kept alive by the
            # traceback of a failed write, would otherwise hold the deleted file's space and its disk
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            sentence = checkpoint_write_error(path, err)  # before the partial file is removed: see there
            if sentence is None:
                raise
            raise sentence from err
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def step_checkpoints(run_dir: Path, checkpoint_cfg) -> list:
    """The ``StepCheckpoint`` of ``checkpoint.*`` in ``run_dir/checkpoints``; none when ``checkpoint.enabled``
    is false (sweep trials: a checkpoint per trial is rarely wanted and costs the model's size each)."""
    from scrimp.training.run_folder import checkpoint_enabled

    checkpoint_cfg = checkpoint_cfg or {}
    if not checkpoint_enabled(checkpoint_cfg):
        return []
    return [StepCheckpoint(dirpath=str(Path(run_dir) / "checkpoints"), filename="step{step:06d}",
                           auto_insert_metric_name=False, every_n_train_steps=int(checkpoint_cfg.get("every_n_steps", 100)),
                           save_top_k=int(checkpoint_cfg.get("keep", 1)), monitor=None, save_last=True)]


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every N optimizer steps, with two gaps of Lightning 2.x's closed.

    - A restore forgets which step was saved last, so with gradient accumulation the first
      micro-batch after a resume saw ``global_step % N == 0`` and wrote a checkpoint in the middle
      of a window (whose half-accumulated gradient a checkpoint does not hold). The resumed step
      counts as saved.
    - ``last.ckpt`` was only written together with a step checkpoint, so it lagged behind the final
      step whenever ``max_steps`` is not a multiple of N. It is written at the end of training too.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
