"""Zeroth-order optimization: seeded perturbations, update rules, optimizers, checkpoints, allocation.

Public names are re-exported by ``scrimp.optim.zeroth_order``.
"""

from scrimp.optim.zo.allocation import VarianceQueryAllocator
from scrimp.optim.zo.checkpoint import restore, save_full, save_log
from scrimp.optim.zo.optimizer import ZOSGD, ZerothOrderOptimizer, ZOAdam, projected_gradient
from scrimp.optim.zo.perturbation import direction, mix_seed

__all__ = [
    "ZOSGD",
    "ZOAdam",
    "VarianceQueryAllocator",
    "ZerothOrderOptimizer",
    "direction",
    "mix_seed",
    "projected_gradient",
    "restore",
    "save_full",
    "save_log",
]
