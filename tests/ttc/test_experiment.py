import json
import re

import pytest
from hydra import compose, initialize_config_dir

from experiments.ttc import run
from scrimp.ttc.replay import shared_data_dir


def _cfg(*overrides):
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf" / "ttc"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_entry_point_writes_summary_csv_and_plot(tmp_path):
    cfg = _cfg("policy=sequential", "budget=4", "curve_budgets=[2,4]", "repeats=1", "tune_repeats=1",
               "n_boot=100", "policy.space=[{rule:[beta],pilot:[2],threshold:[0.9]}]")
    summary = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["accuracy"] == pytest.approx(summary["accuracy"])
    assert saved["spend"] <= 4 and (tmp_path / "curve.csv").is_file() and (tmp_path / "curve.png").stat().st_size > 0
    assert saved["accuracy_ci"][0] <= saved["accuracy"] <= saved["accuracy_ci"][1]


def test_unknown_policy_is_one_clear_error(tmp_path):
    cfg = _cfg("policy.name=greedy")
    with pytest.raises(ValueError, match="policy.name must be one of"):
        run(cfg, tmp_path)


def test_optuna_sweep_scores_the_tuning_split_only(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import optuna

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "experiments.ttc", "-m", "hparams_search=sequential_optuna",
           "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}", "tune_repeats=1"]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True, timeout=120)
    study = optuna.load_study(study_name="ttc_sequential", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 2
    # the objective is the accuracy on fold 0's calibration part: recompute it independently
    from scrimp.ttc.crossfit import replay_run, split_folds
    from scrimp.ttc.replay import convert_esc

    prompts = convert_esc(shared_data_dir() / "ttc" / "esc_gpt35_last_letters_t0.7.jsonl")
    calib_idx = [i for i in range(len(prompts)) if i not in set(split_folds(len(prompts), 2, 0)[0])]
    trial = study.trials[0]
    params = {"rule": "dirichlet", **{k.split(".")[-1]: v for k, v in trial.params.items()}}
    acc, _ = replay_run([prompts[i] for i in calib_idx], "sequential", 4, params, repeats=1, seed=0)
    assert trial.value == pytest.approx(acc.mean())


def test_any_canonical_replay_file_runs_through_the_entry_point(tmp_path):
    # Another model's recorded samples, in the canonical format, with fewer samples than the ESC
    # file (12 per prompt, below the sequential cap of 40) and one unextracted answer per prompt:
    # the entry point must run on it as it is, and read it as written.
    import dataclasses

    from scrimp.ttc.replay import convert_esc, save_replay

    prompts = convert_esc(shared_data_dir() / "ttc" / "esc_gpt35_last_letters_t0.7.jsonl")[:60]
    prompts = [dataclasses.replace(p, samples=(dataclasses.replace(p.samples[0], answer=None, correct=False),
                                               *p.samples[1:12])) for p in prompts]
    path = tmp_path / "other_model.jsonl"
    save_replay(prompts, path)
    cfg = _cfg("data=replay_file", f"data.path={path}", "policy=sequential", "budget=4", "curve_budgets=[2,4]",
               "baseline_budget=8", "repeats=1", "tune_repeats=1", "n_boot=100",
               "policy.space=[{rule:[dirichlet],pilot:[2],threshold:[0.9],prior:[0.5]}]")
    summary = run(cfg, tmp_path / "out")
    correct = sum(bool(s.correct) for p in prompts for s in p.samples)
    assert summary["stats"]["samples"] == 720
    extracted = sum(s.answer is not None for p in prompts for s in p.samples)
    assert extracted <= 660 and summary["stats"]["extraction_rate"] == pytest.approx(extracted / 720)
    assert summary["stats"]["sample_accuracy"] == pytest.approx(correct / 720)
    assert summary["spend"] <= 4
    assert summary["accuracy_ci"][0] <= summary["accuracy"] <= summary["accuracy_ci"][1]


def test_summary_is_strict_json_when_nothing_is_judged_or_right(tmp_path):
    # No sample can be judged (no references): sample accuracy is undefined and the baseline is never
    # right. summary.json must still be strict JSON (null, not a bare NaN) and say why savings are n/a.
    import dataclasses

    from scrimp.ttc.replay import convert_esc, save_replay

    prompts = [dataclasses.replace(p, reference=None,
                                   samples=tuple(dataclasses.replace(s, correct=None) for s in p.samples))
               for p in convert_esc(shared_data_dir() / "ttc" / "esc_gpt35_last_letters_t0.7.jsonl")[:40]]
    path = tmp_path / "unjudged.jsonl"
    save_replay(prompts, path)
    cfg = _cfg("data=replay_file", f"data.path={path}", "policy=uniform", "budget=4", "curve_budgets=[2,4]",
               "baseline_budget=4", "repeats=1", "tune_repeats=1", "n_boot=50")
    run(cfg, tmp_path / "out")

    def refuse(constant):
        raise ValueError(f"summary.json holds the non-JSON constant {constant}")

    saved = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)
    assert saved["stats"]["sample_accuracy"] is None and saved["savings_vs_uniform"]["ratio"] is None


@pytest.mark.parametrize("override, message", [
    ("policy.name=greedy", "error: policy.name must be one of"),
    ("data=replay_file", "error: data.path must name a recorded-samples file"),
    ("data.path=/nonexistent/samples.jsonl", "error: "),
    ("+policy.params.k_max=-3", "error: k_max must be an integer >= pilot=2 (or None), got -3"),  # exited 0
    ("+policy.params.foo=1", "error: policy stop_reallocate takes no parameter 'foo'"),  # a Hydra traceback
    ("budget=abc", "error: budget must be a positive number of samples per prompt"),  # did not name budget
    ("seed=-1", "error: seed must be an integer in [0, 4294967295]"),  # numpy's words, not the key's name
])
def test_command_line_bad_input_is_one_sentence_without_a_traceback(override, message):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "experiments.ttc", override, "hydra.run.dir=/tmp/scrimp-ttc-bad"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("overrides", "message"), [
    (["repeats=0"], "repeats must be an integer >= 1, got 0"),  # NaN results with rc 0
    (["n_boot=0"], "n_boot must be an integer >= 1, got 0"),  # failed only after the whole curve
    (["tune_repeats=-1"], "tune_repeats must be an integer >= 1"),
    (["folds=1"], "folds must be an integer >= 2"),
    (["curve_budgets=[0]"], "curve_budgets must be a non-empty list of positive numbers of samples per prompt"),
    (["policy=knapsack", "+policy.params.k_max=-3"], "k_max must be an integer >= pilot=2"),  # spent nothing
    (["policy=knapsack", "policy.space.prior=[-1.0]"], "prior must be a finite number > 0, got -1.0"),
    (["policy=compute_optimal", "policy.space.pilot=[0]"], "pilot must be an integer >= 1, got 0"),
    (["policy=uniform", "+policy.params.foo=1"], "policy uniform takes no parameter 'foo'"),
    (["tune_only=true", "+policy.params.prior=-1"], "prior must be a finite number > 0, got -1"),
    # the validation layer's table (scrimp.training.validate.TTC_RULES): every key, by class
    (["seed=-1"], re.escape("seed must be an integer in [0, 4294967295]")),  # was numpy's "expected non-negative integer"
    (["seed=abc"], re.escape("seed must be an integer in [0, 4294967295]")),
    (["seed=1.5"], re.escape("seed must be an integer in [0, 4294967295]")),
    (["budget=0"], re.escape("budget must be a positive number of samples per prompt")),
    (["budget=inf"], re.escape("budget must be a positive number of samples per prompt")),
    (["baseline_budget=2.5"], re.escape("baseline_budget must be an integer >= 1")),
    (["baseline_budget=abc"], re.escape("baseline_budget must be an integer >= 1")),
    (["curve_budgets=[]"], re.escape("curve_budgets must be a non-empty list")),
    (["curve_budgets=abc"], re.escape("curve_budgets must be a non-empty list")),
    (["curve_budgets=[2,abc]"], re.escape("curve_budgets must be a non-empty list")),
    (["folds=abc"], re.escape("folds must be an integer >= 2")),
    (["repeats=1.5"], re.escape("repeats must be an integer >= 1")),
    (["n_boot=abc"], re.escape("n_boot must be an integer >= 1")),
    (["tune_only=maybe"], re.escape("tune_only must be true or false, got 'maybe'")),
    (["objectives=[speed]"], re.escape("objectives must be a non-empty list, each item one of ['accuracy', 'spend']")),
    (["objectives=[]"], re.escape("objectives must be a non-empty list")),
    (["data.format=csv"], re.escape("data.format must be one of ['esc', 'replay'], got 'csv'")),
    (["data.path=5"], re.escape("data.path must name a recorded-samples file")),
    (["policy.name=5"], re.escape("policy.name must be one of")),
    (["policy.params=abc"], re.escape("policy.params must be a mapping")),
])
def test_bad_settings_are_refused_before_the_data_is_read(tmp_path, monkeypatch, overrides, message):
    import experiments.ttc as entry

    def never(cfg):
        raise AssertionError("data was read before the settings were checked")

    monkeypatch.setattr(entry, "load_data", never)
    with pytest.raises(ValueError, match=message):
        run(_cfg(*overrides), tmp_path)


def test_summary_write_leaves_no_temporary_file_when_it_fails(tmp_path, monkeypatch):
    import os

    from scrimp.ttc.run import write_json as _atomic_json  # the job moved into the library

    with pytest.raises(TypeError):
        _atomic_json({"x": object()}, tmp_path / "summary.json")  # not serializable
    assert list(tmp_path.iterdir()) == []

    def full_disk(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="no space left"):
        _atomic_json({"x": 1}, tmp_path / "summary.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("overrides", "call"), [
    (["data=replay_file"], {"path": "???"}),
    (["data.path=5"], {"path": 5}),
    (["data.format=csv"], {"path": "ttc/x.jsonl", "format": "csv"}),
])
def test_a_bad_data_path_or_format_reads_the_same_from_the_config_and_the_target(tmp_path, overrides, call):
    # One rule (the validation layer's TTC_RULES) for both ways in: the composed config and a direct call of
    # the data config's _target_ (which had its own, different sentence).
    from scrimp.ttc.run import recorded_prompts

    with pytest.raises(ValueError) as composed:
        run(_cfg(*overrides), tmp_path)
    with pytest.raises(ValueError) as direct:
        recorded_prompts(**call)
    assert str(direct.value) == str(composed.value)
