"""Tests of hydra_plugins/scrimp_optuna_sweeper: the search-space syntax, and a real sweep through
`python -m experiments.train -m` into a SQLite storage with a pruned trial, resumed by a second run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from training.helpers import SMALL

from hydra_plugins.scrimp_optuna_sweeper.config import sweep_identity
from hydra_plugins.scrimp_optuna_sweeper.search_space import params_to_overrides, search_space
from hydra_plugins.scrimp_optuna_sweeper.sweeper import ORPHAN_ATTR

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
    # lr 1e-9 keeps the initial loss (about ln 512 = 6.24 > 6.1) and is pruned at step 10; lr 0.01 gets below.
    # (lr 0 is refused as a bad input.)
    pruner: {{_target_: optuna.pruners.ThresholdPruner, upper: 6.1, n_warmup_steps: 6}}
    params:
      optim.lr: choice(1e-9, 0.01)
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
        expected = optuna.trial.TrialState.PRUNED if t.params["optim.lr"] < 1e-6 else optuna.trial.TrialState.COMPLETE
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


# -- sweep folders that keep everything: a real Hydra app on the real sweeper and SQLite storage --------
# The app's trial is a one-line objective, so that each sweep process takes a second or two; it holds
# its job folder like scrimp.training.run.train does. The first trial to find the hang file takes it
# (an atomic rename: only one trial can) and blocks until its sweep process is killed.
TOY_APP = '''
import os, time
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig
from scrimp.training.run_folder import open_run_folder

@hydra.main(version_base="1.3", config_path=".", config_name="toy")
def main(cfg):
    with open_run_folder(Path(HydraConfig.get().runtime.output_dir), checkpoints=False):
        try:
            os.rename(cfg.hang_file, cfg.hang_file + ".taken")
        except OSError:
            return (cfg.x - 0.3) ** 2
        time.sleep(300)

main()
'''
TOY_CONF = """
defaults:
  - override hydra/sweeper: scrimp_optuna
  - _self_
x: 0.0
hang_file: {hang}
hydra:
  mode: MULTIRUN
  sweep:
    dir: {root}/${{scrimp_sweep_id:${{hydra.job.name}},${{hydra.overrides.task}}}}
  sweeper:
    n_trials: 2
    sampler: {{_target_: optuna.samplers.RandomSampler, seed: 0}}
    params:
      x: interval(0.0, 1.0)
"""


@pytest.fixture
def toy(tmp_path):
    """``toy.run(*args)`` / ``toy.start(*args)``: the toy sweep as a real process, finished or running."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "toy_app.py").write_text(TOY_APP)
    (tmp_path / "app" / "toy.yaml").write_text(TOY_CONF.format(hang=tmp_path / "hang", root=tmp_path / "multirun"))
    started = []

    class Toy:
        hang = tmp_path / "hang"

        @staticmethod
        def command(*args):
            return [sys.executable, str(tmp_path / "app" / "toy_app.py"), *args]

        @staticmethod
        def run(*args):
            return subprocess.run(Toy.command(*args), cwd=tmp_path, capture_output=True, text=True, timeout=120)

        @staticmethod
        def start_hanging(*args):
            """A sweep whose first trial blocks; returns once that trial runs."""
            Toy.hang.write_text("")
            proc = subprocess.Popen(Toy.command(*args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            started.append(proc)
            taken = Path(str(Toy.hang) + ".taken")
            for _ in range(600):
                if taken.exists() or proc.poll() is not None:
                    break
                time.sleep(0.1)
            assert taken.exists(), "the hanging trial did not start"
            taken.unlink()
            return proc

    yield Toy
    for proc in started:
        proc.kill()
        proc.wait()


def _trials(db: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials()


def test_a_sweep_in_use_is_refused_a_named_study_is_shared_and_a_killed_trial_is_replaced(tmp_path, toy):
    sweep = tmp_path / "sweep"
    shared = [f"hydra.sweep.dir={sweep}", "hydra.sweeper.study_name=shared"]
    first = toy.start_hanging(*shared)
    # A second sweep with the default settings on that folder is refused; the running trial is untouched.
    refused = toy.run(f"hydra.sweep.dir={sweep}")
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1  # one sentence, no traceback
    assert refused.stderr.startswith(f"error: hydra.sweep.dir '{sweep}' is in use by process {first.pid} ")
    assert [t.state for t in _trials(sweep / "optuna.db", "shared")] == [TrialState.RUNNING]
    # A second process on the explicitly named study shares it: the running trial counts toward n_trials=2.
    second = toy.run(*shared)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [t.state for t in _trials(sweep / "optuna.db", "shared")] == [TrialState.RUNNING, TrialState.COMPLETE]
    # SIGKILL the first sweep mid-trial: the next run marks its trial failed, does not count it, and
    # runs the same point again in its place.
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = toy.run(*shared)
    assert third.returncode == 0, third.stderr[-3000:]
    killed, kept, replacement = _trials(sweep / "optuna.db", "shared")
    assert killed.state == TrialState.FAIL and "killed" in killed.user_attrs[ORPHAN_ATTR]
    assert kept.state == replacement.state == TrialState.COMPLETE
    assert replacement.params == killed.params
    assert replacement.value == pytest.approx((killed.params["x"] - 0.3) ** 2, rel=1e-12)


def test_the_default_sweep_folder_and_study_follow_the_overrides_and_a_folder_refuses_other_overrides(tmp_path, toy):
    # n_trials is the sweeper's own setting, not an override of the job: raising it resumes the study.
    runs = [toy.run("+tag=smoke", "hydra.sweeper.n_trials=1"), toy.run("+tag=full", "hydra.sweeper.n_trials=1"),
            toy.run("+tag=smoke", "hydra.sweeper.n_trials=2")]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    smoke, full = (sweep_identity("toy_app", [tag])["id"] for tag in ("+tag=smoke", "+tag=full"))
    assert sorted(f.name for f in (tmp_path / "multirun").iterdir()) == sorted([smoke, full])
    for name, expected in ((smoke, 2), (full, 1)):
        folder = tmp_path / "multirun" / name
        trials = _trials(folder / "optuna.db", name)  # the study is named like its folder
        assert [t.state for t in trials] == [TrialState.COMPLETE] * expected
        assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == [str(i) for i in range(expected)]
    # Pointing a sweep with other overrides at a used folder is refused, naming both.
    other = toy.run("+tag=full", f"hydra.sweep.dir={tmp_path / 'multirun' / smoke}")
    assert other.returncode != 0
    assert other.stderr.strip().splitlines() == [  # one sentence, no traceback
        f"error: {tmp_path / 'multirun' / smoke} (sweep_identity.yaml) belongs to the sweep {smoke!r} with overrides "
        f"['+tag=smoke'], not to this one ({full!r} with overrides ['+tag=full']); use the same overrides or another "
        "hydra.sweep.dir and hydra.sweeper.study_name (the default ones differ per search and overrides)"]
    assert len(_trials(tmp_path / "multirun" / smoke / "optuna.db", smoke)) == 2


def test_a_named_study_in_a_shared_storage_refuses_a_sweep_with_other_overrides(tmp_path):
    from omegaconf import OmegaConf

    from hydra_plugins.scrimp_optuna_sweeper.sweeper import ScrimpOptunaSweeper

    def sweeper(overrides: list[str], sweep_dir: Path) -> ScrimpOptunaSweeper:
        made = ScrimpOptunaSweeper(storage=f"sqlite:///{tmp_path / 'shared.db'}", study_name="s", n_trials=1)
        made.config = OmegaConf.create({"hydra": {"job": {"name": "j"}, "sweeper": {"pruner": None, "sampler": None}}})
        made.sweep_dir, made.identity = sweep_dir, sweep_identity("search", overrides)
        return made

    sweeper(["trainer.max_steps=20"], tmp_path / "machine_a")._study()
    sweeper(["trainer.max_steps=20"], tmp_path / "machine_b")._study()  # the same sweep from elsewhere: shared
    with pytest.raises(ValueError, match=r"study 's' in .* belongs to the sweep 's' with overrides "
                                         r"\['trainer.max_steps=20'\], not to this one \('s' with overrides "
                                         r"\['trainer.max_steps=100'\]\)"):
        sweeper(["trainer.max_steps=100"], tmp_path / "machine_c")._study()


@pytest.mark.parametrize("search", ["galore_lr", "ppl_vs_memory"])
def test_search_configs_keep_no_trial_checkpoint_and_name_their_folder_by_their_overrides(search):
    from hydra import compose, initialize_config_dir

    dirs = []
    for extra in ([], ["trainer.max_steps=20"], []):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"hparams_search={search}", *extra], return_hydra_config=True)
        assert cfg.checkpoint.enabled is False and cfg.hydra.sweeper.study_name is None
        dirs.append(cfg.hydra.sweep.dir)
    assert dirs[0] == dirs[2] == f"multirun/{sweep_identity(search, [])['id']}"
    assert dirs[1] == f"multirun/{sweep_identity(search, ['trainer.max_steps=20'])['id']}" != dirs[0]
