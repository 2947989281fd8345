"""One validation layer for the command line: every key of a composed config, checked before any work.

A bad input must end in one sentence that names the full key, the value given and what is allowed,
before the data, the tokenizer or the model is built (the design's "explicit incompatibilities").
The rules are written once, as data: ``TRAIN_RULES`` and ``TTC_RULES`` map each key to a ``Rule``
(what is allowed, with the reason in the phrase), a few cross-key rules follow, and
``check_train_config`` / ``check_ttc_config`` apply them. Entry points catch ``ConfigError`` (a
``ValueError``) and print the sentence without a traceback.

    from scrimp.training.validate import check_resume, check_train_config
    plan = check_resume(check_train_config(cfg))   # None when not resuming; raises ConfigError, e.g.
    # "seed must be an integer in [0, 4294967295] (it seeds torch, numpy and the data stream), got 'abc'"

Resume: ``read_checkpoint_hparams`` reads what a checkpoint was written with (memory-mapped, no
tensors loaded) and ``check_resume`` compares it with the config: optimizer or model settings that
differ are refused naming both values, except the settings that may change on resume (the lr, the
schedule, max_steps, where the state lives) and those the user lists in ``resume.allow_changed``.
"""

from __future__ import annotations

import difflib
import fcntl
import inspect
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scrimp.checks import is_integer, is_real
from scrimp.optim.build import KNOWN_NAMES

# The optimizer keys that say where its state lives (scrimp.optim.build's offload wrapper).
OFFLOAD_KEYS = ("offload", "offload_path", "offload_prefetch")


class ConfigError(ValueError):
    """A bad input, as one sentence naming the key; raised before any work starts."""


# -- rules ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What a key accepts: a predicate and the phrase that completes "<key> must ...", e.g. "be an
    integer >= 1 (why)"; the value given follows it in the sentence."""

    allowed: str
    accept: Callable[[Any], bool]

    def check(self, key: str, value) -> None:
        if not self.accept(value):
            raise ConfigError(f"{key} must {self.allowed}, got {value!r}")


def _noun(rule: Rule) -> str:
    """The rule's phrase without its leading "be ", to compose it into another phrase."""
    return rule.allowed.removeprefix("be ")


def _why(why: str) -> str:
    return f" ({why})" if why else ""


def integer(low: int | None = None, high: int | None = None, *, also: Sequence[int] = (), why: str = "",
            say: str | None = None) -> Rule:
    """An integer in [low, high] (or one of ``also``). Integral floats count: ``max_steps=10.0`` is 10."""
    def accept(v):
        if not (is_integer(v) or (isinstance(v, float) and v.is_integer())):
            return False
        return v in also or ((low is None or v >= low) and (high is None or v <= high))

    if say is None:
        bound = (f"in [{low}, {high}]" if low is not None and high is not None
                 else f">= {low}" if low is not None else f"<= {high}" if high is not None else "")
        say = f"an integer {bound}".rstrip() + "".join(f" or {a}" for a in also)
    return Rule(f"be {say}{_why(why)}", accept)


def number(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False, open_high: bool = False,
           why: str = "") -> Rule:
    """A finite real in the given range (booleans and strings are not numbers)."""
    def accept(v):
        if not (is_real(v) and math.isfinite(v)):
            return False
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    if math.isinf(high):
        where = "" if math.isinf(low) else f" {'>' if open_low else '>='} {low:g}"
    else:
        where = f" in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return Rule(f"be a finite number{where}{_why(why)}", accept)


def choice(options: Sequence, why: str = "") -> Rule:
    return Rule(f"be one of {list(options)}{_why(why)}", lambda v: isinstance(v, str | int) and not isinstance(v, bool)
                and v in options)


def boolean(why: str = "") -> Rule:
    return Rule(f"be true or false{_why(why)}", lambda v: isinstance(v, bool))


def text(why: str = "") -> Rule:
    return Rule(f"be a non-empty string{_why(why)}", lambda v: isinstance(v, str) and bool(v.strip()))


def optional(rule: Rule) -> Rule:
    """``rule`` or null."""
    return Rule(f"{rule.allowed}, or null", lambda v: v is None or rule.accept(v))


def either(*rules: Rule, why: str = "") -> Rule:
    return Rule("be " + " or ".join(_noun(r) for r in rules) + _why(why), lambda v: any(r.accept(v) for r in rules))


def list_of(rule: Rule, *, length: int | None = None, min_length: int = 0, why: str = "") -> Rule:
    def accept(v):
        if not isinstance(v, list | tuple) or len(v) < min_length or (length is not None and len(v) != length):
            return False
        return all(rule.accept(x) for x in v)

    if length is not None:
        say = f"a list of {length} items, each {_noun(rule)}"
    else:
        say = f"a {'non-empty ' if min_length else ''}list, each item {_noun(rule)}"
    return Rule(f"be {say}{_why(why)}", accept)


def mapping(why: str = "") -> Rule:
    return Rule(f"be a mapping of keys to values{_why(why)}", lambda v: isinstance(v, Mapping))


def check_rules(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Apply each rule to its key; a key absent from ``values`` keeps its code default and passes."""
    for key, rule in rules.items():
        if key in values:
            rule.check(key, values[key])


# -- the training config ----------------------------------------------------------------------------
_PRECISIONS = ("64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
               "transformer-engine", "transformer-engine-float16", 64, 32, 16)
_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

TRAIN_RULES: dict[str, Rule] = {
    "seed": integer(0, 2**32 - 1, why="it seeds torch, numpy and the data stream"),
    "ckpt_path": optional(text(why="a checkpoint file written by an earlier run")),
    "run_dir": optional(either(text(), integer(), why="the folder of logs, checkpoints and summary.json")),
    "print_table": boolean(),
    "optimized_metric": optional(either(text(), list_of(text(), min_length=1),
                                        why="the metric name(s) returned to a sweeper")),
    "checkpoint.enabled": boolean(why="false: no checkpoint is written"),
    "checkpoint.every_n_steps": integer(0, say="an integer >= 0 (0: only last.ckpt)"),
    "checkpoint.keep": integer(0, also=(-1,), say="an integer >= 0, or -1 to keep every checkpoint"),
    "resume.allow_changed": list_of(text(), why="keys such as optim.rank that may differ from the checkpoint's"),
    # trainer: what Lightning would otherwise refuse late, or with a traceback
    "trainer.accelerator": choice(_ACCELERATORS),
    "trainer.devices": either(integer(1, also=(-1,)), list_of(integer(0), min_length=1),
                              Rule("be 'auto' or device indices such as '0,1'",
                                   lambda v: isinstance(v, str) and re.fullmatch(r"auto|-1|\d+(,\s*\d+)*,?", v) is not None),
                              why="how many devices, or which, to train on"),
    "trainer.strategy": text(why="a Lightning strategy such as auto, ddp or fsdp"),
    "trainer.precision": choice(_PRECISIONS),
    "trainer.max_steps": integer(1, also=(-1,), say="a positive integer (or -1: run by epochs)"),
    "trainer.max_epochs": optional(integer(1, also=(-1,), why="-1: no epoch limit, with max_steps")),
    "trainer.min_steps": optional(integer(0)),
    "trainer.check_val_every_n_epoch": optional(integer(1)),
    "trainer.val_check_interval": either(integer(1, why="validate every this many training batches"),
                                         number(0, 1, open_low=True, why="a fraction of an epoch")),
    "trainer.limit_val_batches": optional(either(integer(0), number(0, 1, why="a fraction of the held-out set"))),
    "trainer.limit_train_batches": optional(either(integer(1), number(0, 1, open_low=True))),
    "trainer.accumulate_grad_batches": integer(1, say="an integer >= 1"),
    "trainer.log_every_n_steps": integer(1, why="log metrics every this many optimizer steps"),
    "trainer.deterministic": either(boolean(), choice(("warn",))),
    "trainer.enable_progress_bar": boolean(),
    "trainer.enable_checkpointing": boolean(),
    "trainer.num_sanity_val_steps": integer(0, also=(-1,)),
    "trainer.num_nodes": integer(1),
    "trainer.gradient_clip_val": Rule("be null (clipping is module.grad_clip)", lambda v: v is None),
    "trainer.fast_dev_run": either(boolean(), integer(1)),
    "trainer.benchmark": optional(boolean()),
    # data
    "data._target_": text(why="the data module's class, e.g. scrimp.training.data.TextDataModule"),
    "data.source": choice(("stdlib", "files", "hub")),
    "data.text_field": text(why="the column (json/jsonl/parquet) that holds each document"),
    "data.tokenizer": optional(text(why="a transformers tokenizer name or path; null trains a byte-level BPE")),
    "data.vocab_size": integer(1, why="the size of the byte-level BPE trained on the corpus"),
    "data.block_size": integer(2, why="each block must hold at least one input token and its next-token target"),
    "data.batch_size": integer(1, why="blocks per batch and process"),
    "data.val_fraction": number(0, 1, open_low=True, open_high=True, why="the share of documents held out"),
    "data.val_blocks": optional(integer(1, why="at most this many held-out blocks are evaluated; null: all")),
    "data.max_documents": optional(integer(2, why="a held-out split needs at least two documents")),
    "data.seed": integer(0, 2**32 - 1),
    "data.cache_dir": optional(text()),
    "data.num_workers": integer(0),
    "data.streaming": boolean(),
    "data.hub_name": optional(text()),
    "data.hub_config": optional(text()),
    # model
    "model.name": text(why="a named size such as llama_tiny, a local folder or a hub name 'org/name'"),
    "model.overrides": optional(mapping(why="extra LlamaConfig fields")),
    # module: the schedule and clipping
    "module.warmup_steps": integer(0, why="optimizer steps of linear warmup"),
    "module.min_lr_ratio": number(0, 1, why="the cosine schedule ends at min_lr_ratio * lr"),
    "module.total_steps": optional(integer(1, why="the schedule's length; null: trainer.max_steps")),
    "module.grad_clip": optional(number(0, why="the global gradient-norm bound; 0 or null: off")),
    # optim: the keys every optimizer shares; the optimizer's own constructor checks the rest
    "optim.name": choice(KNOWN_NAMES),
    "optim.lr": number(0, open_low=True, why="the step size"),
    "optim.weight_decay": optional(number(0)),
    "optim.eps": optional(number(0, open_low=True)),
    "optim.betas": optional(list_of(number(0, 1, open_high=True), length=2)),
    "optim.rank": optional(integer(1, why="the dimension of the projected subspace")),
    "optim.update_proj_gap": optional(integer(1, why="steps between projector refreshes")),
    "optim.update_gap": optional(integer(1, why="steps between subspace refreshes")),
    "optim.scale": optional(number(0)),
    "optim.density": optional(number(0, 1, open_low=True, why="the share of each weight kept in the subspace")),
    "optim.layerwise": optional(boolean()),
    "optim.accumulate": optional(integer(1)),
    "optim.n_queries": optional(integer(1)),
    "optim.seed": optional(integer(0)),
    "optim.fused": optional(boolean()),
    "optim.momentum": optional(number(0, 1, open_high=True)),
    "optim.target_modules": optional(either(text(), list_of(text(), min_length=1),
                                            why="'all-linear' or a list of regular expressions")),
    "optim.offload": optional(choice(("cpu", "disk"), why="where the optimizer state lives between steps")),
    "optim.offload_path": optional(text(why="the disk tier's directory; null: <run_dir>/offload")),
    "optim.offload_prefetch": optional(integer(0, why="states the disk tier reads ahead; null: 2")),
}

# Keys inside these sections must be known: a typo would otherwise be ignored or fail late.
_MODULE_KEYS = ("warmup_steps", "min_lr_ratio", "total_steps", "grad_clip")
_MODEL_KEYS = ("name", "overrides")
_RESUME_KEYS = ("allow_changed",)
# Sections another part of the code may extend: only a near-miss of a known key is refused there.
_TOP_LEVEL_KEYS = ("seed", "ckpt_path", "run_dir", "optimized_metric", "checkpoint", "print_table", "resume",
                   "trainer", "data", "model", "module", "optim", "logger", "optuna_trial", "hydra")
_CHECKPOINT_KEYS = ("enabled", "every_n_steps", "keep")


def _container(cfg) -> dict:
    """A plain, resolved dict; an interpolation that cannot be resolved is one sentence."""
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover - hydra brings omegaconf
        return dict(cfg)
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "a config value"
        raise ConfigError(f"{key} cannot be resolved ({str(err).splitlines()[0]})") from None


def flatten(container: Mapping, prefix: str = "", leaves: Sequence[str] = ()) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; mappings named in ``leaves`` stay whole."""
    flat: dict[str, Any] = {}
    for key, value in container.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and full not in leaves:
            flat.update(flatten(value, f"{full}.", leaves))
            if not value:
                flat[full] = value
        else:
            flat[full] = value
    return flat


def _unknown_key(key: str, known: Sequence[str], section: str, strict: bool) -> None:
    """Refuse ``key`` when it is not ``known``: always when ``strict``, else only a near-miss of a known key."""
    if key in known:
        return
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not strict and not near:
        return
    where = f"{section}.{key}" if section else key
    hint = f"did you mean {(section + '.') if section else ''}{near[0]}?" if near else \
        f"the known keys are {sorted(known)}"
    raise ConfigError(f"{where} is not a known key; {hint}")


def trainer_keys() -> tuple[str, ...]:
    """The keyword arguments ``lightning.Trainer`` takes (the trainer section passes through to it)."""
    import lightning as L

    return tuple(p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self")


def _data_keys(target: str) -> tuple[str, ...] | None:
    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception as err:  # noqa: BLE001 - Hydra wraps import errors in several types
        raise ConfigError(f"data._target_ {target!r} cannot be imported ({type(err).__name__})") from None
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None  # takes anything
    return ("_target_",) + tuple(p for p in params if p != "self")


def optim_keys(name: str) -> tuple[str, ...]:
    """The keys optimizer ``name`` takes in ``optim`` (its own, the layer-wise wrapper's and ``name``)."""
    from scrimp.optim.build import ALLOWED, WRAPPER_KEYS, ZEROTH_ORDER, resolve

    if name in ALLOWED:
        return ("name",) + ALLOWED[name] + WRAPPER_KEYS
    params = inspect.signature(resolve(ZEROTH_ORDER[name]).__init__).parameters
    return ("name",) + tuple(p for p in params if p not in ("self", "params")) + WRAPPER_KEYS


def _check_section_keys(container: dict) -> None:
    for key in container:
        _unknown_key(key, _TOP_LEVEL_KEYS, "", strict=False)
    sections: dict[str, tuple[Sequence[str] | None, bool]] = {
        "trainer": (trainer_keys(), True),
        "module": (_MODULE_KEYS, True),
        "model": (_MODEL_KEYS, True),
        "resume": (_RESUME_KEYS, True),
        "checkpoint": (_CHECKPOINT_KEYS, False),
    }
    data = container.get("data") or {}
    if isinstance(data, Mapping) and isinstance(data.get("_target_", "x"), str):
        sections["data"] = (_data_keys(data.get("_target_", "scrimp.training.data.TextDataModule")), True)
    optim = container.get("optim") or {}
    if isinstance(optim, Mapping) and optim.get("name") in KNOWN_NAMES:
        sections["optim"] = (optim_keys(optim["name"]), True)
    for section, (known, strict) in sections.items():
        node = container.get(section)
        if node is None or known is None:
            continue
        if not isinstance(node, Mapping):
            raise ConfigError(f"{section} must be a mapping of keys to values, got {node!r}")
        for key in node:
            _unknown_key(str(key), known, section, strict)


def _check_loggers(loggers) -> None:
    """``logger``: named Lightning loggers as ``_target_`` configs (conf/logger/), any name; null drops one."""
    if loggers is None:
        return
    if not isinstance(loggers, Mapping):
        raise ConfigError(f"logger must be a mapping of logger names to _target_ configs, got {loggers!r}")
    for name, spec in loggers.items():
        if spec is not None and not (isinstance(spec, Mapping) and isinstance(spec.get("_target_"), str)):
            raise ConfigError(f"logger.{name} must be null or a mapping with a '_target_' (a Lightning logger "
                              f"class, as in conf/logger/), got {spec!r}")


# -- cross-key rules ---------------------------------------------------------------------------------
def _check_accelerator(flat: dict) -> None:
    import torch

    accelerator = str(flat.get("trainer.accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} needs a CUDA GPU but torch.cuda.is_available() is False "
            "on this machine; use trainer=cpu (or trainer=ddp_cpu)"
        )


def _check_validation_interval(flat: dict) -> None:
    """An integer interval longer than the run would make Lightning refuse after setup."""
    interval, max_steps = flat.get("trainer.val_check_interval"), flat.get("trainer.max_steps", -1)
    per_step = int(flat.get("trainer.accumulate_grad_batches", 1))
    if is_integer(interval) and max_steps > 0 and interval > max_steps * per_step:
        raise ConfigError(
            f"trainer.val_check_interval must be at most the run's {int(max_steps) * per_step} training batches "
            f"(trainer.max_steps={int(max_steps)} x trainer.accumulate_grad_batches={per_step}), got {interval}"
        )


def _check_manual_modes(flat: dict) -> None:
    """Zeroth-order and layer-wise optimizers run their own step: settings that cannot apply to them."""
    name, layerwise = flat.get("optim.name"), bool(flat.get("optim.layerwise"))
    manual = layerwise or str(name).startswith("zo_")
    if manual and int(flat.get("trainer.accumulate_grad_batches", 1)) != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches must be 1 with optimizer {name!r} (manual optimization), got "
            f"{flat['trainer.accumulate_grad_batches']}; use the optimizer's own accumulate option instead"
        )
    if layerwise and flat.get("module.grad_clip"):
        raise ConfigError(
            f"module.grad_clip must be null with optim.layerwise=true (each layer is updated inside backward, "
            f"before a global gradient norm exists), got {flat['module.grad_clip']}"
        )
    if str(name).startswith("zo_") and planned_world_size(flat) > 1:
        # Each rank would estimate its projected gradient on its own slice of the batch and step on it:
        # nothing averages the probe losses, so the ranks' weights would drift apart silently.
        raise ConfigError(
            f"optim.name {name!r} (zeroth-order) runs on one process, got a trainer on {planned_world_size(flat)} "
            "processes: nothing averages the probe losses across ranks (use trainer=cpu, or trainer=gpu with one device)"
        )
    if layerwise:
        from scrimp.training.module import check_layerwise_world_size

        try:  # the module's own rule, on the world size the trainer will have
            check_layerwise_world_size("layerwise", planned_world_size(flat))
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_offload(flat: dict) -> None:
    """Optimizer-state offload runs on one process with CPU parameters for now (``OffloadedOptimizer``)."""
    tier = flat.get("optim.offload")
    if tier is None:
        return
    import torch

    accelerator = str(flat.get("trainer.accelerator", "auto"))
    if accelerator in ("gpu", "cuda", "mps", "tpu") or (accelerator == "auto" and torch.cuda.is_available()):
        raise ConfigError(f"optim.offload={tier!r} needs trainer.accelerator=cpu for now (the offloaded optimizer "
                          f"takes CPU parameters; its device path is not built yet), got {accelerator!r}")
    if planned_world_size(flat) > 1:
        raise ConfigError(f"optim.offload={tier!r} runs on one process for now, got a trainer on "
                          f"{planned_world_size(flat)} processes (use trainer=cpu or optim.offload=null)")


def offload_settings(optim: Mapping, default_path: str | os.PathLike) -> dict:
    """The offload keys of ``optim`` that are set, with ``default_path`` as the disk tier's directory when
    none is given (the run puts it inside the run folder)."""
    settings = {k: optim[k] for k in OFFLOAD_KEYS if optim.get(k) is not None}
    # Only null means the default: an empty path (an unset shell variable, say) is refused by the build.
    if settings.get("offload") == "disk" and "offload_path" not in settings:
        settings["offload_path"] = str(default_path)
    return settings


def _probe_offload_path(flat: Mapping) -> None:
    """Create and probe an explicit ``optim.offload_path`` of the disk tier before any work.

    Without this, an unwritable, full or in-use directory shows only when the optimizer is built,
    after the data are prepared and the run folder is created. The probe writes and fsyncs a few KB
    (``run_folder.probe_writable``: a full disk or a read-only mount shows only on a real write) and
    asks the tier's lock without taking it. The default path, inside run_dir, is probed with the run
    folder, which the run's own lock keeps to one process.
    """
    path = flat.get("optim.offload_path")
    if flat.get("optim.offload") != "disk" or not path:
        return
    from scrimp.training.run_folder import ensure_folder, probe_writable

    folder = Path(path)
    try:
        ensure_folder(folder, "optim.offload_path")
        probe_writable(folder, "optim.offload_path")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    holder = disk_tier_holder(folder)
    if holder is not None:
        raise ConfigError(f"optim.offload_path {str(path)!r} is in use by another optimizer's disk tier (process "
                          f"{holder}); give each run its own optim.offload_path or wait for that run to end")


def disk_tier_holder(folder: Path) -> str | None:
    """The pid recorded by the live disk tier that holds ``folder``, or None when none holds it.

    Asks the tier's ``flock`` without blocking and releases it at once (closing the descriptor): the
    kernel drops a dead process's lock, so a lock file left by a killed run does not count.
    """
    from scrimp.optim.offload.tiers import LOCK_NAME

    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f"optim.offload_path {str(folder)!r} holds a disk-tier lock file that cannot be opened "
                          f"({err.strerror or err}); fix its permissions or choose another optim.offload_path") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def _accelerator_device_count(accelerator: str) -> int:
    """How many devices ``-1`` or ``"auto"`` means for ``accelerator`` on this machine (as Lightning counts)."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return max(torch.cuda.device_count(), 1)
    return 1  # cpu (Lightning's "auto" is one process), mps and tpu: one device here


def planned_world_size(flat: Mapping) -> int:
    """The number of processes the trainer will start: devices x num_nodes, from the flat config.

    ``trainer.devices`` may be a count (``2``, ``"2"``), ``-1``/``"auto"`` (every device of the
    accelerator), or device indices (``"0,1"``, ``"1,"``, ``[0, 1]``): the one place that reads it,
    so that a check on the world size is made before any work, not after the trainer has started.
    """
    devices = flat.get("trainer.devices", "auto")
    accelerator = str(flat.get("trainer.accelerator", "auto"))
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:  # indices, as Lightning reads "0,1" and "1,"
            devices = [int(i) for i in text.split(",") if i.strip()]
        elif text not in ("auto", "-1"):
            devices = int(text)
    if isinstance(devices, list | tuple):
        count = len(devices)
    elif devices in ("auto", "-1", -1):
        count = _accelerator_device_count(accelerator)
    else:
        count = int(devices)
    return count * int(flat.get("trainer.num_nodes", 1) or 1)


def check_model_name(name: str) -> None:
    """One sentence for a model that is neither a known size nor a path/hub name."""
    from scrimp.training.models import LLAMA_SIZES

    if name in LLAMA_SIZES or os.path.isdir(os.path.expanduser(name)) or "/" in name:
        return
    raise ConfigError(
        f"model.name {name!r} is not a known model; choose one of {', '.join(sorted(LLAMA_SIZES))}, "
        "or give a local directory or hub name of the form 'org/name'"
    )


def _check_data_source(flat: dict) -> None:
    source = flat.get("data.source")
    if source == "files":
        from scrimp.training.data import resolve_data_files

        try:  # only the names: a missing path or a glob that matches nothing
            resolve_data_files(flat.get("data.path"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif source == "hub":
        if not flat.get("data.hub_name"):
            raise ConfigError("data.hub_name must name a hub dataset when data.source='hub', got "
                              f"{flat.get('data.hub_name')!r}")
        if not flat.get("data.max_documents"):
            raise ConfigError("data.max_documents must be a positive integer for a hub dataset (a streamed corpus "
                              f"has no end), got {flat.get('data.max_documents')!r}")


def meta_model(container: Mapping):
    """The configured model on the meta device (no memory, no weights), or None when its config is not at
    hand offline; the optimizer is built on it to run the optimizer's own checks before any work, and
    the checkpoints' size is estimated from it before the data is touched (``run._train``)."""
    import torch

    from scrimp.training.models import LLAMA_SIZES, llama_config

    name = container["model"]["name"]
    overrides = container["model"].get("overrides") or {}
    try:
        if name in LLAMA_SIZES:
            data = container.get("data") or {}
            vocab = None if data.get("tokenizer") else data.get("vocab_size")  # the BPE's size, else a stand-in
            config = llama_config(name, vocab_size=vocab, **overrides)
        elif os.path.isdir(os.path.expanduser(name)):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(os.path.expanduser(name), **overrides)
        else:
            return None  # a hub name: its config is not fetched twice (the real build reports it)
    except Exception as err:  # noqa: BLE001 - transformers' config classes raise several types
        if name in LLAMA_SIZES:
            first = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
            raise ConfigError(f"model.overrides {overrides!r} are not valid LlamaConfig fields ({first:.160})") from None
        return None  # the real build reports a missing or offline model in its own sentence
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad config field
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.overrides {overrides!r} do not give a model of {name!r} that can be built "
                          f"({type(err).__name__}: {first:.160})") from None


def _check_optimizer_dry_build(container: dict) -> None:
    """Build the optimizer on the meta-device model: its constructor's checks (rank against each weight's
    shape, projector names, ...) then speak before any work, with the key named as ``optim.<key>``."""
    from scrimp.optim import build
    from scrimp.optim.build import offload_options

    model = meta_model(container)
    if model is None:
        return
    # Where the state lives is the real parameters' business: fused kernels refuse meta tensors, and the
    # offload wrapper takes CPU parameters and creates files; its own settings are checked without building it.
    optim = {k: v for k, v in container["optim"].items() if k not in ("fused", "foreach") + OFFLOAD_KEYS}
    try:
        offload_options(optim.get("name"), {"layerwise": optim.get("layerwise"),
                                            **offload_settings(container["optim"], "<run_dir>/offload")})
        build(optim, model)
    except (ValueError, TypeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        first = re.match(r"[A-Za-z_]*", message).group()
        if first in container["optim"] and first != "name":
            message = f"optim.{message}"
        raise ConfigError(message) from None


def check_train_config(cfg) -> dict:
    """Check every key of a composed ``train`` config; returns the resolved config as a plain dict.

    Order: unknown keys, each key's own rule, then the rules that relate keys, then the optimizer's
    constructor on a meta-device model, then an explicit ``optim.offload_path`` (created and probed).
    Nothing else is read from disk but the data paths' names and the checkpoint's saved settings
    (``check_resume``)."""
    container = _container(cfg)
    _check_section_keys(container)
    _check_loggers(container.get("logger"))
    flat = flatten(container, leaves=("model.overrides", "optuna_trial", "hydra", "logger"))
    check_rules(flat, TRAIN_RULES)
    _check_allowed_keys(flat.get("resume.allow_changed") or [])
    check_model_name(str(flat["model.name"]))
    _check_accelerator(flat)
    _check_validation_interval(flat)
    _check_manual_modes(flat)
    _check_data_source(flat)
    _check_offload(flat)
    _check_optimizer_dry_build(container)
    _probe_offload_path(flat)  # last: it creates the folder, so only for an otherwise valid config
    return container


# -- resume: the checkpoint against the config -----------------------------------------------------
# Optimizer settings that may differ on resume: the step size (the schedule re-applies it) and
# where the state lives; anything else changes what the saved state means.
RESUMABLE_OPTIM_KEYS = ("lr", "fused", "foreach", "tier", "offload", "offload_dir", "offload_path", "offload_prefetch",
                        "device")


@dataclass
class ResumePlan:
    """What a resume restores: ``fresh_optimizer`` when an allowed change makes the saved state meaningless."""

    path: Path
    hparams: dict
    changed: list[str] = field(default_factory=list)
    fresh_optimizer: bool = False
    step: int = 0  # the optimizer steps the checkpoint had taken: the run goes on from there


def read_checkpoint_hparams(path: Path) -> dict:
    """The settings a scrimp checkpoint was written with (memory-mapped: no tensor is read into RAM)."""
    return _checkpoint_settings(_load_checkpoint(path))


def _load_checkpoint(path: Path) -> Mapping:
    """The checkpoint, memory-mapped; one sentence when it is not a readable Lightning checkpoint."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same bad input
        raise ConfigError(f"ckpt_path {str(path)!r} is not a readable checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path {str(path)!r} is not a Lightning checkpoint (it has no state_dict)")
    return ckpt


def _checkpoint_settings(ckpt: Mapping) -> dict:
    hparams = dict(ckpt.get("hyper_parameters") or {})
    saved = ckpt.get("scrimp") or {}
    if "optim" in saved:
        hparams["optim"] = saved["optim"]
    if "optimizer_name" in saved:
        hparams.setdefault("optim", {}).setdefault("name", saved["optimizer_name"])
    return hparams


def _same(a, b) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if is_real(a) and is_real(b):
        return float(a) == float(b)
    return a == b


def _differences(saved: Mapping, current: Mapping, prefix: str, skip: Sequence[str] = (),
                 both_only: bool = False) -> list[tuple]:
    """(key, saved value, current value) for every key whose values differ; an absent key is null, or, with
    ``both_only``, not compared (a checkpoint of older code lacks the keys added since)."""
    out = []
    keys = set(saved) & set(current) if both_only else set(saved) | set(current)
    for key in sorted(keys, key=str):
        if key in skip:
            continue
        if not _same(saved.get(key), current.get(key)):
            out.append((f"{prefix}{key}", saved.get(key), current.get(key)))
    return out


def _changed_optimizer_sentence(path: Path, refused: list[tuple]) -> str:
    """Another optimizer, or the first changed setting (with the others listed), in one sentence."""
    names = {key: (was, now) for key, was, now in refused}
    allow = f"resume.allow_changed=[{','.join(names)}]"
    if "optim.name" in names:
        was, now = names["optim.name"]
        return (f"ckpt_path {str(path)!r} was written with optimizer {was!r} but optim.name is {now!r}; resume with "
                f"optim={was}, allow the change with {allow} (the optimizer state then starts afresh), or start a "
                "fresh run without ckpt_path")
    key, was, now = refused[0]
    others = "".join(f", {k}: {w!r} vs {n!r}" for k, w, n in refused[1:])
    return (f"ckpt_path {str(path)!r} was written with {key}={was!r} but the config gives {key}={now!r}"
            f"{' (also ' + others[2:] + ')' if others else ''}; resume with the checkpoint's settings, or allow the "
            f"change with {allow} (the optimizer state then starts afresh)")


def _check_allowed_keys(allowed: Sequence[str]) -> None:
    for key in allowed:
        if not str(key).startswith("optim."):
            raise ConfigError(
                f"resume.allow_changed may list only optimizer settings (optim.<key>), got {key!r}: a model of "
                "another architecture cannot take the checkpoint's weights"
            )


def check_resume(container: Mapping) -> ResumePlan | None:
    """Compare the checkpoint of ``ckpt_path`` with the config before setup; None when not resuming.

    Refused, naming both values: another model (name, overrides) and any optimizer setting outside
    ``RESUMABLE_OPTIM_KEYS``, unless listed in ``resume.allow_changed``; then the weights, the step and
    the schedule are restored and the optimizer state starts afresh with the new settings (the saved
    state was built for the old ones). Call ``check_resume_vocab`` once the tokenizer is known."""
    ckpt_path = container.get("ckpt_path")
    if not ckpt_path:
        return None
    path = Path(os.path.expanduser(str(ckpt_path)))
    if not path.is_file():
        raise ConfigError(f"ckpt_path {str(path)!r} does not exist")
    ckpt = _load_checkpoint(path)
    hparams, step = _checkpoint_settings(ckpt), int(ckpt.get("global_step") or 0)
    allowed = list((container.get("resume") or {}).get("allow_changed") or [])
    model_diffs = []
    if "model" in hparams and hparams["model"] != container["model"]["name"]:
        model_diffs.append(("model.name", hparams["model"], container["model"]["name"]))
    if "model_overrides" in hparams:
        model_diffs += _differences(hparams["model_overrides"] or {}, container["model"].get("overrides") or {},
                                    "model.overrides.")
    if model_diffs:
        key, was, now = model_diffs[0]
        raise ConfigError(
            f"ckpt_path {str(path)!r} holds a model with {key}={was!r} but the config gives {key}={now!r}; "
            f"resume with {key}={was!r} or start a fresh run without ckpt_path"
        )
    optim_diffs = _differences(hparams.get("optim") or {}, container["optim"], "optim.", skip=RESUMABLE_OPTIM_KEYS,
                               both_only=True)
    refused = [d for d in optim_diffs if d[0] not in allowed]
    if refused:
        raise ConfigError(_changed_optimizer_sentence(path, refused))
    return ResumePlan(path, hparams, [d[0] for d in optim_diffs], fresh_optimizer=bool(optim_diffs), step=step)


def check_resume_vocab(plan: ResumePlan | None, vocab_size: int | None) -> None:
    """The tokenizer's vocabulary against the checkpoint's embedding rows, before the model is built."""
    if plan is None or vocab_size is None:
        return
    saved = plan.hparams.get("vocab_size")
    if saved is not None and int(saved) != int(vocab_size):
        raise ConfigError(
            f"ckpt_path {str(plan.path)!r} holds a model with a vocabulary of {saved} tokens but this run's "
            f"tokenizer has {vocab_size} (data.vocab_size or data.tokenizer differ); resume with the checkpoint's "
            "data settings or start a fresh run without ckpt_path"
        )


# -- the test-time-compute config ----------------------------------------------------------------------
_BUDGET = Rule("be a positive number of samples per prompt (at least 1, so that every prompt gets a sample)",
               number(1).accept)
TTC_RULES: dict[str, Rule] = {
    "budget": _BUDGET,
    "curve_budgets": Rule("be a non-empty list of positive numbers of samples per prompt (each at least 1)",
                          list_of(_BUDGET, min_length=1).accept),
    "baseline_budget": integer(1, why="uniform maj@k is measured at an integer k"),
    "folds": integer(2, why="cross-fitting chooses on the other folds"),
    "repeats": integer(1),
    "tune_repeats": integer(1),
    "n_boot": integer(1),  # bootstrap resamples of the confidence intervals
    "seed": integer(0, 2**32 - 1, why="it seeds numpy's generators, which take no negative seed"),
    "tune_only": boolean(),
    "objectives": list_of(choice(("accuracy", "spend")), min_length=1),
    "data.name": text(),
    "data._target_": text(why="the function that reads the recorded samples"),
    "data.format": choice(("esc", "replay")),
    "data.path": Rule("name a recorded-samples file (canonical replay JSONL or ESC format), relative to the shared "
                      "data folder or absolute", lambda v: isinstance(v, str) and bool(v.strip()) and v != "???"),
    "policy.params": optional(mapping(why="fixed parameters of every candidate")),
    "policy.space": optional(either(mapping(), list_of(mapping()), why="candidate values per parameter")),
}


def check_ttc_config(cfg) -> dict:
    """Check every key of a composed ``ttc`` config (the policy's parameters are checked by the policy's own
    ``candidate_params``, called next); returns the resolved config as a plain dict."""
    from scrimp.ttc.allocate import POLICIES

    container = _container(cfg)
    flat = flatten(container, leaves=("policy.params", "policy.space", "hydra"))
    choice(POLICIES).check("policy.name", flat.get("policy.name"))
    check_rules(flat, TTC_RULES)
    return container
