"""The installable package: what the wheel holds, and that it works outside the clone.

One module-scoped fixture builds the wheel (from a copy of the files the wheel is made of, so the
clone stays clean and nothing but those files can leak in) and installs it into a fresh virtual
environment that sees the project venv's dependencies through a plain path entry (a ``.pth`` line,
which does not run the venv's own ``.pth`` files, so the editable scrimp of the clone stays
invisible). The commands then run from a temporary folder outside the clone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from training.helpers import SMALL

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from: the pyproject's packages and package-dir mapping, and its readme.
SOURCES = ("pyproject.toml", "README.md", "scrimp", "hydra_plugins", "conf")
# Optional dependencies the core must not import (the `train`, `sweep`, `8bit`, `kernels`, `hf` extras).
HEAVY = ("lightning", "pytorch_lightning", "transformers", "datasets", "tokenizers", "hydra", "omegaconf",
         "optuna", "bitsandbytes", "matplotlib", "rich", "triton", "accelerate", "peft")
BLOCK = """
import sys
for name in {names!r}:
    sys.modules[name] = None  # `import name` now raises ModuleNotFoundError, as if not installed
"""


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """The built wheel and the build's output (for warnings)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    # no build isolation: the build must not need the network (setuptools comes from the venv)
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                 str(src), "-w", str(root / "dist")], cwd=root)
    (path,) = (root / "dist").glob("scrimp-*.whl")
    return path, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; its python, bin folder, a work folder and an env."""
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=root)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel[0])], cwd=root)
    work = root / "work"
    work.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
           "SCRIMP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    return {"python": python, "bin": env_dir / "bin", "site": site, "work": work, "env": env}


def _wheel_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


def _metadata(path: Path):
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(name).decode())


def test_wheel_holds_only_scrimp_and_the_sweeper_plugin(wheel):
    names = _wheel_names(wheel[0])
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"scrimp", "hydra_plugins"}
    assert {n.split("/")[1] for n in names if n.startswith("hydra_plugins/")} == {"scrimp_optuna_sweeper"}
    assert "hydra_plugins/__init__.py" not in names  # a namespace shared by every Hydra plugin
    # every package of the clone is in the wheel (pyproject lists them by hand)
    packages = {str(p.parent.relative_to(REPO)) for top in ("scrimp", "hydra_plugins")
                for p in (REPO / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert {f"{p}/__init__.py" for p in packages} <= set(names)
    modules = {str(p.relative_to(REPO)) for top in ("scrimp", "hydra_plugins") for p in (REPO / top).rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))


def test_wheel_ships_every_config_as_package_data(wheel):
    names = set(_wheel_names(wheel[0]))
    configs = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert configs and {f"scrimp/conf/{c}" for c in configs} <= names
    with zipfile.ZipFile(wheel[0]) as zf:
        for c in configs:  # the same bytes: conf/ is the one source
            assert zf.read(f"scrimp/conf/{c}") == (REPO / "conf" / c).read_bytes(), c


def test_wheel_metadata_core_needs_only_torch_and_numpy_and_license_is_spdx(wheel):
    meta = _metadata(wheel[0])
    assert meta["License-Expression"] == "Apache-2.0"
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in core) == ["numpy", "torch"]
    extras = set(meta.get_all("Provides-Extra"))
    assert {"train", "sweep", "8bit", "kernels", "lora", "hf", "vllm", "dev", "all"} <= extras
    all_extra = [r for r in meta.get_all("Requires-Dist") if 'extra == "all"' in r]
    assert not any("vllm" in r for r in all_extra)  # vllm pins its own torch
    scripts = {line.split("=")[0].strip() for line in zipfile.ZipFile(wheel[0]).read(
        next(n for n in _wheel_names(wheel[0]) if n.endswith("entry_points.txt"))).decode().splitlines()
        if "=" in line}
    assert {"scrimp", "scrimp-train", "scrimp-ttc"} <= scripts
    build_log = wheel[1]
    assert "SetuptoolsDeprecationWarning" not in build_log and "License classifiers" not in build_log


def test_installed_wheel_is_the_scrimp_imported_outside_the_clone(venv):
    proc = _run([str(venv["python"]), "-c", "import scrimp, scrimp.cli; print(scrimp.__file__); "
                 "print(scrimp.cli.config_dir())"], cwd=venv["work"], env=venv["env"])
    module_file, conf = proc.stdout.split()
    assert Path(module_file).is_relative_to(venv["site"])
    assert Path(conf) == venv["site"] / "scrimp" / "conf"


# Three GaLore steps on a tiny model; leaves the flat weights in `weights`. Run by the wheel's scrimp in
# the fresh venv and by the clone's here: the two must agree bit for bit.
THREE_GALORE_STEPS = textwrap.dedent("""
    import torch
    from scrimp.optim import GaLoreAdamW, param_groups
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = GaLoreAdamW(param_groups(model, rank=2, update_proj_gap=2, scale=0.25), lr=1e-2)
    x = torch.randn(8, 16)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).double().tolist()
    """)


def test_core_optimizers_import_and_step_without_the_heavy_extras(venv):
    code = BLOCK.format(names=HEAVY) + THREE_GALORE_STEPS + textwrap.dedent("""
        import scrimp, scrimp.allocators
        print(scrimp.__file__)
        print(",".join(repr(w) for w in weights))
        """)
    proc = _run([str(venv["python"]), "-c", code], cwd=venv["work"], env=venv["env"])
    module_file, weights = proc.stdout.split()
    assert Path(module_file).is_relative_to(venv["site"])
    clone: dict = {}
    exec(THREE_GALORE_STEPS, clone)  # the same steps with the clone's scrimp, in this process
    assert [float(w) for w in weights.split(",")] == clone["weights"]


def test_scrimp_train_runs_from_the_wheel_in_any_folder(venv):
    run_dir = venv["work"] / "run"
    _run([str(venv["bin"] / "scrimp-train"), *SMALL, "trainer.max_steps=2", "trainer.val_check_interval=2",
          f"run_dir={run_dir}", f"hydra.run.dir={venv['work'] / 'hydra'}"], cwd=venv["work"], env=venv["env"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["status"] == "completed"
    hydra_cfg = (venv["work"] / "hydra" / ".hydra" / "hydra.yaml").read_text()
    assert str(venv["site"] / "scrimp" / "conf") in hydra_cfg  # the packaged configs, not the clone's
    assert "\n    name: train\n" in hydra_cfg


def test_scrimp_ttc_runs_from_the_wheel_on_a_replay_file(venv):
    # 40 prompts x 12 recorded samples; a sample is right when its answer is the reference
    import random

    rng = random.Random(0)
    rows, right = [], 0
    for i in range(40):
        samples = []
        for _ in range(12):
            answer = rng.choice(["a", "a", "b", "c"])
            right += answer == "a"
            samples.append({"text": f"answer {answer}", "answer": answer, "correct": answer == "a", "score": None,
                            "tokens": 3})
        rows.append({"id": f"p{i}", "prompt": f"q{i}", "reference": "a", "samples": samples})
    path = venv["work"] / "replay.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = venv["work"] / "ttc"
    proc = _run([str(venv["bin"] / "scrimp"), "ttc", "data=replay_file", f"data.path={path}", "policy=sequential",
                 "budget=4", "curve_budgets=[2,4]", "baseline_budget=8", "repeats=1", "tune_repeats=1", "n_boot=100",
                 "policy.space=[{rule:[dirichlet],pilot:[2],threshold:[0.9],prior:[0.5]}]", f"hydra.run.dir={out}"],
                cwd=venv["work"], env=venv["env"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stats"]["samples"] == 480
    assert summary["stats"]["sample_accuracy"] == pytest.approx(right / 480, abs=1e-12)
    assert "uniform" in proc.stdout


def test_hydra_works_without_optuna_and_the_sweeper_names_the_extra(venv):
    code = BLOCK.format(names=("optuna",)) + textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")  # Hydra's plugin scan only warns on a plugin that fails to import
        from hydra.core.plugins import Plugins
        from hydra.plugins.sweeper import Sweeper
        print([p.__name__ for p in Plugins.instance().discover(Sweeper)])
        from hydra_plugins.scrimp_optuna_sweeper.sweeper import ScrimpOptunaSweeper
        try:
            ScrimpOptunaSweeper()
        except ImportError as err:
            print(err)
        """)
    proc = _run([str(venv["python"]), "-c", code], cwd=venv["work"], env=venv["env"])
    plugins, message = proc.stdout.strip().splitlines()
    assert "ScrimpOptunaSweeper" in plugins
    assert message == ("the Optuna sweeper (hparams_search=...) needs optuna, which is not installed: "
                       "pip install 'scrimp[sweep]'")


def test_a_missing_extra_ends_the_cli_with_one_sentence(venv):
    code = BLOCK.format(names=("lightning",)) + "from scrimp.cli import train_main; train_main()"
    proc = subprocess.run([str(venv["python"]), "-c", code], cwd=venv["work"], env=venv["env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: scrimp-train needs lightning, which is not installed: "
                                   "pip install 'scrimp[train]'")


def _pinned(name: str) -> str:
    """The version specifier pyproject gives ``name`` in any extra."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for requirement in (r for reqs in extras.values() for r in reqs):
        if requirement.startswith(name) and requirement[len(name)] in "<>=!~":
            return requirement[len(name):]
    raise AssertionError(f"{name} is not pinned in any extra")


def test_private_lightning_and_optuna_attributes_we_use_exist_within_the_pins():
    """The private attributes scrimp/training uses (callbacks.py, console.py) are why lightning and optuna
    carry upper bounds: they must exist in the installed versions, which must lie inside the bounds."""
    from importlib.metadata import version

    import lightning
    import optuna
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from packaging.specifiers import SpecifierSet

    for dist in ("lightning", "optuna", "hydra-core"):
        spec = SpecifierSet(_pinned(dist))
        assert "<" in str(spec), f"{dist} has no upper bound"
        assert version(dist) in spec, f"installed {dist} {version(dist)} is outside {spec}"
    trainer = lightning.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 0  # callbacks.logging_step
    checkpoint = ModelCheckpoint()
    assert checkpoint._last_global_step_saved == 0
    assert callable(checkpoint._save_last_checkpoint) and callable(checkpoint._monitor_candidates)
    assert callable(RichProgressBar._get_train_description)  # console.StepsProgressBar overrides it
    study = optuna.create_study()
    trial = study.ask()
    assert study.get_trials(deepcopy=False)[0]._trial_id == trial._trial_id  # callbacks.OptunaPruningCallback
