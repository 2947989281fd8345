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

Folders and study: by default both are named by the sweep's identity (its search config and a hash
of the command line's overrides, ``config.sweep_identity``), and the sweep folder is held by one
sweep process (an exclusive ``fcntl.flock``, ``scrimp.training.run_folder.FolderLock``): a second
sweep of the same command is refused instead of failing the first one's running trial. A study
named explicitly (``hydra.sweeper.study_name=...``) may be shared by several sweep processes on
purpose (shared lock); its overrides must still match the ones it was created with.

Killed trials: each sweep process holds a lock of its own (``<sweep dir>/.sweepers/<token>``) and
tags the trials it asks with it. A RUNNING trial whose tag's lock no live process holds (and whose
job folder is not held either) was left by a killed sweep: it is marked FAIL, tagged
``scrimp_orphaned``, not counted toward ``n_trials``, and its parameters are enqueued so that the
sweep runs the same point again. Why locks rather than Optuna's heartbeat: the OS releases a lock
the moment its process dies, so a killed trial is recognized at once, without a grace period that
would also have to exceed the longest pause of a live trial; heartbeats remain the tool for
storages shared across machines that share no file system.

    python -m experiments.train -m hparams_search=galore_lr
"""

from __future__ import annotations

import logging
import math
import uuid
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.scrimp_optuna_sweeper.config import sweep_identity
from hydra_plugins.scrimp_optuna_sweeper.search_space import params_to_overrides, search_space
from scrimp._extras import require

# Hydra imports every plugin module when it scans for plugins, with or without `-m`: without the
# `sweep` extra, this module must still import (Hydra would warn on every run otherwise); the sweeper
# itself then refuses to start with the one sentence naming the extra.
try:
    import optuna
    from optuna.trial import TrialState
except ImportError:
    optuna = TrialState = None

log = logging.getLogger(__name__)
_DIRECTIONS = ("minimize", "maximize")
PRUNER_ATTR = "hydra_pruner"  # study user attribute holding the pruner's _target_ config
IDENTITY_ATTR = "scrimp_sweep"  # study user attribute: the search and overrides it was created with
OWNER_ATTR = "scrimp_owner"  # trial user attribute: the lock folder of the sweep process that runs it
ORPHAN_ATTR = "scrimp_orphaned"  # trial user attribute: failed because its sweep process was killed
IDENTITY_FILE = "sweep_identity.yaml"


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
        require("optuna", "the Optuna sweeper (hparams_search=...)")
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
        self.identity = sweep_identity(None, [])  # set from the command line in setup()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)
        choices = config.hydra.runtime.get("choices") or {}
        search = choices.get("hparams_search") or config.hydra.job.name  # an app without hparams_search/
        self.identity = sweep_identity(search, list(config.hydra.overrides.get("task") or []))

    def _study(self) -> optuna.Study:
        url = self.storage_url or default_storage(self.sweep_dir)
        self.storage_url = url
        name = self.study_name or self.identity["id"]
        sampler = _maybe_instantiate(self.sampler)
        pruner = _maybe_instantiate(self.pruner)
        if len(self.directions) > 1 and pruner is not None:
            log.warning("multi-objective studies cannot prune (Optuna); hydra.sweeper.pruner is ignored")
            pruner = None
        study = optuna.create_study(study_name=name, storage=make_storage(url), sampler=sampler, pruner=pruner,
                                    directions=self.directions, load_if_exists=True)
        self._check_identity(study.user_attrs.get(IDENTITY_ATTR), f"study {name!r} in {url}")
        study.set_user_attr(IDENTITY_ATTR, self._identity_record(name))
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
        self._fail_orphans(study)
        return study

    # -- one sweep per folder, one identity per study ---------------------------------------------------
    def _identity_record(self, study_name: str) -> dict:
        return {"study_name": study_name, "search": self.identity["search"], "overrides": self.identity["overrides"],
                "hash": self.identity["hash"]}

    def _check_identity(self, recorded: Any, where: str) -> None:
        """Refuse to add this sweep's trials to a study or folder made by a sweep with other overrides."""
        if not recorded:
            return
        recorded = dict(recorded)
        mine = self._identity_record(self.study_name or self.identity["id"])
        if recorded.get("hash") == mine["hash"] and recorded.get("study_name") == mine["study_name"]:
            return
        raise ValueError(
            f"{where} belongs to the sweep {recorded.get('study_name')!r} with overrides {recorded.get('overrides')}, "
            f"not to this one ({mine['study_name']!r} with overrides {mine['overrides']}); use the same overrides "
            "or another hydra.sweep.dir and hydra.sweeper.study_name (the default ones differ per search and overrides)"
        )

    def _hold_sweep_dir(self) -> None:
        """Lock the sweep folder (shared only for an explicitly named study) and take this process's own
        owner lock, which tags its trials; both are released by the OS if the process is killed."""
        from scrimp.training.run_folder import FolderLock

        explicit = self.study_name is not None
        hint = ("choose another hydra.sweep.dir, or give the study a name (hydra.sweeper.study_name=...) to run "
                "several sweep processes on one study on purpose")
        self._locks = [FolderLock(self.sweep_dir, "hydra.sweep.dir", shared=explicit, hint=hint).acquire()]
        marker = self.sweep_dir / IDENTITY_FILE
        record = self._identity_record(self.study_name or self.identity["id"])
        if marker.exists():
            self._check_identity(OmegaConf.to_container(OmegaConf.load(marker)), f"{self.sweep_dir} ({IDENTITY_FILE})")
        else:
            OmegaConf.save(OmegaConf.create(record), marker)
        self.owner_dir = self.sweep_dir / ".sweepers" / uuid.uuid4().hex
        self._locks.append(FolderLock(self.owner_dir, "sweep owner folder").acquire())

    def _release_sweep_dir(self) -> None:
        import shutil

        for lock in reversed(getattr(self, "_locks", [])):
            lock.release()
        if getattr(self, "owner_dir", None) is not None:
            shutil.rmtree(self.owner_dir, ignore_errors=True)

    def _owner_is_gone(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether no live process runs ``trial``: its owner's lock and its job folder's lock are free.

        A trial of another machine (owner folder not visible here) is never taken for dead; one
        without an owner tag (written before tags existed) only when this process holds the folder
        exclusively and the storage is the folder's own SQLite file.
        """
        from scrimp.training.run_folder import is_locked

        if is_locked(self.sweep_dir / str(trial.number)):
            return False
        owner = trial.user_attrs.get(OWNER_ATTR)
        if owner is None:
            return self.study_name is None and self._storage_is_private()
        return Path(owner).is_dir() and not is_locked(Path(owner))

    def _fail_orphans(self, study: optuna.Study) -> None:
        """Mark trials left RUNNING by a killed sweep FAIL (not counted) and enqueue their points again."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not self._owner_is_gone(trial):
                continue
            try:
                optuna.trial.Trial(study, trial._trial_id).set_user_attr(
                    ORPHAN_ATTR, "its sweep process ended while it ran (killed); it does not count toward n_trials")
                study.tell(trial.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # another sweep process closed it first
                continue
            study.enqueue_trial(trial.params, skip_if_exists=False)
            log.warning(f"trial {trial.number} was left running by a killed sweep: marked failed, not counted "
                        f"toward n_trials, and its parameters {trial.params} run again")

    def _counted(self, study: optuna.Study) -> int:
        """Trials toward ``n_trials``: finished ones but the orphans, and those other live sweeps run now."""
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() and ORPHAN_ATTR not in t.user_attrs for t in trials)
        return finished + sum(t.state == TrialState.RUNNING for t in trials)

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
        try:
            self._hold_sweep_dir()
            study = self._study()
        except ValueError as err:  # a folder in use, or a study of other overrides: one sentence, no trace
            self._release_sweep_dir()
            raise SystemExit(f"error: {err}") from None
        try:
            return self._sweep(study=study, space=space, fixed=fixed)
        finally:
            self._release_sweep_dir()

    def _sweep(self, study: optuna.Study, space: dict, fixed: list[str]) -> optuna.Study:
        counted = self._counted(study)
        log.info(f"study {study.study_name!r} in {self.storage_url}: {counted} counted, "
                 f"running {max(self.n_trials - counted, 0)} more")
        log.info("search space: " + ", ".join(f"{k}: {v}" for k, v in space.items()))
        # Recounted before each batch: trials of other sweep processes on a shared study count too.
        while (remaining := self.n_trials - self._counted(study)) > 0:
            batch = min(self.n_jobs, remaining)
            trials = [study.ask(space) for _ in range(batch)]
            for trial in trials:
                trial.set_user_attr(OWNER_ATTR, str(self.owner_dir.resolve()))
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

