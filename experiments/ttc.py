"""Test-time-compute allocation on recorded samples, with honest (cross-fitted) evaluation.

    python -m experiments.ttc                                   # defaults: ESC last letters, stop_reallocate, B=8
    python -m experiments.ttc data=esc_last_letters policy=sequential budget=8
    python -m experiments.ttc policy=compute_optimal curve_budgets=[2,4,8,16,32]
    python -m experiments.ttc -m hparams_search=sequential_optuna   # sweep (tuning split only)

The job itself is ``scrimp.ttc.run.run``; this entry point only parses the command line and prints.
Prints a table (the policy beside uniform and the published baselines ESC and Adaptive-Consistency, the
chosen budget marked, 95% bootstrap intervals over prompts and replay orders) and writes, in the Hydra run
folder, ``summary.json``, ``curve.csv`` and ``curve.png``. With ``tune_only=true`` it evaluates the
fixed ``policy.params`` on the calibration split (never the reported one) and returns the accuracy,
the objective for Optuna sweeps.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from scrimp.cli import ttc_job
from scrimp.ttc.run import load_data, run  # noqa: F401  (the library's job; re-exported for callers)


@hydra.main(version_base="1.3", config_path="../conf/ttc", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    """Hydra entry point; returns the objective(s) for sweepers (accuracy, or [accuracy, spend])."""
    return ttc_job(cfg)


if __name__ == "__main__":
    main()
