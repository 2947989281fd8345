"""scrimp's Optuna sweeper for Hydra: ``hydra/sweeper=scrimp_optuna``.

Reads the ``hydra.sweeper.params`` syntax of the official hydra-optuna-sweeper (``interval``,
``choice``, ``range``, ``tag(log, ...)``) on current Optuna (>= 4), and adds pruning through the
storage and multi-objective studies. See ``sweeper.py``.

    python -m experiments.train -m hparams_search=galore_lr
"""

from hydra_plugins.scrimp_optuna_sweeper.config import ScrimpOptunaSweeperConf

__all__ = ["ScrimpOptunaSweeperConf"]
