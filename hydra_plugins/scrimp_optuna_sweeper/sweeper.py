"""A Hydra sweeper on current Optuna: ask/tell over Hydra's launcher, pruning through the storage,
multi-objective studies, resumable SQLite storage in the sweep dir.

Why our own: the official ``hydra-optuna-sweeper`` (1.2.0/1.3.0) pins ``optuna<3`` (and with it
``sqlalchemy<2``) and has no pruner support (hydra issues #1710, #1954). This one reads the same
``hydra.sweeper.params`` syntax, so existing search configs carry over. Design after the official
plugin's ask/launch/tell loop (facebookresearch/hydra, plugins/hydra_optuna_sweeper), rewritten.

Pruning: every trial job receives ``++optuna_trial.storage=...``, ``++optuna_trial.study_name=...``
and ``++optuna_trial.number=...``; the job (``scrimp.training.callbacks.OptunaPruningCallback``)
loads the trial from the storage, reports intermediate values and raises ``optuna.TrialPruned``
when the study's pruner says so. The job may run in another process or on another machine.

    python -m experiments.train -m hparams_search=galore_lr
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import TrialState

from hydra_plugins.scrimp_optuna_sweeper.search_space import params_to_overrides, search_space

log = logging.getLogger(__name__)
_DIRECTIONS = ("minimize", "maximize")
PRUNER_ATTR = "hydra_pruner"  # study user attribute holding the pruner's _target_ config


def _directions(direction: Any) -> list[str]:
    values = list(direction) if isinstance(direction, list | tuple | ListConfig) else [direction]
    values = [str(getattr(v, "name", v)).lower() for v in values]
    bad = [v for v in values if v not in _DIRECTIONS]
    if not values or bad:
        raise ValueError(f"hydra.sweeper.direction must be minimize/maximize or a list of them, got {direction!r}")
    return values


def _maybe_instantiate(node: Any) -> Any:
    if isinstance(node, dict | DictConfig):
        return instantiate(node)
    return node


def default_storage(sweep_dir: str | Path) -> str:
    """``sqlite:///<sweep dir>/optuna.db`` (absolute), creating the folder."""
    path = Path(sweep_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


def make_storage(url: str):
    """An Optuna storage from a URL; a path ending in ``.log`` is a journal file (NFS-friendly)."""
    if url.endswith(".log") and "://" not in url:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url))
    return url


def objective_values(return_value: Any, n_objectives: int) -> list[float]:
    """The job's return value as ``n_objectives`` finite floats (one sentence otherwise)."""
    values = list(return_value) if isinstance(return_value, list | tuple | ListConfig) else [return_value]
    if len(values) != n_objectives:
        raise ValueError(f"the job returned {len(values)} value(s) but the study has {n_objectives} direction(s)")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"the job returned a non-finite objective {out}")
    return out


class ScrimpOptunaSweeper(Sweeper):
    """Hydra ``Sweeper`` that runs an Optuna study; see the module docstring."""

    def __init__(self, sampler: Any = None, pruner: Any = None, direction: Any = "minimize", storage: Any = None,
                 study_name: Any = None, n_trials: int = 20, n_jobs: int = 1, params: Any = None,
                 fail_fast: bool = True):
        self.directions = _directions(direction)
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ValueError(f"hydra.sweeper.n_trials and n_jobs must be >= 1, got {n_trials} and {n_jobs}")
        self.sampler, self.pruner = sampler, pruner
        self.storage_url = storage
        self.study_name = study_name
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.fail_fast = bool(fail_fast)
        self.config: DictConfig | None = None
        self.launcher = None
        self.job_idx = 0
        self._sampler_stopped = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def _study(self) -> optuna.Study:
        url = self.storage_url or default_storage(self.sweep_dir)
        self.storage_url = url
        name = self.study_name or str(self.config.hydra.job.name)
        sampler = _maybe_instantiate(self.sampler)
        pruner = _maybe_instantiate(self.pruner)
        if len(self.directions) > 1 and pruner is not None:
            log.warning("multi-objective studies cannot prune (Optuna); hydra.sweeper.pruner is ignored")
            pruner = None
        study = optuna.create_study(study_name=name, storage=make_storage(url), sampler=sampler, pruner=pruner,
                                    directions=self.directions, load_if_exists=True)
        resumed = len(study.get_trials(deepcopy=False))
        # Hydra hands the sampler over already built (recursive instantiation); its config is in the
        # job's hydra.sweeper node (or in self.sampler when the sweeper is built by hand).
        sampler_cfg = self.sampler if isinstance(self.sampler, dict | DictConfig) else \
            self.config.hydra.sweeper.get("sampler")
        seed = sampler_cfg.get("seed") if isinstance(sampler_cfg, dict | DictConfig) else None
        if resumed and seed is not None:
            # A resumed study with a seeded sampler would replay the first run's random draws (the
            # same startup points again); continue the seed sequence instead, still reproducibly.
            study.sampler = instantiate(sampler_cfg, seed=int(seed) + resumed)
        # The pruner is not part of Optuna's storage; its config is, so that a trial job anywhere can
        # rebuild it and decide on pruning (scrimp.training.callbacks.OptunaPruningCallback).
        pruner_cfg = self.config.hydra.sweeper.get("pruner")
        if pruner is not None and isinstance(pruner_cfg, DictConfig) and "_target_" in pruner_cfg:
            study.set_user_attr(PRUNER_ATTR, OmegaConf.to_container(pruner_cfg, resolve=True))
        if self._storage_is_private():
            # A sweep killed mid-trial leaves it RUNNING in its own SQLite file; close it as failed.
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(trial.number, state=TrialState.FAIL)
        return study

    def _storage_is_private(self) -> bool:
        """True for the default SQLite file in the sweep dir (no other machine runs its trials)."""
        return str(self.storage_url) == default_storage(self.sweep_dir)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        cli_space, fixed = search_space(arguments)
        config_space, config_fixed = search_space([f"{k}={v}" for k, v in self.params.items()])
        space = {**config_space, **cli_space}  # the command line wins over the search config
        fixed_keys = {a.split("=", 1)[0].lstrip("+~") for a in fixed}
        fixed = [o for o in config_fixed if o.split("=", 1)[0].lstrip("+~") not in fixed_keys] + fixed
        study = self._study()
        done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        remaining = self.n_trials - len(done)
        log.info(f"study {study.study_name!r} in {self.storage_url}: {len(done)} finished, running {max(remaining, 0)} more")
        log.info("search space: " + ", ".join(f"{k}: {v}" for k, v in space.items()))
        while remaining > 0:
            batch = min(self.n_jobs, remaining)
            trials = [study.ask(space) for _ in range(batch)]
            overrides = [tuple(fixed + params_to_overrides(t.params) + self._trial_overrides(study, t))
                         for t in trials]
            self.validate_batch_is_legal(overrides)
            # Job folders are named by trial number, so a resumed study never writes over the
            # folders of its earlier trials; non-consecutive numbers (trials of other machines in
            # a shared storage) are launched one by one.
            numbers = [t.number for t in trials]
            if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
                returns = list(self.launcher.launch(overrides, initial_job_idx=numbers[0]))
            else:
                returns = [r for o, n in zip(overrides, numbers) for r in self.launcher.launch([o], initial_job_idx=n)]
            self.job_idx = numbers[-1] + 1
            self._sampler_stopped = False
            for trial, ret in zip(trials, returns):
                self._tell(study, trial, ret)
            remaining -= batch
            if self._sampler_stopped:
                log.info("the sampler has exhausted its search space; the sweep ends here")
                break
        self._write_results(study)
        return study

    def _trial_overrides(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        url = str(self.storage_url).replace("'", "\\'")
        return [f"++optuna_trial.storage='{url}'", f"++optuna_trial.study_name='{study.study_name}'",
                f"++optuna_trial.number={trial.number}"]

    def _record(self, study: optuna.Study, trial: optuna.Trial, values=None, state=None) -> None:
        """``study.tell``; a sampler that stops the study (grid/brute force exhausted) ends the sweep.

        Optuna stores the trial before the sampler's ``study.stop()`` raises outside ``optimize``.
        """
        try:
            study.tell(trial, values, state=state)
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise
            self._sampler_stopped = True

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret) -> None:
        from hydra.core.utils import JobStatus

        if ret.status == JobStatus.COMPLETED:
            try:
                values = objective_values(ret.return_value, len(self.directions))
            except (TypeError, ValueError) as err:
                self._record(study, trial, state=TrialState.FAIL)
                log.warning(f"trial {trial.number} failed: {err}")
                if self.fail_fast:
                    raise
                return
            self._record(study, trial, values if len(values) > 1 else values[0])
            log.info(f"trial {trial.number}: {values} with {trial.params}")
            return
        error = ret._return_value
        if isinstance(error, optuna.TrialPruned):
            self._record(study, trial, state=TrialState.PRUNED)
            log.info(f"trial {trial.number} pruned ({error})")
            return
        self._record(study, trial, state=TrialState.FAIL)
        log.warning(f"trial {trial.number} failed: {type(error).__name__}: {error}")
        if self.fail_fast:
            raise error

    def _write_results(self, study: optuna.Study) -> None:
        if len(self.directions) == 1:
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            results = {"name": "optuna", "study_name": study.study_name, "storage": self.storage_url,
                       "best_params": study.best_params if complete else None,
                       "best_value": study.best_value if complete else None}
        else:
            results = {"name": "optuna", "study_name": study.study_name, "storage": self.storage_url,
                       "pareto_front": [{"params": t.params, "values": t.values} for t in study.best_trials]}
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        results["trial_states"] = {s: states.count(s) for s in sorted(set(states))}
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        log.info(f"results: {results}")

