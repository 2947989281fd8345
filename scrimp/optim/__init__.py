"""Drop-in ``torch.optim.Optimizer`` classes that keep less state: GaLore, FRUGAL, APOLLO, Natural GaLore.

    from scrimp.optim import GaLoreAdamW, FrugalAdamW, param_groups, build, layerwise
    from scrimp.optim import ApolloAdamW, ApolloMiniAdamW, NaturalGaLoreAdamW, FrugalLion, FrugalSGD
    from scrimp.optim.memory import state_bytes
    from scrimp.optim import ZOSGD, ZOAdam            # zeroth-order, opt.step(closure)
    from scrimp.optim.kernels import projected_adam_step   # fused Triton update (CUDA)

See ``subspace.py`` for the composable engine (projector x inner rule x residual rule x output rule,
stepped in public stages), ``rules`` for the parts and their registries, ``moments`` for where the
inner rule's state lives (fp32 or blockwise 8-bit), and ``functional.py`` for the pure update math
every path shares.
"""

from . import functional, memory, moments, rules
from .apollo import ApolloAdamW, ApolloMiniAdamW
from .build import build
from .frugal import FrugalAdamW, FrugalLion, FrugalSGD
from .galore import GaLoreAdamW, GaLoreAdamW8bit
from .groups import param_groups
from .layerwise import LayerwiseOptimizer, layerwise
from .memory import state_bytes
from .natural_galore import NaturalGaLoreAdamW
from .projection import PROJ_TYPES, PROJECTORS, Projector
from .subspace import SubspaceAdamW
from .zeroth_order import ZOSGD, VarianceQueryAllocator, ZOAdam

__all__ = [
    "ApolloAdamW",
    "ApolloMiniAdamW",
    "FrugalAdamW",
    "FrugalLion",
    "FrugalSGD",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "NaturalGaLoreAdamW",
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
    "moments",
    "param_groups",
    "rules",
    "state_bytes",
]
