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

import json
import math
import os
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
    StepCheckpoint,
    ThroughputMemoryCallback,
)
from scrimp.training.models import LLAMA_SIZES
from scrimp.training.module import CausalLMModule, check_checkpoint_optimizer, check_layerwise_world_size

SUMMARY_KEYS = (
    "status",          # "completed" or "pruned"
    "metrics",         # flat: val/loss, val/ppl, train/loss, train/tokens_per_s, memory/<category>
    "memory_bytes",    # params, grads, optimizer_state (+ by kind), peak_rss + live_tensors or peak_cuda_allocated
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


def check_model_name(name: str) -> None:
    """One sentence for a model that is neither a known size nor a path/hub name."""
    if name in LLAMA_SIZES or os.path.isdir(name) or "/" in name:
        return
    raise ValueError(
        f"model.name {name!r} is not a known model; choose one of {', '.join(sorted(LLAMA_SIZES))}, "
        "or give a local directory or hub name of the form 'org/name'"
    )


def _is_int(value) -> bool:
    """An int, or a float with an integral value (``trainer.max_steps=10.0`` trains 10 steps)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def check_trainer(trainer_cfg: DictConfig, checkpoint_cfg=None) -> None:
    """One sentence for step and checkpoint counts that Lightning or the schedule would refuse with
    a traceback, and for a GPU trainer on a machine without CUDA."""
    max_steps = trainer_cfg.get("max_steps", -1)
    if not _is_int(max_steps) or not (max_steps == -1 or max_steps >= 1):
        raise ValueError(f"trainer.max_steps must be a positive integer (or -1: run by epochs), got {max_steps!r}")
    accumulate = trainer_cfg.get("accumulate_grad_batches", 1)
    if not _is_int(accumulate) or accumulate < 1:
        raise ValueError(f"trainer.accumulate_grad_batches must be an integer >= 1, got {accumulate!r}")
    checkpoint_cfg = checkpoint_cfg or {}
    keep, every = checkpoint_cfg.get("keep", 1), checkpoint_cfg.get("every_n_steps", 100)
    if not _is_int(keep) or keep < -1:
        raise ValueError(f"checkpoint.keep must be an integer >= 0, or -1 to keep every checkpoint, got {keep!r}")
    if not _is_int(every) or every < 0:
        raise ValueError(f"checkpoint.every_n_steps must be an integer >= 0 (0: only last.ckpt), got {every!r}")
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator!r} needs a CUDA GPU but torch.cuda.is_available() is False "
            "on this machine; use trainer=cpu (or trainer=ddp_cpu)"
        )


def checkpoint_optimizer_name(path: Path) -> str | None:
    """The optimizer a scrimp checkpoint was written with (read without loading tensors into RAM)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        raise ValueError(f"ckpt_path {str(path)!r} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    return ckpt.get("scrimp", {}).get("optimizer_name")


def check_checkpoint(ckpt_path, optim_name: str) -> Path | None:
    """One sentence for a missing checkpoint or one written with a different optimizer."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"ckpt_path {str(path)!r} does not exist")
    check_checkpoint_optimizer(checkpoint_optimizer_name(path), optim_name, f"ckpt_path {str(path)!r}")
    return path


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


def build_module(cfg: DictConfig, vocab_size: int | None) -> CausalLMModule:
    """The ``CausalLMModule`` from ``cfg.model``, ``cfg.optim`` and ``cfg.module``; builds the optimizer."""
    module_cfg = cfg.get("module", {}) or {}
    module = CausalLMModule(
        model=cfg.model.name,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
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


def _loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    logger_cfg = cfg.get("logger") or {}
    loggers = []
    if logger_cfg.get("csv", True):
        loggers.append(CSVLogger(str(run_dir), name="csv", version=0))
    if logger_cfg.get("tensorboard", False):
        try:
            import tensorboard  # noqa: F401
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=0))
        except ImportError:
            import warnings

            warnings.warn("logger.tensorboard is on but tensorboard is not installed; logging to CSV only")
            if not loggers:
                loggers.append(CSVLogger(str(run_dir), name="csv", version=0))
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()):
    """A Lightning ``Trainer`` from ``cfg.trainer`` with our callbacks, loggers and atomic checkpoints."""
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    ckpt_cfg = cfg.get("checkpoint") or {}
    callbacks = [
        ThroughputMemoryCallback(),
        RankConsistencyCallback(),
        StepCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step{step:06d}", auto_insert_metric_name=False,
                       every_n_train_steps=int(ckpt_cfg.get("every_n_steps", 100)), save_top_k=int(ckpt_cfg.get("keep", 1)),
                       monitor=None, save_last=True),
        *extra_callbacks,
    ]
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar(leave=True))
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
    """Run one training job from a composed ``train`` config; returns the summary (also written to disk)."""
    import lightning as L

    started = time.perf_counter()
    # -- every input is checked before any training ------------------------------------------
    check_trainer(cfg.trainer, cfg.get("checkpoint"))
    ckpt_path = check_checkpoint(cfg.get("ckpt_path"), str(cfg.optim.name))
    check_model_name(str(cfg.model.name))
    run_dir = resolve_run_dir(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare()
    module = build_module(cfg, datamodule.tokenizer.vocab_size)
    if module.mode != "automatic" and int(cfg.trainer.get("accumulate_grad_batches", 1)) != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches must be 1 with optimizer {module.optimizer_name!r} "
            "(manual optimization); use the optimizer's own accumulate option instead"
        )
    # -- training -------------------------------------------------------------------------------
    trainer = build_trainer(cfg, run_dir, extra_callbacks=_pruning_callbacks(cfg))
    check_layerwise_world_size(module.mode, trainer.world_size)  # here too, so no process is started first
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
    """Write JSON to a temporary file, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


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
    table.add_row("optimizer state", _fmt_bytes(state))
    table.add_row("AdamW would hold", _fmt_bytes(adamw))
    if adamw:
        table.add_row("state / AdamW", f"{state / adamw:.3f}")
    console = Console()
    console.print(table)
    console.print(f"summary: {summary_path.resolve()}")
