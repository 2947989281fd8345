"""The structured config of ``hydra/sweeper=scrimp_optuna`` (registered in Hydra's ConfigStore).

    hydra:
      sweeper:            # python -m experiments.train -m hparams_search=galore_lr
        direction: minimize          # or [minimize, minimize] for a multi-objective study
        storage: null                # null = sqlite:///<sweep dir>/optuna.db (resumable)
        params: {optim.lr: tag(log, interval(1e-4, 1e-1)), optim.rank: choice(16, 32, 64)}
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def sweep_identity(search: Any, overrides: Any) -> dict:
    """What makes a sweep different from another: its search config and the command line's overrides.

    ``id`` (``<search>-<8 hex digits of the sorted overrides>``) names the default sweep folder and
    study, so that the same command resumes its study and a changed one (``trainer.max_steps=20``)
    starts its own instead of silently adding trials to another's.
    """
    kept = sorted(str(o) for o in (overrides or []) if not str(o).lstrip("+~").startswith("hparams_search="))
    digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:8]
    name = str(search) if search else "sweep"
    return {"search": name, "overrides": kept, "hash": digest, "id": f"{name}-{digest}"}


# ${scrimp_sweep_id:${hydra.runtime.choices.hparams_search},${hydra.overrides.task}} in a search config's
# hydra.sweep.dir. Cached: Hydra copies the sweep's resolver cache into each job's config, so a job
# resolves its sweep dir to the sweep's, not to a hash of its own (per-trial) overrides.
OmegaConf.register_new_resolver("scrimp_sweep_id", lambda search, overrides: sweep_identity(search, overrides)["id"],
                                use_cache=True, replace=True)


@dataclass
class ScrimpOptunaSweeperConf:
    """Fields of the sweeper; ``sampler``/``pruner`` are ``_target_`` nodes of Optuna classes."""

    _target_: str = "hydra_plugins.scrimp_optuna_sweeper.sweeper.ScrimpOptunaSweeper"
    # Sampler and pruner: {_target_: optuna.samplers.TPESampler, seed: 0}; null = Optuna's defaults
    # (TPE, or NSGA-II for several objectives; MedianPruner).
    sampler: Any = None
    pruner: Any = None
    # "minimize" / "maximize", or a list of them for a multi-objective study.
    direction: Any = "minimize"
    # An Optuna storage URL (sqlite:///..., postgresql://..., or a journal file path ending in
    # .log); null = a SQLite file in the sweep dir, which makes re-running the sweep resume it.
    storage: Any = None
    # null = the sweep's identity (search config name + hash of the overrides), held by one sweep
    # process at a time; a name given here lets several sweep processes share the study on purpose.
    study_name: Any = None
    # Total number of finished trials the study should hold (a resumed study runs the rest).
    n_trials: int = 20
    # Trials asked and launched together per batch (parallel with a parallel Hydra launcher).
    n_jobs: int = 1
    # Search space in the official plugin's override syntax.
    params: Any = None
    # Stop the sweep at the first failed trial (True) or record it as failed and go on (False).
    fail_fast: bool = True


ConfigStore.instance().store(group="hydra/sweeper", name="scrimp_optuna", node=ScrimpOptunaSweeperConf,
                             provider="scrimp")
