"""The training entry point: Hydra config in, trained model and summary.json out.

    python -m experiments.train                                            # the demo (llama_tiny + GaLore, stdlib)
    python -m experiments.train optim=galore optim.rank=64 trainer.max_steps=200
    python -m experiments.train -m optim=adamw,galore,frugal               # one run per optimizer
    python -m experiments.train -m hparams_search=galore_lr                # Optuna sweep (our sweeper plugin)
    python -m experiments.train trainer=ddp_cpu                            # 2 gloo processes
    python -m experiments.train ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt

The job itself is ``scrimp.cli.train_job`` (shared with the ``scrimp-train`` console script, which reads
the packaged configs); this file only points Hydra at the clone's ``conf/``: a bad input
ends the run with its one-sentence message (no stack trace), and the value of
``optimized_metric`` is returned to a sweeper.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from scrimp.cli import objective, train_job  # noqa: F401  (objective: re-exported for callers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig):
    """Train once from the composed config; returns ``optimized_metric`` for sweeps."""
    return train_job(cfg)


if __name__ == "__main__":
    main()
