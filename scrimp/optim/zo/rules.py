"""Update rules for zeroth-order optimizers: what one committed step does to one parameter.

A committed step is a *plan*: the (seed, weight) terms whose Gaussian directions sum to the update
direction of every parameter, plus the learning rate and weight decay of each parameter group.
Applying a plan to a parameter is a pure function of the parameter, its index, the plan and (for
Adam) its own state, so it can run in any order and at any later time: the streamed path applies a
step's plan to each block as the block next passes through the device (ZO2's fused update), and a
checkpoint replays plans to reproduce a run bit for bit.

Rules:
- ``SGDRule``: ZO-SGD (MeZO, Malladi et al. 2023), its sign variant (ZO-signSGD, Liu et al. 2019),
  and heavy-ball momentum on the *scalar* projected gradients: the momentum buffer
  ``m_t = sum_k beta^(t-k) g_k z_k`` is regenerated from the seeds of the last K steps instead of
  being stored, with K chosen so that ``beta^K <= momentum_tol`` (a truncation of exact momentum,
  whose only exact form is a full-size buffer).
- ``AdamRule``: Adam on the ZO gradient estimate (ZO-Adam as in ZO-Bench, Zhang et al. 2024). The
  first moment could be replayed like momentum, but the second moment with beta2=0.999 would need
  thousands of replayed steps, so both moments are stored: full-size buffers, two per parameter,
  i.e. ZO-Adam gives up the inference-memory advantage of ZO-SGD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scrimp.optim.zo.perturbation import direction


@dataclass(frozen=True)
class Plan:
    """One committed step: ``direction = sum_j weight_j * z(seed_j)``, then the group's lr and decay."""

    terms: tuple[tuple[int, float], ...]
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    step: int


def combined_direction(param: torch.Tensor, index: int, terms: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """``sum_j weight_j * z_j`` for one parameter; at most two parameter-sized tensors live at once."""
    (seed, weight), *rest = terms
    total = direction(param, seed, index).mul_(weight)
    for seed, weight in rest:
        total.add_(direction(param, seed, index), alpha=weight)
    return total


def momentum_window(momentum: float, tol: float) -> int:
    """Number of past steps whose seeds are replayed so that the dropped weight is ``<= tol``."""
    if momentum == 0.0:
        return 1
    return max(1, math.ceil(math.log(tol) / math.log(momentum)))


class SGDRule:
    """ZO-SGD, optional sign and seed-replayed momentum; no state tensors."""

    def __init__(self, momentum: float = 0.0, sign: bool = False, window: int = 1):
        self.momentum = momentum
        self.sign = sign
        self.window = window

    def plan_terms(self, window_records: list[dict]) -> tuple[tuple[int, float], ...]:
        """(seed, weight) over the window, newest record last: weight = beta^age * projected gradient."""
        terms = []
        newest = len(window_records) - 1
        for position, record in enumerate(window_records):
            decay = self.momentum ** (newest - position) if self.momentum else 1.0
            for seed, grad in zip(record["seeds"].tolist(), record["grads"].tolist()):
                terms.append((int(seed), decay * grad))
        return tuple(terms)

    def apply_(self, param: torch.Tensor, index: int, plan: Plan, group: int, state: dict) -> None:
        lr, weight_decay = plan.lrs[group], plan.weight_decays[group]
        update = combined_direction(param, index, plan.terms)
        if self.sign:
            update.sign_()
        if weight_decay:
            param.mul_(1.0 - lr * weight_decay)
        param.add_(update, alpha=-lr)


class AdamRule:
    """Adam on the ZO gradient estimate; moments are full-size tensors (state kept per parameter)."""

    window = 1

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8):
        self.betas = betas
        self.adam_eps = adam_eps

    def plan_terms(self, window_records: list[dict]) -> tuple[tuple[int, float], ...]:
        record = window_records[-1]
        return tuple((int(s), float(g)) for s, g in zip(record["seeds"].tolist(), record["grads"].tolist()))

    def apply_(self, param: torch.Tensor, index: int, plan: Plan, group: int, state: dict) -> None:
        from scrimp.optim.functional import adam_direction_

        lr, weight_decay = plan.lrs[group], plan.weight_decays[group]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        grad = combined_direction(param, index, plan.terms)
        beta1, beta2 = self.betas
        update = adam_direction_(
            grad, state["exp_avg"], state["exp_avg_sq"], step=plan.step, beta1=beta1, beta2=beta2,
            eps=self.adam_eps,
        )
        if weight_decay:
            param.mul_(1.0 - lr * weight_decay)
        param.add_(update, alpha=-lr)
