"""SGD with momentum as the state-full inner rule: FRUGAL's ``frugal/sgd.py`` (Zmushko et al., 2025,
"FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training",
arXiv:2411.07837; github.com/philipzmushko/FRUGAL), written from the paper and that code.

On the projected gradient R, with momentum mu, dampening d:

    buf <- mu buf + (1 - d) R          (skipped when mu = 0: no state at all)
    N = R + mu buf  (nesterov)  or  buf,   then N <- sign(N) when sign_update

One quirk of the authors' code is kept on purpose, for parity: at each (re)start of the state
(the first step, and each refresh with ``reset_statistics``) FRUGAL fills the buffer with the
projected gradient itself (``_example_state_init=True``) and then applies the rule above, so that
first step's buffer is (1 + mu - d) R, where ``torch.optim.SGD`` starts it at R.

Weight decay stays the engine's decoupled ``W (1 - lr wd)``: FRUGAL's projected optimizers apply it
that way too (``ProjOptimizer.step``), not as torch SGD's L2 term. Its training script passes
``momentum = beta1 = 0.9``; the rule's default is that value.

The buffer is a linear average of projected gradients, so it crosses a refresh exactly by the
overlap of the bases (``rotate_coordinates_``), like Adam's first moment.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from scrimp.checks import check_number

from .base import InnerRule, MomentSpec, StepHyper
from .registry import register_inner


def rotate_coordinates_(state: Tensor, overlap: Tensor, side: str) -> None:
    """Carry R-shaped state (or a stack of R-shaped slices) into a new basis, in place.

    ``overlap`` is ``P_new^T P_old`` (r x r). A linear average of projected gradients rotates exactly:
    ``P_new^T G = overlap P_old^T G`` for G inside the old subspace, so the state becomes
    ``overlap @ state`` on the left side (coordinates along rows) and ``state @ overlap^T`` on the
    right (along columns); both broadcast over a leading history axis (Natural GaLore's).
    """
    overlap = overlap.to(state.dtype)
    if side == "left":
        state.copy_(overlap @ state)
    elif side == "right":
        state.copy_(state @ overlap.t())
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def momentum_buffer_(grad: Tensor, buf: Tensor, *, momentum: float, dampening: float, first: bool) -> Tensor:
    """``buf <- momentum buf + (1 - dampening) grad`` in place; on the ``first`` step after a (re)start
    the buffer is first filled with ``grad``, as FRUGAL's state init does (see module doc)."""
    if grad.dtype != buf.dtype:
        grad = grad.to(buf.dtype)
    if first:
        buf.copy_(grad)
    return buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)


def sgd_direction_(grad: Tensor, buf: Tensor | None, *, momentum: float, dampening: float, nesterov: bool,
                   sign_update: bool, first: bool) -> Tensor:
    """FRUGAL's SGD direction (``SGD._compute_update`` without the ``-lr``), as a new tensor.

    ``buf`` is None when ``momentum`` is 0 (plain SGD keeps no state).
    """
    if buf is None:
        direction = grad.clone()
    else:
        averaged = momentum_buffer_(grad, buf, momentum=momentum, dampening=dampening, first=first)
        direction = grad.to(buf.dtype).add(averaged, alpha=momentum) if nesterov else averaged.clone()
    return direction.sign_() if sign_update else direction


@register_inner
class SGDMomentumRule(InnerRule):
    """SGD with (heavy-ball or Nesterov) momentum on R: FRUGAL's SGD as the state-full rule.

    Group keys: ``momentum`` (default 0.9; 0 keeps no state), ``dampening`` (0), ``nesterov`` (False;
    needs momentum > 0 and dampening 0, as torch and FRUGAL require), ``sign_update`` (False: True takes
    the sign of the direction, signSGD with momentum).
    """

    name = "sgd"
    rotatable = True
    group_keys: ClassVar[dict[str, object]] = {"momentum": 0.9, "dampening": 0.0, "nesterov": False,
                                               "sign_update": False}

    def __init__(self, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False,
                 sign_update: bool = False):
        self.momentum = check_number("momentum", momentum, low=0.0, high=1.0)
        self.dampening = check_number("dampening", dampening, low=0.0, high=1.0)
        for key, flag in (("nesterov", nesterov), ("sign_update", sign_update)):
            if not isinstance(flag, bool):
                raise ValueError(f"{key} must be True or False, got {flag!r}")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(f"nesterov=True needs momentum > 0 and dampening 0, got momentum={momentum!r}, "
                             f"dampening={dampening!r}")
        self.nesterov, self.sign_update = nesterov, sign_update

    def moment_specs(self) -> tuple[MomentSpec, ...]:
        return (MomentSpec("momentum_buffer", signed=True),) if self.momentum else ()

    def direction(self, R: Tensor, moments: dict[str, Tensor], hp: StepHyper) -> Tensor:
        return sgd_direction_(R, moments.get("momentum_buffer"), momentum=self.momentum, dampening=self.dampening,
                              nesterov=self.nesterov, sign_update=self.sign_update, first=hp.step == 1)

    def rotate(self, moments: dict[str, Tensor], overlap: Tensor, side: str) -> None:
        if "momentum_buffer" in moments:
            rotate_coordinates_(moments["momentum_buffer"], overlap, side)

