"""The training entry point: Hydra config in, trained model and summary.json out.

    python -m experiments.train                                            # the demo (llama_tiny + GaLore, stdlib)
    python -m experiments.train optim=galore optim.rank=64 trainer.max_steps=200
    python -m experiments.train -m optim=adamw,galore,frugal               # one run per optimizer
    python -m experiments.train -m hparams_search=galore_lr                # Optuna sweep (our sweeper plugin)
    python -m experiments.train trainer=ddp_cpu                            # 2 gloo processes
    python -m experiments.train ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt

The job itself is ``scrimp.training.run.train``; this file only adapts it to Hydra: a bad input
ends the run with its one-sentence message (no stack trace), and the value of
``optimized_metric`` is returned to a sweeper.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def objective(summary: dict, optimized_metric) -> float | list[float] | None:
    """The value(s) a sweeper optimizes, read from the run's flat metrics."""
    if not optimized_metric:
        return None
    names = [optimized_metric] if isinstance(optimized_metric, str) else list(optimized_metric)
    missing = [n for n in names if n not in summary["metrics"]]
    if missing:
        raise ValueError(f"optimized_metric {missing} not among the run's metrics {sorted(summary['metrics'])}")
    values = [float(summary["metrics"][n]) for n in names]
    return values[0] if isinstance(optimized_metric, str) else values


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig):
    """Train once from the composed config; returns ``optimized_metric`` for sweeps."""
    from scrimp.training.run import train

    try:
        summary = train(cfg)
    except ValueError as err:  # bad input: one sentence, raised before training starts
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # the sweeper records the failed trial (and stops, unless hydra.sweeper.fail_fast=false)
        raise SystemExit(f"error: {err}") from None
    return objective(summary, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
