"""Per-example query allocation for zeroth-order steps, on ``scrimp.allocators``.

A step's query budget ``budget_per_example * n`` is spread over the n examples of a batch so as to
minimise the variance of the averaged estimate ``(1/n) sum_i (1/k_i) sum_r c_ir z_r``: example i
with per-query variance sigma_i^2 contributes sigma_i^2 / k_i, which is what
``scrimp.allocators.utility.variance_reduction`` scores. sigma_i^2 is estimated by the squared pilot
projected gradient c_i0^2 (E[c^2] = |grad_i|^2 + O(eps^2) for Gaussian z). In the spirit of FLOPS
and of arXiv 2509.15552, which shows that with plain averaging one query per step is optimal and
extra queries pay only with better estimators; ``benchmarks/zo.py`` measures this at equal forwards.

The pilot both sets k_i and enters the estimate, so the estimator has a selection bias of order
1/k (larger |c_i0| -> more queries -> smaller weight on that pilot); documented, not corrected.
"""

from __future__ import annotations

import numpy as np


class VarianceQueryAllocator:
    """``allocator(sigma2) -> counts``: knapsack over queries per example, variance-reduction utility."""

    def __init__(self, budget_per_example: int = 2, k_max: int | None = None, floor: float = 1e-12):
        if not isinstance(budget_per_example, int) or budget_per_example < 1:
            raise ValueError(f"budget_per_example must be an integer >= 1, got {budget_per_example!r}")
        if k_max is not None and (not isinstance(k_max, int) or k_max < 1):
            raise ValueError(f"k_max must be an integer >= 1 or None, got {k_max!r}")
        self.budget_per_example = budget_per_example
        self.k_max = k_max
        self.floor = floor

    def __call__(self, sigma2: np.ndarray) -> np.ndarray:
        from scrimp.allocators import allocate_counts
        from scrimp.allocators.utility import variance_reduction

        sigma2 = np.maximum(np.asarray(sigma2, dtype=np.float64).reshape(-1, 1), self.floor)
        n = sigma2.shape[0]
        budget = self.budget_per_example * n
        k_max = self.k_max or budget - (n - 1)
        allocation = allocate_counts(variance_reduction, sigma2, budget, k_min=1, k_max=k_max)
        return np.asarray(allocation.counts, dtype=np.int64)
