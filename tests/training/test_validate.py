"""The validation layer (scrimp.training.validate): every bad input is one sentence naming its key, before
the data, the tokenizer or the model is built, and nothing is written.

``BAD_TRAIN_INPUTS`` are the training inputs tried, by class (wrong type, out of range, unknown choice,
unknown key, keys that contradict each other), ``BAD_DATA_FILES`` the data files; the ttc config's are
in tests/ttc/test_experiment.py and the replay files' in tests/ttc/test_replay.py. Run this file as a
script to print the table of training inputs and how each ended (the count the reliability docs report):

    python tests/training/test_validate.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.helpers import SMALL, compose_train

REPO = Path(__file__).resolve().parents[2]

# (overrides, the key the sentence must start with, the value it must quote or None)
BAD_TRAIN_INPUTS = [
    # seed: wrong type, out of range
    (["seed=abc"], "seed", "'abc'"),
    (["seed=-1"], "seed", "-1"),
    (["seed=1.5"], "seed", "1.5"),
    (["seed=4294967296"], "seed", "4294967296"),
    (["seed=true"], "seed", "True"),
    (["seed=null"], "seed", "None"),
    # trainer
    (["trainer.max_steps=-5"], "trainer.max_steps", "-5"),
    (["trainer.max_steps=0"], "trainer.max_steps", "0"),
    (["trainer.max_steps=abc"], "trainer.max_steps", "'abc'"),
    (["trainer.max_steps=1.5"], "trainer.max_steps", "1.5"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval", "0"),
    (["trainer.val_check_interval=-1"], "trainer.val_check_interval", "-1"),
    (["trainer.val_check_interval=abc"], "trainer.val_check_interval", "'abc'"),
    (["trainer.val_check_interval=1.5"], "trainer.val_check_interval", "1.5"),
    (["trainer.max_steps=50"], "trainer.val_check_interval", "100"),  # longer than the run
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", "0"),
    (["trainer.accumulate_grad_batches=abc"], "trainer.accumulate_grad_batches", "'abc'"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps", "0"),
    (["trainer.log_every_n_steps=abc"], "trainer.log_every_n_steps", "'abc'"),
    (["trainer.precision=15"], "trainer.precision", "15"),
    (["trainer.precision=fp8"], "trainer.precision", "'fp8'"),
    (["trainer.accelerator=abacus"], "trainer.accelerator", "'abacus'"),
    (["trainer.devices=0"], "trainer.devices", "0"),
    (["trainer.devices=-2"], "trainer.devices", "-2"),
    (["trainer.devices=many"], "trainer.devices", "'many'"),
    (["+trainer.max_epochs=0"], "trainer.max_epochs", "0"),
    (["+trainer.max_epochs=abc"], "trainer.max_epochs", "'abc'"),
    (["trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps", "-2"),
    (["trainer.deterministic=sometimes"], "trainer.deterministic", "'sometimes'"),
    (["trainer.enable_progress_bar=abc"], "trainer.enable_progress_bar", "'abc'"),
    (["trainer.limit_val_batches=-1"], "trainer.limit_val_batches", "-1"),
    (["+trainer.max_stepz=3"], "trainer.max_stepz", None),  # typo
    (["+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val", "1.0"),
    # data
    (["data.block_size=1"], "data.block_size", "1"),  # trained, then a NaN loss blamed on the lr
    (["data.block_size=0"], "data.block_size", "0"),
    (["data.block_size=-3"], "data.block_size", "-3"),
    (["data.block_size=abc"], "data.block_size", "'abc'"),
    (["data.batch_size=0"], "data.batch_size", "0"),
    (["data.batch_size=abc"], "data.batch_size", "'abc'"),
    (["data.vocab_size=0"], "data.vocab_size", "0"),
    (["data.vocab_size=abc"], "data.vocab_size", "'abc'"),
    (["data.val_fraction=0"], "data.val_fraction", "0"),
    (["data.val_fraction=1"], "data.val_fraction", "1"),
    (["data.val_fraction=1.5"], "data.val_fraction", "1.5"),
    (["data.val_fraction=abc"], "data.val_fraction", "'abc'"),
    (["data.val_blocks=0"], "data.val_blocks", "0"),
    (["data.max_documents=1"], "data.max_documents", "1"),
    (["data.max_documents=abc"], "data.max_documents", "'abc'"),
    (["data.num_workers=-1"], "data.num_workers", "-1"),
    (["data.source=web"], "data.source", "'web'"),
    (["data.tokenizer=5"], "data.tokenizer", "5"),
    (["data.seed=-4"], "data.seed", "-4"),
    (["+data.blok_size=3"], "data.blok_size", None),  # typo
    (["data=text_files"], "data.path", None),  # left unset
    (["data=text_files", "data.path=/nonexistent/corpus"], "data.path", "'/nonexistent/corpus'"),
    (["data=text_files", "data.path=/tmp", "data.text_field=5"], "data.text_field", "5"),
    (["data.source=hub"], "data.hub_name", "None"),
    (["data.source=hub", "+data.hub_name=allenai/c4", "data.max_documents=null"], "data.max_documents", "None"),
    # model
    (["model.name=llama_huge"], "model.name", "'llama_huge'"),
    (["model.name=5"], "model.name", "5"),
    (["model.overrides=abc"], "model.overrides", "'abc'"),
    (["+model.overrides.hidden_size=abc"], "model.overrides", None),
    (["+model.overrides.num_attention_heads=3"], "model.overrides", None),  # 128 hidden / 3 heads
    (["+model.nam=llama_60m"], "model.nam", None),  # typo
    # module: the schedule and clipping
    (["module.min_lr_ratio=abc"], "module.min_lr_ratio", "'abc'"),
    (["module.min_lr_ratio=1.5"], "module.min_lr_ratio", "1.5"),
    (["module.min_lr_ratio=-0.1"], "module.min_lr_ratio", "-0.1"),
    (["module.warmup_steps=-1"], "module.warmup_steps", "-1"),
    (["module.warmup_steps=abc"], "module.warmup_steps", "'abc'"),
    (["module.warmup_steps=2.5"], "module.warmup_steps", "2.5"),
    (["module.total_steps=0"], "module.total_steps", "0"),
    (["module.total_steps=abc"], "module.total_steps", "'abc'"),
    (["module.grad_clip=-1"], "module.grad_clip", "-1"),
    (["module.grad_clip=abc"], "module.grad_clip", "'abc'"),
    (["+module.grad_clipp=1"], "module.grad_clipp", None),  # typo
    # optim: the shared keys by the table, the rest by the optimizer's own constructor
    (["optim.name=sgdx"], "optim.name", "'sgdx'"),
    (["optim.lr=-1"], "optim.lr", "-1"),
    (["optim.lr=0"], "optim.lr", "0"),
    (["optim.lr=abc"], "optim.lr", "'abc'"),
    (["optim.lr=nan"], "optim.lr", "nan"),
    (["optim.lr=inf"], "optim.lr", "inf"),
    (["optim.weight_decay=-1"], "optim.weight_decay", "-1"),
    (["optim.rank=0"], "optim.rank", "0"),
    (["optim.rank=abc"], "optim.rank", "'abc'"),
    (["optim.rank=1.5"], "optim.rank", "1.5"),
    (["optim.rank=128"], "optim.rank", "128"),  # not below min(m, n) of llama_tiny's weights
    (["optim.update_proj_gap=0"], "optim.update_proj_gap", "0"),
    (["optim.scale=-1"], "optim.scale", "-1"),
    (["optim.projector=bad"], "optim.projector", "'bad'"),
    (["optim.proj_type=bad"], "optim.proj_type", "'bad'"),
    (["optim.layerwise=abc"], "optim.layerwise", "'abc'"),
    (["optim.target_modules=[]"], "optim.target_modules", "[]"),
    (["optim.target_modules=[nomatch]"], "optim.target_modules", None),
    (["+optim.foo=1"], "optim.foo", None),
    (["+optim.rnak=8"], "optim.rnak", None),  # typo
    (["optim.layerwise=true"], "module.grad_clip", "1.0"),  # no global norm inside backward
    (["optim.layerwise=true", "module.grad_clip=null", "trainer.accumulate_grad_batches=2"],
     "trainer.accumulate_grad_batches", "2"),
    # layer-wise updates on several processes, however the world size is spelled
    (["optim.layerwise=true", "module.grad_clip=null", "trainer.devices='0,1'"], "optim.layerwise", "on 2 processes"),
    (["optim.layerwise=true", "module.grad_clip=null", "trainer.devices=[0,1]"], "optim.layerwise", "on 2 processes"),
    (["optim.layerwise=true", "module.grad_clip=null", "trainer.devices='2'"], "optim.layerwise", "on 2 processes"),
    (["optim.layerwise=true", "module.grad_clip=null", "+trainer.num_nodes=2"], "optim.layerwise", "on 2 processes"),
    (["optim=adamw", "+optim.rank=8"], "optim.rank", None),  # AdamW has no rank
    (["optim=adamw", "optim.betas=[0.9]"], "optim.betas", "[0.9]"),
    (["optim=adamw", "optim.betas=[0.9,1.5]"], "optim.betas", "[0.9, 1.5]"),
    (["optim=adamw", "optim.betas=abc"], "optim.betas", "'abc'"),
    (["optim=adamw", "optim.eps=0"], "optim.eps", "0"),
    (["optim=frugal", "optim.density=0"], "optim.density", "0"),
    (["optim=frugal", "optim.density=1.5"], "optim.density", "1.5"),
    (["optim=frugal", "optim.update_gap=0"], "optim.update_gap", "0"),
    (["optim=frugal", "optim.inactive_update_rule=bad"], "optim.inactive_update_rule", "'bad'"),
    (["optim=zo_sgd", "trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches", "2"),
    (["optim=zo_sgd", "optim.n_queries=0"], "optim.n_queries", "0"),
    (["optim=zo_sgd", "optim.eps=-1"], "optim.eps", "-1"),
    (["optim=zo_sgd", "+optim.rank=4"], "optim.rank", None),
    (["optim=zo_sgd", "trainer=ddp_cpu"], "optim.name", "on 2 processes"),
    # checkpoint, resume and the top level
    (["checkpoint.keep=-5"], "checkpoint.keep", "-5"),
    (["checkpoint.keep=abc"], "checkpoint.keep", "'abc'"),
    (["checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps", "-1"),
    (["+checkpoint.every_n_step=5"], "checkpoint.every_n_step", None),  # typo
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path", "'/nonexistent/last.ckpt'"),
    (["print_table=abc"], "print_table", "'abc'"),
    (["logger.csv=abc"], "logger.csv", "'abc'"),
    (["+logger.tensorboard=5"], "logger.tensorboard", "5"),  # loggers are _target_ configs (conf/logger)
    (["+logger.wandb=true"], "logger.wandb", None),
    (["optimized_metric=5"], "optimized_metric", "5"),
    (["optimized_metric=[]"], "optimized_metric", "[]"),
    (["resume.allow_changed=abc"], "resume.allow_changed", "'abc'"),
    (["resume.allow_changed=[model.name]"], "resume.allow_changed", "'model.name'"),
    (["+sede=1"], "sede", None),  # typo
]
if not torch.cuda.is_available():
    BAD_TRAIN_INPUTS.append((["trainer=gpu"], "trainer.accelerator", "'gpu'"))


_BASES: dict[tuple, object] = {}


def composed(overrides: list[str], cache_dir: Path, run_dir: Path):
    """The config Hydra would compose for ``overrides``, quickly: the config groups they choose are composed
    once (about 0.2 s each), then the ``key=value`` overrides are parsed by Hydra's own override parser
    and applied as Hydra applies them (``+key`` adds a key; a plain key must exist)."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    groups = tuple(o for o in overrides if "=" in o and "." not in o.split("=")[0] and not o.startswith("+"))
    if groups not in _BASES:
        _BASES[groups] = compose_train([*SMALL, *groups])
    cfg = copy.deepcopy(_BASES[groups])
    rest = [f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", *(o for o in overrides if o not in groups)]
    for override in OverridesParser.create().parse_overrides(rest):
        if override.is_add():
            with open_dict(cfg):
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False, force_add=True)
        else:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    return cfg


def _builders_must_not_run(monkeypatch):
    """Fail the test if the data, tokenizer or model is built: the sentence must come first."""
    import scrimp.training.run as run

    def never(*args, **kwargs):
        raise AssertionError("built before every input was checked")

    monkeypatch.setattr(run, "build_datamodule", never)
    monkeypatch.setattr(run, "build_module", never)


def _assert_one_sentence(message: str, key: str, value: str | None) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert re.match(rf"^{re.escape(key)}\b", message), message
    if value is not None:
        assert value in message, message


@pytest.mark.parametrize("overrides,key,value", BAD_TRAIN_INPUTS, ids=[" ".join(o) for o, _, _ in BAD_TRAIN_INPUTS])
def test_bad_training_input_is_one_sentence_naming_the_key_before_anything_is_built(
        cache_dir, tmp_path, monkeypatch, overrides, key, value):
    from scrimp.training.run import train
    from scrimp.training.validate import ConfigError

    _builders_must_not_run(monkeypatch)
    with pytest.raises(ConfigError) as err:
        train(composed(overrides, cache_dir, tmp_path / "run"))
    _assert_one_sentence(str(err.value), key, value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_fast_composition_equals_hydras(small_cfg, cache_dir, tmp_path):
    # The parametrized cases above apply key=value overrides to a cached composition; Hydra's compose
    # must give the same config for them.
    from omegaconf import OmegaConf

    overrides = ["optim=adamw", "seed=7", "optim.betas=[0.5,0.6]", "+trainer.max_epochs=3", "data.block_size=abc",
                 "module.grad_clip=null"]
    fast = composed(overrides, cache_dir, tmp_path / "run")
    assert OmegaConf.to_container(fast) == OmegaConf.to_container(small_cfg(*overrides))


def test_the_default_and_every_shipped_optimizer_config_pass(small_cfg):
    # The check must not refuse what ships: each optim group, the gpu-free trainers, each data group.
    from scrimp.training.validate import check_train_config

    for overrides in (["optim=adamw"], ["optim=galore"], ["optim=frugal"], ["optim=zo_sgd"], ["optim=zo_adam"],
                      ["optim=galore8bit"], ["optim=adamw8bit"], ["trainer=ddp_cpu"], ["experiment=galore_tiny_stdlib"],
                      ["optim.layerwise=true", "module.grad_clip=null"], ["trainer.val_check_interval=0.5"]):
        check_train_config(small_cfg(*overrides))


BAD_DATA_MODULE_ARGUMENTS = [
    ({"block_size": 1}, "data.block_size", "1"),
    ({"block_size": "128"}, "data.block_size", "'128'"),
    ({"batch_size": 0}, "data.batch_size", "0"),
    ({"val_fraction": 1.0}, "data.val_fraction", "1.0"),
    ({"source": "web"}, "data.source", "'web'"),
    ({"max_documents": 1}, "data.max_documents", "1"),
    ({"num_workers": -1}, "data.num_workers", "-1"),
    ({"tokenizer": 5}, "data.tokenizer", "5"),
]


@pytest.mark.parametrize("kwargs,key,value", BAD_DATA_MODULE_ARGUMENTS, ids=[k for _, k, _ in BAD_DATA_MODULE_ARGUMENTS])
def test_the_data_module_built_in_python_applies_the_same_rules(tmp_path, kwargs, key, value):
    from scrimp.training.data import TextDataModule
    from scrimp.training.validate import ConfigError

    with pytest.raises(ConfigError) as err:
        TextDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    _assert_one_sentence(str(err.value), key, value)
    assert not (tmp_path / "cache").exists()


# -- data files: one sentence naming the file (and line) -------------------------------------------------
def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


GOOD_ROWS = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(6))
BAD_DATA_FILES = [
    ("corpus.jsonl", GOOD_ROWS + '{"text": "unterminated\n', r"line 7 is not valid JSON"),
    ("corpus.jsonl", GOOD_ROWS + '{"text": 5}\n', r"line 7 has 5 \(a int\) in data.text_field 'text'"),
    ("corpus.jsonl", '{"text": 1}\n{"text": 2}\n', r"line 1 has 1 \(a int\) in data.text_field 'text'"),
    ("corpus.jsonl", GOOD_ROWS + "[1, 2]\n", r"line 7 is not a JSON object \(got list\)"),
    ("corpus.jsonl", GOOD_ROWS.encode() + b'{"text": "caf\xe9"}\n', r"is not UTF-8 text at line 7"),
    ("corpus.json", '[{"text": "a b c"}, {"text": ["a"]}]', r"element 2 has \['a'\] \(a list\)"),
    ("a.txt", bytes(range(256)) * 4, r"is not UTF-8 text \(a binary file\?\) at line 1"),
    ("a.txt", b"text\n\x00\x01\x02binary", r"holds a NUL byte \(a binary file\?\)"),
]


@pytest.mark.parametrize("name,content,message", BAD_DATA_FILES, ids=[m for _, _, m in BAD_DATA_FILES])
def test_a_bad_data_file_is_one_sentence_naming_it_before_the_model_is_built(
        small_cfg, tmp_path, monkeypatch, name, content, message):
    import scrimp.training.run as run
    from scrimp.training.run import train

    corpus = tmp_path / "corpus"
    bad = _write(corpus / name, content)
    if name.endswith(".txt"):  # a good text file beside it: the bad one must be found among several
        _write(corpus / "good.txt", "plain text\n" * 50)
    monkeypatch.setattr(run, "build_module", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError) as err:
        train(small_cfg("data=text_files", f"data.path={corpus}", "data.max_documents=null"))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"data file {str(bad.resolve())!r}"), text
    assert re.search(message, text), text
    assert not (tmp_path / "run" / "csv").exists()


# -- the command line: the sentence, no traceback, a non-zero exit -----------------------------------
@pytest.mark.parametrize("args,key", [
    (["seed=abc"], "seed"),  # Python's own words before; the other inputs take the same path (ValueError)
])
def test_command_line_prints_the_sentence_without_a_traceback(tmp_path, args, key):
    env_cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *args, f"run_dir={tmp_path}/run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "SCRIMP_CACHE": str(env_cache)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {key} must "), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not env_cache.exists()  # nothing built, nothing cached


# -- the table of inputs and outcomes (run as a script) --------------------------------------------------
def outcome(overrides: list[str], run_dir: Path) -> str:
    """How one input ends: its sentence, Hydra's own refusal, or 'accepted'."""
    from scrimp.training.validate import check_resume, check_train_config

    try:
        cfg = compose_train([*SMALL, f"run_dir={run_dir}", *overrides])
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors
        return f"Hydra: {str(err).splitlines()[0]}"
    try:
        check_resume(check_train_config(cfg))
    except ValueError as err:
        return f"{type(err).__name__}: {err}"
    return "accepted"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = [(" ".join(o), outcome(o, Path(tmp) / "run")) for o, _, _ in BAD_TRAIN_INPUTS]
    print("| input | how it ended |\n|---|---|")
    for given, ended in rows:
        print(f"| `{given}` | {ended.replace('|', '/')} |")
    print(f"\n{len(rows)} inputs, {sum(not r.startswith('accepted') for _, r in rows)} refused in one sentence")


@pytest.mark.parametrize("devices,num_nodes", [(1, 1), (2, 1), ("2", 1), (2, 3), ("auto", 1), ("auto", 2)])
def test_the_planned_world_size_is_the_one_lightnings_trainer_gets(devices, num_nodes):
    import lightning as L

    from scrimp.training.validate import planned_world_size

    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    flat = {"trainer.accelerator": "cpu", "trainer.devices": devices, "trainer.num_nodes": num_nodes}
    assert planned_world_size(flat) == trainer.world_size


@pytest.mark.parametrize("devices", ["0,1", "1,", "0, 2,", "3", [0, 1], [2]])
def test_device_indices_count_as_lightning_parses_them(devices):
    from lightning.fabric.utilities.device_parser import _normalize_parse_gpu_string_input

    from scrimp.training.validate import planned_world_size

    parsed = _normalize_parse_gpu_string_input(devices) if isinstance(devices, str) else devices
    expected = len(parsed) if isinstance(parsed, list) else parsed
    assert planned_world_size({"trainer.accelerator": "cuda", "trainer.devices": devices, "trainer.num_nodes": 2}) \
        == 2 * expected
