"""The training job behind ``python -m experiments.train``: config in, trained model and summary.json out.

Checks every input first (one sentence per bad input, before any training), builds the data
module, the ``CausalLMModule`` and a Lightning ``Trainer`` from the Hydra config, trains,
evaluates, and writes ``summary.json`` (keys in ``SUMMARY_KEYS``) in the run directory.
The layout follows lightning-hydra-template's ``train.py`` (config groups, ``optimized_metric``
returned to the sweeper).

    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=".../conf", version_base="1.3"):
        cfg = compose("train", overrides=["trainer.max_steps=20"])
    summary = scrimp.training.run.train(cfg)
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from scrimp.training.callbacks import (
    AtomicCheckpointIO,
    OptunaPruningCallback,
    RankConsistencyCallback,
    ThroughputMemoryCallback,
    step_checkpoints,
)
from scrimp.training.models import LLAMA_SIZES
from scrimp.training.module import CausalLMModule
from scrimp.training.run_folder import (
    RunFolderError,
    appending_csv_logger,
    check_checkpoint_space,
    checkpoint_enabled,
    open_run_folder,
    write_atomic,
)
from scrimp.training.validate import (
    check_resume,
    check_resume_vocab,
    check_train_config,
    meta_model,
    offload_settings,
)

SUMMARY_KEYS = (
    "status",          # "completed" or "pruned"
    "metrics",         # flat: val/loss, val/ppl, train/loss, train/tokens_per_s, memory/<category>
    "memory_bytes",    # params, grads, optimizer_state (+ by kind and optimizer_state_tier_<device|cpu|disk>),
                       # peak_rss + live_tensors or peak_cuda_allocated
    "adamw_state_bytes",  # what torch AdamW would hold for the same trainable parameters
    "optimizer",       # name and optimization mode (automatic, zeroth_order, layerwise, manual)
    "data",            # documents, tokens and blocks per split, tokenizer
    "steps",           # optimizer steps taken
    "world_size",
    "ranks_identical_state",  # every rank ended with the same optimizer state (None: not checked)
    "checkpoint",      # path of the last checkpoint
    "config",          # the resolved config
    "git_commit",
    "versions",        # python and package versions
    "wall_time_s",
    "run_dir",
)
_PACKAGES = ("torch", "lightning", "transformers", "datasets", "tokenizers", "optuna", "hydra-core",
             "omegaconf", "bitsandbytes", "numpy", "scrimp")


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``cfg.run_dir``, else Hydra's output dir of this job, else ``./outputs/run``."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not running under @hydra.main
        return Path("outputs") / "run"


def adamw_state_bytes(model: torch.nn.Module) -> int:
    """Bytes torch AdamW holds for ``model``: exp_avg and exp_avg_sq in each trainable param's dtype."""
    return sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def git_commit() -> str | None:
    """The commit of the checkout that holds this package (None outside a git checkout)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    """Python and installed versions of the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_datamodule(data_cfg: DictConfig):
    """The data module from ``cfg.data`` (a ``_target_`` node)."""
    from hydra.utils import get_class

    kwargs = OmegaConf.to_container(data_cfg, resolve=True)
    target = kwargs.pop("_target_", "scrimp.training.data.TextDataModule")
    return get_class(target)(**kwargs)


def offload_state_dir(run_dir: Path) -> Path:
    """Where ``optim.offload=disk`` keeps the optimizer state when ``optim.offload_path`` is null."""
    return run_dir / "offload"


def build_module(cfg: DictConfig, vocab_size: int | None, run_dir: Path | None = None) -> CausalLMModule:
    """The ``CausalLMModule`` from ``cfg.model``, ``cfg.optim`` and ``cfg.module``; builds the optimizer.

    With ``optim.offload=disk`` and no ``optim.offload_path``, the state files go to ``<run_dir>/offload``."""
    module_cfg = cfg.get("module", {}) or {}
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim.update(offload_settings(optim, offload_state_dir(run_dir if run_dir is not None else resolve_run_dir(cfg))))
    module = CausalLMModule(
        model=cfg.model.name,
        optim=optim,
        vocab_size=vocab_size if cfg.model.name in LLAMA_SIZES else None,
        seed=int(cfg.seed),
        warmup_steps=int(module_cfg.get("warmup_steps", 0)),
        min_lr_ratio=float(module_cfg.get("min_lr_ratio", 0.1)),
        total_steps=module_cfg.get("total_steps"),
        grad_clip=module_cfg.get("grad_clip"),
        model_overrides=OmegaConf.to_container(cfg.model.overrides, resolve=True) if cfg.model.get("overrides") else {},
    )
    module.build_optimizer()
    return module


def check_space_after_build(run_dir: Path, module: CausalLMModule, cfg: DictConfig, checked_before: bool) -> None:
    """The checkpoints' free-space check on the built model and optimizer: for a hub model (not sized
    before) and after an ``optim.offload=disk`` tier has preallocated its files.

    The check before the data cannot see the tier's files: on run_dir's disk, both would pass apart and
    the checkpoints would later meet a full disk. Measured after the preallocation, the free space
    already excludes them (on another disk they change nothing), so the same check covers both.
    """
    tier = getattr(module.build_optimizer(), "tier", None)
    on_disk = getattr(tier, "name", None) == "disk"
    if checked_before and not on_disk:
        return
    try:
        check_checkpoint_space(run_dir, module.model, cfg.get("checkpoint"), cfg.trainer.get("max_steps", -1))
    except RunFolderError as err:
        if not on_disk:
            raise
        raise RunFolderError(f"{err}, or put optim.offload_path on another disk: the optimizer's disk tier has "
                             f"just reserved {_fmt_bytes(tier.reserved)} under {str(tier.path)!r}") from None


def _loggers(cfg: DictConfig, run_dir: Path) -> list:
    """The Lightning loggers of ``cfg.logger`` (``conf/logger/``): each entry is a ``_target_`` config,
    built with ``save_dir=<run_dir>``; a null entry is dropped. A logger whose package is not installed
    (tensorboard, wandb) is left out with a warning, and the CSV log is kept as the fallback."""
    import warnings

    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    specs = {str(name): spec for name, spec in (cfg.get("logger") or {}).items() if spec is not None}
    loggers = []
    for name, spec in specs.items():
        try:
            loggers.append(instantiate(spec, save_dir=str(run_dir)))
        except (ImportError, InstantiationException) as err:
            missing = err if isinstance(err, ImportError) else err.__cause__
            if not isinstance(missing, ImportError):
                raise
            warnings.warn(f"logger.{name} is on but its package is not installed ({missing}); leaving it out")
    if specs and not loggers:
        loggers.append(appending_csv_logger(run_dir))  # a resume appends to the earlier rows
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()):
    """A Lightning ``Trainer`` from ``cfg.trainer`` with our callbacks, loggers and atomic checkpoints."""
    import lightning as L

    from scrimp.training.console import StepProgressBar

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    checkpoints = step_checkpoints(run_dir, cfg.get("checkpoint"))
    if not checkpoints:  # checkpoint.enabled=false: Lightning must not add its default checkpoint either
        trainer_cfg["enable_checkpointing"] = False
    callbacks = [
        ThroughputMemoryCallback(),
        RankConsistencyCallback(),
        *checkpoints,
        *extra_callbacks,
    ]
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar(leave=True))
    return L.Trainer(default_root_dir=str(run_dir), logger=_loggers(cfg, run_dir), callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()], enable_model_summary=False, **trainer_cfg)


def _flat_metrics(trainer, throughput: ThroughputMemoryCallback) -> dict[str, float]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    metrics["train/tokens_per_s"] = throughput.tokens_per_s
    for key, value in throughput.memory.items():
        metrics[f"memory/{key}"] = float(value)
    return metrics


def _pruning_callbacks(cfg: DictConfig) -> list:
    trial = cfg.get("optuna_trial")
    if not trial:
        return []
    return [OptunaPruningCallback(trial.storage, trial.study_name, int(trial.number), monitor="val/loss")]


def train(cfg: DictConfig) -> dict:
    """Run one training job from a composed ``train`` config; returns the summary (also written to disk).

    The run folder is held for the whole job (``scrimp.training.run_folder``): a second process
    writing the same ``run_dir`` is refused, and an unwritable folder is one sentence before any work.
    """
    with contextlib.ExitStack() as held:  # released however the job ends
        return _train(cfg, held)


def _train(cfg: DictConfig, held: contextlib.ExitStack) -> dict:
    import lightning as L

    started = time.perf_counter()
    # -- every input is checked before any training ------------------------------------------
    container = check_train_config(cfg)  # scrimp.training.validate: every key, the world size, the optimizer
    resume = check_resume(container)  # and the checkpoint
    ckpt_path = resume.path if resume else None
    run_dir = resolve_run_dir(cfg)
    held.enter_context(open_run_folder(run_dir, checkpoints=checkpoint_enabled(cfg.get("checkpoint"))))
    # The checkpoints' size from the model on the meta device: a full disk is refused before the
    # tokenizer and token cache are built (tens of seconds on a first run).
    planned = meta_model(container)  # None for a hub model: sized once it is built
    if planned is not None:
        check_checkpoint_space(run_dir, planned, cfg.get("checkpoint"), cfg.trainer.get("max_steps", -1))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare()
    check_resume_vocab(resume, datamodule.tokenizer.vocab_size if cfg.model.name in LLAMA_SIZES else None)
    module = build_module(cfg, datamodule.tokenizer.vocab_size, run_dir)
    close = getattr(module.build_optimizer(), "close", None)  # an offloaded optimizer releases its disk tier
    if close is not None:
        held.callback(close)
    check_space_after_build(run_dir, module, cfg, checked_before=planned is not None)
    module.fresh_optimizer_state = bool(resume and resume.fresh_optimizer)
    # -- training -------------------------------------------------------------------------------
    trainer = build_trainer(cfg, run_dir, extra_callbacks=_pruning_callbacks(cfg))
    for logger in trainer.loggers:  # the CSV rows this run replays are set aside (run_folder.appending_csv_logger)
        if hasattr(logger, "resume_at"):
            logger.resume_at(resume.step if resume else 0)
    throughput = next(c for c in trainer.callbacks if isinstance(c, ThroughputMemoryCallback))
    consistency = next(c for c in trainer.callbacks if isinstance(c, RankConsistencyCallback))
    status = "completed"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
        if module.last_val_step != trainer.global_step:
            # validate() resets callback_metrics: keep the last training metrics for the summary.
            # Inside the try: the pruner may also decide on this last validation.
            train_metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            trainer.validate(module, datamodule=datamodule, verbose=False)  # final metrics at the last step
            trainer.callback_metrics.update({k: v for k, v in train_metrics.items()
                                             if k not in trainer.callback_metrics})
    except BaseException as err:
        if type(err).__name__ != "TrialPruned":
            raise
        status = "pruned"
        pruned = err
    # -- summary ----------------------------------------------------------------------------------
    optimizer = module.build_optimizer()
    if not throughput.memory:
        throughput.measure_memory(module, optimizer)
    summary = {
        "status": status,
        "metrics": _flat_metrics(trainer, throughput),
        "memory_bytes": dict(throughput.memory),
        "adamw_state_bytes": adamw_state_bytes(module.model),
        "optimizer": {"name": module.optimizer_name, "mode": module.mode, "class": type(optimizer).__name__},
        "data": dict(datamodule.stats),
        "steps": int(trainer.global_step),
        "world_size": int(trainer.world_size),
        "ranks_identical_state": consistency.identical,
        "checkpoint": _last_checkpoint(trainer),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "wall_time_s": time.perf_counter() - started,
        "run_dir": str(run_dir.resolve()),
    }
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "summary.json", summary)
        if cfg.get("print_table", False):
            print_summary_table(summary, run_dir / "summary.json")
    if status == "pruned":
        raise pruned
    return summary


def _last_checkpoint(trainer) -> str | None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            return str(Path(callback.last_model_path).resolve())
    return None


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON atomically (``run_folder.write_atomic``): a failed write (disk full) is one sentence,
    leaves no temporary and keeps the earlier file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda file: file.write(json.dumps(payload, indent=2, sort_keys=False, default=str)))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def print_summary_table(summary: dict, summary_path: Path) -> None:
    """The end-of-run table: validation perplexity, tokens/s, optimizer-state bytes vs AdamW."""
    from rich.console import Console
    from rich.table import Table

    m = summary["metrics"]
    state = summary["memory_bytes"].get("optimizer_state", float("nan"))
    adamw = summary["adamw_state_bytes"]
    table = Table(title=f"{summary['config']['model']['name']} + {summary['optimizer']['name']}, "
                        f"{summary['steps']} steps")
    table.add_column("metric")
    table.add_column("value", justify="right")
    ppl = m.get("val/ppl", float("nan"))
    table.add_row("validation perplexity", f"{ppl:.2f}" if math.isfinite(ppl) else "n/a")
    table.add_row("validation loss", f"{m.get('val/loss', float('nan')):.4f}")
    table.add_row("training tokens/s", f"{m.get('train/tokens_per_s', float('nan')):.0f}")
    offloaded = {tier: summary["memory_bytes"].get(f"optimizer_state_tier_{tier}", 0) for tier in ("cpu", "disk")}
    state += sum(offloaded.values())  # an offloaded optimizer's tier holds the moments (optim.offload)
    table.add_row("optimizer state", _fmt_bytes(state))
    for tier, size in offloaded.items():
        if size:
            table.add_row(f"  of which offloaded to {tier}", _fmt_bytes(size))
    table.add_row("AdamW would hold", _fmt_bytes(adamw))
    if adamw:
        table.add_row("state / AdamW", f"{state / adamw:.3f}")
    console = Console()
    console.print(table)
    console.print(f"summary: {summary_path.resolve()}")
