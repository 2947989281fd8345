"""Zeroth-order checkpoints: a full save of the parameters, then (seed, projected gradient) logs.

A ZO step is fully described by its seeds and scalars (MeZO, Malladi et al. 2023, Sec. 2 notes that
a trajectory can be stored as seeds and projected gradients). ``save_full`` writes the parameters
and the optimizer state and clears the optimizer's log; ``save_log`` writes only the records since
then (a few bytes per step); ``restore`` loads the full save and replays the log, which reproduces
the uninterrupted run bit for bit on the CPU. Every file loads with ``torch.load(weights_only=True)``
and is written to a temporary file first, then moved into place with ``os.replace``.

    save_full("full.pt", model.parameters(), opt)      # every few thousand steps
    save_log("log.pt", opt)                             # every few steps: tiny
    restore(model.parameters(), opt, "full.pt", "log.pt")
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from scrimp.optim.zo.optimizer import check_record


def _atomic_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_full(path, params: Iterable[torch.Tensor], optimizer) -> None:
    """Write the parameters and the optimizer state, then clear the optimizer's replay log."""
    state = optimizer.state_dict()
    state["zo"] = dict(state["zo"], log=[])
    _atomic_save({"params": [p.detach().cpu().clone() for p in params], "optimizer": state}, path)
    optimizer.mark_full_save()


def save_log(path, optimizer) -> None:
    """Write the (seed, projected gradient) records since the last full save, and the counters."""
    _atomic_save(
        {"records": list(optimizer.log), "draws": optimizer.draws, "skipped": optimizer.skipped}, path
    )


def restore(params: Iterable[torch.Tensor], optimizer, full_path, log_path=None) -> None:
    """Load a full save into ``params``/``optimizer`` and replay the log written after it, if any."""
    params = list(params)
    # Both files are read and checked before anything is written, so a bad checkpoint leaves the
    # model and the optimizer as they were.
    full = torch.load(full_path, weights_only=True)
    if not isinstance(full, dict) or not {"params", "optimizer"} <= set(full):
        raise ValueError(f"{full_path} is not a scrimp zeroth-order full save (save_full writes params and optimizer)")
    log = torch.load(log_path, weights_only=True) if log_path is not None else None
    if log is not None and (not isinstance(log, dict) or not {"records", "draws", "skipped"} <= set(log)):
        raise ValueError(f"{log_path} is not a scrimp zeroth-order log (save_log writes records, draws and skipped)")
    if len(full["params"]) != len(params):
        raise ValueError(
            f"checkpoint {full_path} holds {len(full['params'])} parameters, the model has {len(params)}"
        )
    for index, (param, saved) in enumerate(zip(params, full["params"])):
        if param.shape != saved.shape:
            raise ValueError(f"checkpoint parameter {index} has shape {tuple(saved.shape)}, the model's has "
                             f"{tuple(param.shape)}")
    optimizer.check_state_dict(full["optimizer"])
    if log is not None:
        for index, record in enumerate(log["records"]):
            try:
                check_record(record, len(optimizer.param_groups))
            except (ValueError, FloatingPointError) as err:
                raise ValueError(f"{log_path}: record {index} cannot be replayed: {err}") from None
    with torch.no_grad():
        for param, saved in zip(params, full["params"]):
            param.copy_(saved)
    optimizer.load_state_dict(full["optimizer"])
    if log is not None:
        optimizer.replay(log["records"])
        optimizer.draws, optimizer.skipped = int(log["draws"]), int(log["skipped"])
