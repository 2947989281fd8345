"""Drop-in ``torch.optim.Optimizer`` classes that keep less state: GaLore, FRUGAL, and their parts.

    from scrimp.optim import GaLoreAdamW, FrugalAdamW, param_groups, build, layerwise
    from scrimp.optim.memory import state_bytes
    from scrimp.optim import ZOSGD, ZOAdam            # zeroth-order, opt.step(closure)
    from scrimp.optim.kernels import projected_adam_step   # fused Triton update (CUDA)

See ``subspace.py`` for the composable engine (projector x Adam x residual rule) and
``functional.py`` for the pure update math every path shares.
"""

from . import functional, memory
from .build import build
from .frugal import FrugalAdamW
from .galore import GaLoreAdamW, GaLoreAdamW8bit
from .groups import param_groups
from .layerwise import LayerwiseOptimizer, layerwise
from .memory import state_bytes
from .projection import PROJ_TYPES, PROJECTORS, Projector
from .subspace import SubspaceAdamW
from .zeroth_order import ZOSGD, VarianceQueryAllocator, ZOAdam

__all__ = [
    "FrugalAdamW",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "PROJECTORS",
    "PROJ_TYPES",
    "Projector",
    "SubspaceAdamW",
    "VarianceQueryAllocator",
    "ZOAdam",
    "ZOSGD",
    "build",
    "functional",
    "layerwise",
    "memory",
    "param_groups",
    "state_bytes",
]
