"""The generator as a ``_target_`` config: a local transformers model sampled once through the same run
(cross-fitting, baselines, table) as recorded samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from scrimp.ttc.run import run

from .test_generate import _tiny_lm


def _cfg(*overrides):
    conf = Path(__file__).resolve().parents[2] / "conf" / "ttc"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = _tiny_lm()
    path = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _prompts(tmp_path, n=6):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "abc " * (i + 1), "reference": "a"}) + "\n"
                            for i in range(n)))
    return path


def test_a_local_transformers_model_runs_through_the_whole_job(tmp_path, model_dir):
    cfg = _cfg("data=hf_model", f"data.model={model_dir}", f"data.path={_prompts(tmp_path)}", "data.samples=4",
               "data.max_new_tokens=4", "policy=uniform", "budget=2", "curve_budgets=[1,2]", "baseline_budget=4",
               "repeats=2", "tune_repeats=1", "n_boot=50")
    summary = run(cfg, tmp_path / "out")
    assert summary["stats"]["prompts"] == 6 and summary["stats"]["samples"] == 24
    assert any(line.startswith("| esc (published) |") for line in summary["table"])


@pytest.mark.parametrize(("override", "message"), [
    ("data.model=/nonexistent/model", "data.model must be a local folder"),
    ("data.backend=tgi", "data.backend must be one of"),
    ("data.samples=0", "data.samples must be an integer >= 1"),
])
def test_bad_live_generator_settings_are_one_sentence(tmp_path, model_dir, override, message):
    cfg = _cfg("data=hf_model", f"data.model={model_dir}", f"data.path={_prompts(tmp_path)}", override)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(cfg, tmp_path / "out")


@pytest.mark.parametrize(("content", "message"), [
    (b'\xff\xfe{"id": 1}\n', r"prompts\.jsonl line 1 is not valid UTF-8"),  # was Python's "'utf-8' codec can't..."
    (b'{"id": 1, "prompt": "a"}\n\xe9\n', r"prompts\.jsonl line 2 is not valid UTF-8"),
    (b'{"id": 1, "prompt": "a"}\n{oops\n', r"prompts\.jsonl line 2 is not valid JSON"),
    (b'{"id": 1}\n', r"prompts\.jsonl line 1: each line must be an object with 'id' and a string 'prompt'"),
])
def test_a_bad_prompts_file_is_named_with_its_line(tmp_path, model_dir, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    cfg = _cfg("data=hf_model", f"data.model={model_dir}", f"data.path={path}", "data.samples=2")
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "out")
