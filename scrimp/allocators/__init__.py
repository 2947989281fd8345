"""Budget allocation shared by test-time compute, zeroth-order training and offload.

    from scrimp.allocators import solve, allocate_counts, utility, posterior, memory_plan
    alloc = solve(costs, values, budget)                          # multiple-choice knapsack
    alloc = allocate_counts(utility.coverage, p[:, None], budget)   # samples per item
"""

from scrimp.allocators import memory_plan, posterior, utility
from scrimp.allocators.knapsack import Allocation, allocate_counts, solve
from scrimp.allocators.memory_plan import estimate_peak, plan_arena, plan_placement
from scrimp.allocators.posterior import BetaPosterior, DirichletPosterior

__all__ = [
    "Allocation",
    "BetaPosterior",
    "DirichletPosterior",
    "allocate_counts",
    "estimate_peak",
    "memory_plan",
    "plan_arena",
    "plan_placement",
    "posterior",
    "solve",
    "utility",
]
