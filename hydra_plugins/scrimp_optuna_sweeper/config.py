"""The structured config of ``hydra/sweeper=scrimp_optuna`` (registered in Hydra's ConfigStore).

    hydra:
      sweeper:            # python -m experiments.train -m hparams_search=galore_lr
        direction: minimize          # or [minimize, minimize] for a multi-objective study
        storage: null                # null = sqlite:///<sweep dir>/optuna.db (resumable)
        params: {optim.lr: tag(log, interval(1e-4, 1e-1)), optim.rank: choice(16, 32, 64)}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


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
