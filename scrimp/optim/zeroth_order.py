"""MeZO-style zeroth-order optimizers (closure API, seeded perturbation); see ``scrimp.optim.zo``.

    from scrimp.optim.zeroth_order import ZOSGD
    opt = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3)
    opt.step(lambda: model(input_ids, labels=input_ids).loss)   # forward only, no backward
"""

from scrimp.optim.zo import (
    ZOSGD,
    VarianceQueryAllocator,
    ZerothOrderOptimizer,
    ZOAdam,
    mix_seed,
    projected_gradient,
    restore,
    save_full,
    save_log,
)

__all__ = [
    "ZOSGD",
    "ZOAdam",
    "VarianceQueryAllocator",
    "ZerothOrderOptimizer",
    "mix_seed",
    "projected_gradient",
    "restore",
    "save_full",
    "save_log",
]
