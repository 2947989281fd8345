"""Natural GaLore's inner rule: the inverse empirical Fisher of the last s projected gradients,
then Adam (Das, 2024, "Natural GaLore: Accelerating GaLore for memory-efficient LLM training and
fine-tuning", arXiv:2410.16029; github.com/selfsupervised-ai/Natural-GaLore,
``code/natural_galore/galore_projector_tensor.py``), written from the paper and that code.

With g = vec(R) and G = [g_t, g_{t-1}, ..., g_{t-s+1}] (k x s; the history holds the current
gradient too, as the authors' code appends it before solving), the paper's Sec. 3 takes
F = lambda I + G G^T and feeds the natural gradient g~ = F^{-1} g to Adam in place of g:

    g~ = (1/lambda) g - (1/lambda^2) G (I + G^T G / lambda)^{-1} G^T g       (Woodbury)
    m, v <- Adam moments of g~;  N = m / (sqrt(v) + eps) * sqrt(1 - b2^t) / (1 - b1^t)

Defaults are the authors': s = ``natural_history`` = 20, lambda = ``natural_damping`` = 1e-3 (fixed in
their code), Adam's bias correction and eps added to sqrt(v) (the HF form). F has no 1/s factor:
the paper's eq. for the empirical Fisher averages over the history, but its Woodbury form and the
code do not; with the 1/s the rule is the same up to lambda -> s lambda, since Adam removes the
overall scale.

How it is computed (same value, better numbers): since g is a column of G, the push-through
identity (lambda I + G G^T)^{-1} G = G (lambda I + G^T G)^{-1} gives g~ = G c with
(lambda I + G^T G) c = e_t, one s x s Cholesky solve and no cancellation between the two terms of
the Woodbury form. The Gram matrix and the combination are taken in float64 (s^2 k flops on a
transient float64 copy of the history): consecutive gradients are nearly collinear, and the error of
the authors' float32 form grows like |g|^2 / lambda (measured: 1e-3 relative at |g|^2 = 1e3 lambda,
5e-2 at 1e5 lambda, no correct digit at 1e7 lambda, where its Cholesky can also fail), while this
stays at float32 rounding (about 3e-8 relative in all of those cases).

Slots of a history not yet full are zero, which adds nothing to G G^T, so a fixed stack of s slots
written round-robin is exactly the authors' growing-then-sliding list.

The Adam part is the ``adam`` rule itself (composed, not rewritten), so it also rotates m and v
across a refresh as that rule does; the history is linear in the projected gradients and rotates
exactly by the overlap of the bases, like m.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from scrimp.checks import check_integer, check_number

from .adam import ADAM_MOMENTS, AdamRule
from .base import InnerRule, MomentSpec, StepHyper
from .registry import register_inner
from .sgd import rotate_coordinates_


def history_slot(step: int, length: int) -> int:
    """The slot that step ``step`` (from 1) of a round-robin history of ``length`` slots overwrites: the oldest."""
    return (step - 1) % length


def _solve_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the s x s system is solved in float64 (module doc).
    return torch.float32 if device.type == "mps" else torch.float64


def natural_gradient(history: Tensor, slot: int, damping: float) -> Tensor:
    """``(damping I + G G^T)^{-1} g`` for the stack ``history`` (s, *shape) with columns G and g = ``history[slot]``.

    Returns a tensor of ``history[slot]``'s shape and dtype (see the module doc for the method).
    """
    flat = history.reshape(history.shape[0], -1).to(_solve_dtype(history.device))
    system = flat @ flat.t()
    system.diagonal().add_(damping)
    unit = torch.zeros(system.shape[0], 1, dtype=system.dtype, device=system.device)
    unit[slot] = 1.0
    factor, _ = torch.linalg.cholesky_ex(system)  # positive definite for damping > 0; _ex avoids a host sync
    weights = torch.cholesky_solve(unit, factor)
    return (weights.t() @ flat).reshape(history.shape[1:]).to(history.dtype)


@register_inner
class NaturalFisherRule(InnerRule):
    """Natural GaLore's step on R: the inverse empirical Fisher over ``natural_history`` projected
    gradients (damping ``natural_damping``), then Adam with the group's betas and eps."""

    name = "natural"
    rotatable = True
    group_keys: ClassVar[dict[str, object]] = {"natural_history": 20, "natural_damping": 1e-3}
    # The history stores raw projected gradients and lambda enters only each step's solve, so a resume may change it.
    resumable_keys: ClassVar[tuple[str, ...]] = ("natural_damping",)

    def __init__(self, natural_history: int = 20, natural_damping: float = 1e-3):
        self.history = check_integer("natural_history", natural_history, 1)
        self.damping = check_number("natural_damping", natural_damping, low=0.0, open_low=True)
        self.adam = AdamRule()

    def moment_specs(self) -> tuple[MomentSpec, ...]:
        # The history feeds a solve, so it stays fp32 (8-bit codes would perturb a near-singular Gram).
        return (*ADAM_MOMENTS, MomentSpec("grad_history", signed=True, quantizable=False, history=self.history))

    def direction(self, R: Tensor, moments: dict[str, Tensor], hp: StepHyper) -> Tensor:
        history = moments["grad_history"]
        slot = history_slot(hp.step, history.shape[0])
        history[slot].copy_(R)
        return self.adam.direction(natural_gradient(history, slot, self.damping), moments, hp)

    def rotate(self, moments: dict[str, Tensor], overlap: Tensor, side: str) -> None:
        self.adam.rotate(moments, overlap, side)
        rotate_coordinates_(moments["grad_history"], overlap, side)
