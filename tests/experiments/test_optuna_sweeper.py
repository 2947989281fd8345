"""Tests of hydra_plugins/scrimp_optuna_sweeper: the search-space syntax, and a real sweep through
`python -m experiments.train -m` into a SQLite storage with a pruned trial, resumed by a second run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from training.helpers import SMALL

from hydra_plugins.scrimp_optuna_sweeper.search_space import params_to_overrides, search_space

REPO = Path(__file__).resolve().parents[2]


def test_search_space_reads_the_official_plugin_syntax():
    space, fixed = search_space([
        "optim.lr=tag(log, interval(1e-4, 1e-1))",
        "optim.rank=choice(16, 32, 64)",
        "optim=adamw,galore",
        "trainer.max_steps=range(100, 400, 100)",
        "module.min_lr_ratio=interval(0.0, 0.5)",
        "data.block_size=tag(log, int(interval(64, 512)))",
        "seed=3",
    ])
    assert space["optim.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert space["optim.rank"] == CategoricalDistribution([16, 32, 64])
    assert space["optim"] == CategoricalDistribution(["adamw", "galore"])
    assert space["trainer.max_steps"] == IntDistribution(100, 300, step=100)  # stop is exclusive
    assert space["module.min_lr_ratio"] == FloatDistribution(0.0, 0.5)
    assert space["data.block_size"] == IntDistribution(64, 512, log=True)
    assert fixed == ["seed=3"]


def test_bad_search_space_is_one_sentence():
    with pytest.raises(ValueError, match="the log tag applies to interval or range, not choice"):
        search_space(["optim.rank=tag(log, choice(1, 2))"])


def test_params_round_trip_through_overrides():
    overrides = params_to_overrides({"optim.lr": 0.001234, "optim": "galore", "data.path": "a b/c"})
    assert overrides == ["optim.lr=0.001234", "optim=galore", "data.path='a b/c'"]


SEARCH = """# @package _global_
# python -m experiments.train hydra.searchpath=[file://{dir}] hparams_search=prune_test
defaults:
  - override /optim: galore
  - override /hydra/sweeper: scrimp_optuna
optimized_metric: val/loss
hydra:
  mode: MULTIRUN
  sweeper:
    study_name: prune_test
    n_trials: 3
    sampler: {{_target_: optuna.samplers.BruteForceSampler, seed: 0}}
    # lr 0 keeps the initial loss (about ln 512 = 6.24 > 6.1) and is pruned at step 10; lr 0.01 gets below.
    pruner: {{_target_: optuna.pruners.ThresholdPruner, upper: 6.1, n_warmup_steps: 6}}
    params:
      optim.lr: choice(0.0, 0.01)
      optim.rank: choice(8, 16)
"""


def _sweep(tmp_path: Path, n_trials: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRIMP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "hparams_search=prune_test",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.sweeper.n_trials={n_trials}", *SMALL,
            "trainer.max_steps=10", "trainer.val_check_interval=5"]
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)


def test_sweep_records_trials_and_a_pruned_one_in_sqlite_and_resumes(tmp_path):
    (tmp_path / "conf" / "hparams_search").mkdir(parents=True)
    (tmp_path / "conf" / "hparams_search" / "prune_test.yaml").write_text(SEARCH.format(dir=tmp_path / "conf"))
    proc = _sweep(tmp_path, 3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
    trials = optuna.load_study(study_name="prune_test", storage=storage).trials
    assert len(trials) == 3 and len({tuple(sorted(t.params.items())) for t in trials}) == 3
    for t in trials:  # the pruner's decision, made in the job through the storage
        expected = optuna.trial.TrialState.PRUNED if t.params["optim.lr"] == 0.0 else optuna.trial.TrialState.COMPLETE
        assert t.state == expected, (t.params, t.intermediate_values)
        assert sorted(t.intermediate_values) == [5, 10]  # reported by the job at each validation
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert (tmp_path / "sweep" / "optimization_results.yaml").exists()
    # Running the same sweep with a larger budget resumes the study: one more trial, the 4th combination.
    proc = _sweep(tmp_path, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="prune_test", storage=storage).trials
    assert len(trials) == 4 and len({tuple(sorted(t.params.items())) for t in trials}) == 4
    # Each trial keeps its own job folder, named by its number: the resumed run wrote none over.
    import json

    for t in trials:
        summary = json.loads((tmp_path / "sweep" / str(t.number) / "summary.json").read_text())
        assert summary["config"]["optuna_trial"]["number"] == t.number


@pytest.mark.parametrize("built_by_hydra", [True, False])
def test_a_resumed_seeded_study_draws_new_points(tmp_path, built_by_hydra):
    from omegaconf import OmegaConf

    from hydra_plugins.scrimp_optuna_sweeper.sweeper import ScrimpOptunaSweeper

    space = {"x": FloatDistribution(0.0, 1.0)}
    sampler_cfg = {"_target_": "optuna.samplers.RandomSampler", "seed": 0}

    def one_invocation():
        # Hydra instantiates nested _target_ nodes before the sweeper sees them: the sampler arrives
        # built, and its config is only in hydra.sweeper.sampler.
        sampler = optuna.samplers.RandomSampler(seed=0) if built_by_hydra else sampler_cfg
        sweeper = ScrimpOptunaSweeper(sampler=sampler, storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s",
                                      n_trials=1)
        sweeper.config = OmegaConf.create({"hydra": {"job": {"name": "j"},
                                                     "sweeper": {"pruner": None, "sampler": sampler_cfg}}})
        sweeper.sweep_dir = tmp_path
        study = sweeper._study()
        trial = study.ask(space)
        study.tell(trial, trial.params["x"])
        return trial.params["x"]

    first, second = one_invocation(), one_invocation()
    reference = optuna.samplers.RandomSampler(seed=0)  # what an unresumed seed-0 study draws first
    fresh = optuna.create_study(sampler=reference)
    assert first == fresh.ask(space).params["x"]
    assert second != first  # a resume continues the seed sequence instead of replaying it


@pytest.mark.parametrize("conf,config_name,search", [
    ("conf", "train", "galore_lr"), ("conf", "train", "ppl_vs_memory"),
    ("conf/ttc", "config", "sequential_optuna"), ("conf/ttc", "config", "sequential_accuracy_vs_cost"),
])
def test_every_search_config_composes_and_owns_the_keys_it_sweeps(conf, config_name, search):
    # The sweeper hands each trial plain `key=value` overrides: every key must exist in the composed
    # config, and the search's own settings (optimized_metric, objectives) must win over the base file's.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / conf), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[f"hparams_search={search}"], return_hydra_config=True)
    own = OmegaConf.load(REPO / conf / "hparams_search" / f"{search}.yaml")
    missing = [key for key in cfg.hydra.sweeper.params if OmegaConf.select(cfg, key, default="<absent>") == "<absent>"]
    assert not missing
    for key in ("optimized_metric", "objectives"):
        if key in own:
            assert cfg[key] == own[key]


def test_an_experiment_overrides_the_base_files_keys():
    from training.helpers import compose_train

    assert compose_train(["experiment=galore_60m_c4"]).checkpoint.every_n_steps == 1000
