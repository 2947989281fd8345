"""Pure update math shared by every optimizer path (torch, fused kernels, offload).

One function per piece of math, no optimizer state, no Python objects beyond tensors and numbers
(the pattern of torchao's ``single_param_adam``). The Adam formula is the one of galore-torch and
HuggingFace ``transformers.AdamW`` (Loshchilov & Hutter, 2019, "Decoupled Weight Decay
Regularization"; Zhao et al., 2024, "GaLore", arXiv:2403.03507):

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    N = m / (sqrt(v) + eps) * sqrt(1 - b2^t) / (1 - b1^t)

The projected step is GaLore's chain (project, Adam in the subspace, project back) plus FRUGAL's
state-free residual rule on ``G - back(project(G))`` (Zmushko et al., 2025, "FRUGAL",
arXiv:2411.07837). Weight decay is decoupled and applied first, in the full space, as
``torch.optim.AdamW`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

SIDES = ("left", "right")


EPS_STYLES = ("hf", "torch")


def hf_eps(eps: float, step: int, beta2: float, eps_style: str) -> float:
    """The eps this module's (HF) formula needs at ``step`` to give Adam with ``eps_style``.

    ``"hf"`` adds eps to sqrt(v), before the bias correction: galore-torch's ``GaLoreAdamW`` and
    HuggingFace ``transformers.AdamW``. ``"torch"`` adds it to the bias-corrected sqrt(v / (1 - b2^t)):
    ``torch.optim.AdamW``, bitsandbytes (so galore-torch's ``GaLoreAdamW8bit``) and FRUGAL's AdamW.
    The two agree once m and v are large against eps; they differ on small gradients and in the
    first steps after a moment reset, where (1 - b2^t) is small. Since
    m_hat / (sqrt(v_hat) + eps) = m / (sqrt(v) + eps * sqrt(1 - b2^t)) * sqrt(1 - b2^t) / (1 - b1^t),
    the torch style is the HF formula with eps scaled by sqrt(1 - b2^t); every path (torch, offload,
    kernels) then keeps one formula.
    """
    if eps_style == "hf":
        return eps
    if eps_style == "torch":
        return eps * math.sqrt(1.0 - beta2**step)
    raise ValueError(f"eps_style must be one of {EPS_STYLES}, got {eps_style!r}")


def bias_correction(step: int, beta1: float, beta2: float) -> float:
    """The factor ``sqrt(1 - b2^t) / (1 - b1^t)`` of HF/galore-torch Adam at (1-based) step ``t``."""
    return math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_direction_(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """Update the Adam moments in place and return the bias-corrected normalized direction.

    ``exp_avg``/``exp_avg_sq`` are updated as in Kingma & Ba (2015); the returned direction is
    ``exp_avg / (sqrt(exp_avg_sq) + eps) * sqrt(1 - b2^step) / (1 - b1^step)`` (galore-torch / HF
    formula). ``grad`` is cast to the moments' dtype, so fp32 moments work with bf16 gradients.
    """
    if grad.dtype != exp_avg.dtype:
        grad = grad.to(exp_avg.dtype)
    if fused_adamw_ok([exp_avg], [grad], 1.0, ([exp_avg_sq],)) and exp_avg_sq.dtype == exp_avg.dtype:
        # One pass instead of eight: torch's fused AdamW kernel on a zero "parameter" with lr 1
        # leaves -N in it (its eps' = eps / sqrt(1 - b2^t) makes its formula equal this one).
        out = torch.zeros_like(exp_avg)
        torch._fused_adamw_([out], [grad], [exp_avg], [exp_avg_sq], [], [_step_tensor(step, exp_avg.device)], lr=1.0,
                            beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps / math.sqrt(1.0 - beta2**step),
                            amsgrad=False, maximize=False)
        return out.neg_()
    return adam_direction_reference_(grad, exp_avg, exp_avg_sq, step=step, beta1=beta1, beta2=beta2, eps=eps)


def adam_direction_reference_(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    """``adam_direction_`` written out op by op (any dtype/device; the formula of the module doc)."""
    if grad.dtype != exp_avg.dtype:
        grad = grad.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    return torch.div(exp_avg, denom).mul_(bias_correction(step, beta1, beta2))


def project(G: Tensor, P: Tensor, side: str) -> Tensor:
    """Low-rank coordinates of ``G``: ``P^T G`` (side "left", P is (m, r)) or ``G P`` ("right", P is (n, r))."""
    if side == "left":
        return P.t() @ G
    if side == "right":
        return G @ P
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def back_project(R: Tensor, P: Tensor, side: str) -> Tensor:
    """Map low-rank coordinates back to the full space: ``P R`` (left) or ``R P^T`` (right)."""
    if side == "left":
        return P @ R
    if side == "right":
        return R @ P.t()
    raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def subspace_residual(G: Tensor, P: Tensor, side: str, R: Tensor | None = None) -> Tensor:
    """The part of ``G`` outside the subspace: ``G - back_project(project(G))``; reuses ``R`` if given."""
    if R is None:
        R = project(G, P, side)
    if side == "left":
        return torch.addmm(G, P, R, alpha=-1.0)
    return torch.addmm(G, R, P.t(), alpha=-1.0)


def basis_overlap(P_new: Tensor, P_old: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``P_new^T P_old`` (r x r) in ``dtype``: how the old subspace's directions read in the new basis."""
    return P_new.t().to(dtype) @ P_old.to(dtype)


def rotate_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, P_new: Tensor, P_old: Tensor, side: str) -> None:
    """Carry Adam's moments from the subspace of ``P_old`` into that of ``P_new``, in place.

    With the overlap O = P_new^T P_old (r x r), the first moment rotates exactly: it is a linear
    average of projected gradients, and P_new^T G = O P_old^T G for G inside the old subspace, so
    m <- O m (left; m O^T on the right side). The second moment is an average of squares and must
    stay non-negative, so it goes through the squared overlap, v <- (O * O) v: that is the variance
    of the rotated coordinates when the old ones are independent with variances v (each new
    coordinate is sum_j O_ij r_j), it never goes negative, and it is exact when the bases agree up
    to a permutation (and signs). Directions new to the subspace start from the part of the old
    moments they overlap, and from 0 where they overlap nothing, as a reset would.
    """
    rotate_moments_by_overlap_(exp_avg, exp_avg_sq, basis_overlap(P_new, P_old, exp_avg.dtype), side)


def rotate_moments_by_overlap_(exp_avg: Tensor, exp_avg_sq: Tensor, overlap: Tensor, side: str) -> None:
    """``rotate_moments_`` given the overlap ``O = P_new^T P_old``: m through O, v through O * O."""
    squared = overlap * overlap
    if side == "left":  # moments are (r, n): coordinates along rows
        exp_avg.copy_(overlap @ exp_avg)
        exp_avg_sq.copy_(squared @ exp_avg_sq)
    else:  # (m, r): coordinates along columns
        exp_avg.copy_(exp_avg @ overlap.t())
        exp_avg_sq.copy_(exp_avg_sq @ squared.t())


def norm_ratio(direction: Tensor, low_rank_grad: Tensor) -> Tensor:
    """``||direction|| / ||low_rank_grad||`` over the whole matrices (0 when the gradient is 0), a 0-d fp32 tensor.

    Kept on the tensors' device, so the step never waits on the host; the fused kernels use it too.
    """
    g_norm = torch.linalg.vector_norm(low_rank_grad.float())
    ratio = torch.linalg.vector_norm(direction.float()) / g_norm
    return torch.where(g_norm > 0, ratio, torch.zeros_like(ratio))


def residual_rule(name: str, what: str = "residual"):
    """The registered residual rule called ``name`` (``scrimp.optim.rules.registry``); else one ValueError
    that calls the argument ``what``."""
    from .rules.registry import RESIDUAL_RULES  # here, not at the top: the rules' modules import this one

    rule = RESIDUAL_RULES.get(name)
    if rule is None:
        raise ValueError(f"{what} must be one of {(None, *sorted(RESIDUAL_RULES))}, got {name!r}")
    return rule


def step_hyper(hp, kwargs: dict):
    """The ``StepHyper`` of a call that passed ``hp`` and/or the older keyword arguments (``StepHyper.of``)."""
    from .rules.base import StepHyper  # here, not at the top: the rules' modules import this one

    return StepHyper.of(hp, kwargs)


def residual_update(
    res: Tensor, rule: str | None, *, low_rank_grad: Tensor | None = None, direction: Tensor | None = None
) -> Tensor | None:
    """The state-free update direction for the residual ``res`` under the registered ``rule`` (None: no update).

    The rules live in ``scrimp.optim.rules.residual`` ("sign_sgd" and "sgd" of FRUGAL, the norm-ratio
    "scaled" of Fira/APOLLO) or wherever a new one registers itself.
    """
    if rule is None:
        return None
    return residual_rule(rule, "residual rule").update(res, low_rank_grad, direction)


def update_dtype(W: Tensor) -> torch.dtype:
    """The precision of the arithmetic on W: fp32 for bf16/fp16 weights, and never below W's own
    (an fp64 weight rounded through fp32 at every step would lose its extra precision)."""
    return torch.promote_types(W.dtype, torch.float32)


@contextmanager
def working_copy(W: Tensor) -> Iterator[Tensor]:
    """W itself, or for a bf16/fp16 weight an ``update_dtype`` copy written back to W once at the end.

    A step's decay, update and residual then round W to its dtype once, as the fused kernels do,
    rather than once per term. If the body raises, W is left as it was.
    """
    if update_dtype(W) == W.dtype:
        yield W
        return
    work = W.to(update_dtype(W))
    yield work
    W.copy_(work)


def apply_update_(W: Tensor, update: Tensor, alpha: float) -> None:
    """``W += alpha * update`` with the arithmetic in ``update_dtype(W)``, W kept in its dtype."""
    if W.dtype == update.dtype:
        W.add_(update, alpha=alpha)
    elif update_dtype(W) == W.dtype:
        W.add_(update.to(W.dtype), alpha=alpha)
    else:
        W.copy_(W.to(update_dtype(W)).add_(update, alpha=alpha))


def decay_(W: Tensor, *, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay ``W <- W (1 - lr wd)``, applied first as in ``torch.optim.AdamW``."""
    if weight_decay != 0.0:
        W.mul_(1.0 - lr * weight_decay)


def back_project_add_(W: Tensor, N: Tensor, P: Tensor, side: str, alpha: float) -> None:
    """``W += alpha * back_project(N, P)``, without a full-size temporary where W has P's dtype (addmm_)."""
    work = P.dtype
    if W.dtype != work:
        apply_update_(W, back_project(N.to(work), P, side), alpha)
    elif side == "left":
        W.addmm_(P, N.to(work), alpha=alpha)
    else:
        W.addmm_(N.to(work), P.t(), alpha=alpha)


def write_dense_step_(W: Tensor, N: Tensor, P: Tensor, hp, residual: Tensor | None = None) -> None:
    """``W <- W (1 - lr wd) - lr scale P N (or N P^T) - lr residual_lr_scale residual``, rounded to W's dtype once."""
    with working_copy(W) as Wk:
        decay_(Wk, lr=hp.lr, weight_decay=hp.weight_decay)
        back_project_add_(Wk, N, P, hp.side, -hp.lr * hp.scale)
        if residual is not None:
            apply_update_(Wk, residual, -hp.lr * hp.residual_lr_scale)


def write_full_step_(W: Tensor, U: Tensor, hp, residual: Tensor | None = None) -> None:
    """``W <- W (1 - lr wd) - lr scale U - lr residual_lr_scale residual`` for a full-size update U."""
    with working_copy(W) as Wk:
        decay_(Wk, lr=hp.lr, weight_decay=hp.weight_decay)
        apply_update_(Wk, U, -hp.lr * hp.scale)
        if residual is not None:
            apply_update_(Wk, residual, -hp.lr * hp.residual_lr_scale)


def coordinate_view(T: Tensor, dim: int | None) -> tuple[Tensor, int]:
    """``T`` as the selection sees it (flat for ``dim=None``) and the dimension the index runs along."""
    return (T.view(-1), 0) if dim is None else (T, dim)


def select_coordinates(G: Tensor, index: Tensor, dim: int | None) -> Tensor:
    """The selected rows (dim 0), columns (dim 1) or flat entries (None) of G: R for a coordinate projector."""
    G_v, d = coordinate_view(G.reshape(-1) if dim is None else G, dim)
    return G_v.index_select(d, index)


def coordinate_residual(G: Tensor, index: Tensor, dim: int | None, dtype: torch.dtype) -> Tensor:
    """G with the selected coordinates zeroed (in ``dtype``, shaped as the selection sees G)."""
    G_v, d = coordinate_view(G.reshape(-1) if dim is None else G, dim)
    return G_v.to(dtype).index_fill(d, index.long(), 0.0)


def write_coordinate_step_(W: Tensor, N: Tensor, index: Tensor, dim: int | None, hp,
                           residual: Tensor | None = None) -> None:
    """``W <- W (1 - lr wd) - lr residual_lr_scale residual``, then ``- lr scale N`` at the selected coordinates."""
    if hp.weight_decay == 0.0 and residual is None and W.dtype != N.dtype:
        # Only the selected coordinates change: round just those, not a full-size copy of W.
        W_v, d = coordinate_view(W, dim)
        rows = W_v.index_select(d, index).to(update_dtype(W)).add_(N, alpha=-hp.lr * hp.scale)
        W_v.index_copy_(d, index.long(), rows.to(W.dtype))  # index_copy_ needs int64; projectors keep int32
        return
    with working_copy(W) as Wk:
        W_v, d = coordinate_view(Wk, dim)
        decay_(Wk, lr=hp.lr, weight_decay=hp.weight_decay)
        if residual is not None:
            apply_update_(W_v, residual, -hp.lr * hp.residual_lr_scale)
        W_v.index_add_(d, index, N if W_v.dtype == N.dtype else N.to(W_v.dtype), alpha=-hp.lr * hp.scale)


def write_residual_only_(W: Tensor, update: Tensor | None, *, lr: float, weight_decay: float,
                         residual_lr_scale: float) -> None:
    """``W <- W (1 - lr wd) - lr residual_lr_scale update``: a parameter with no active subspace."""
    if update is None and weight_decay == 0.0:
        return
    with working_copy(W) as Wk:
        decay_(Wk, lr=lr, weight_decay=weight_decay)
        if update is not None:
            apply_update_(Wk, update, -lr * residual_lr_scale)


def adam_direction_hp_(R: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, hp) -> Tensor:
    """``adam_direction_`` with the numbers of a ``StepHyper``."""
    return adam_direction_(R, exp_avg, exp_avg_sq, step=hp.step, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps)


def projected_adam_step_torch(W: Tensor, G: Tensor, P: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, hp=None,
                              **kwargs) -> None:
    """One GaLore/FRUGAL step for a 2-D weight with a dense projector, in place on ``W`` and the moments.

    ``hp`` is a ``rules.base.StepHyper`` (or its fields as keywords: step, lr, beta1, beta2, eps,
    weight_decay, scale, side, residual, residual_lr_scale). side "left": P (m, r), R = P^T G,
    moments (r, n), U = P N. side "right": P (n, r), R = G P, moments (m, r), U = N P^T. Then
    ``W <- W (1 - lr wd) - lr scale U`` and, for a residual rule, ``W <- W - lr residual_lr_scale
    rule(G - back(R))``. Math in fp32 when W is bf16/fp16. This is the torch reference that
    ``scrimp.optim.kernels.projected_adam_step`` must match.
    """
    hp = step_hyper(hp, kwargs)
    rule = None if hp.residual is None else residual_rule(hp.residual)
    G_w = G if G.dtype == P.dtype else G.to(P.dtype)
    R = project(G_w, P, hp.side)
    N = adam_direction_hp_(R, exp_avg, exp_avg_sq, hp)
    update = None if rule is None else rule.update(subspace_residual(G_w, P, hp.side, R=R), R, N)
    write_dense_step_(W, N, P, hp, update)


def coordinate_adam_step_torch(W: Tensor, G: Tensor | None, index: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                               hp=None, *, dim: int | None, R: Tensor | None = None, **kwargs) -> None:
    """The projected step when the projector selects coordinates (FRUGAL's RandK / rows / columns).

    ``dim=0``: rows ``index`` of G are the subspace (moments (r, n)); ``dim=1``: columns (moments
    (m, r)); ``dim=None``: flat entries (moments (k,)). The selection matrix is orthonormal, so this
    equals ``projected_adam_step_torch`` with the corresponding 0/1 matrix, without building it.
    ``R`` (the selected coordinates, e.g. accumulated) may replace ``G`` when there is no residual.
    ``hp`` as in ``projected_adam_step_torch`` (``side`` is unused).
    """
    hp = step_hyper(hp, kwargs)
    rule = None if hp.residual is None else residual_rule(hp.residual)
    R = select_coordinates(G, index, dim) if R is None else R
    R = R if R.dtype == exp_avg.dtype else R.to(exp_avg.dtype)
    N = adam_direction_hp_(R, exp_avg, exp_avg_sq, hp)
    update = None if rule is None else rule.update(coordinate_residual(G, index, dim, N.dtype), R, N)
    write_coordinate_step_(W, N, index, dim, hp, update)


def _step_tensor(step: int, device: torch.device) -> Tensor:
    """The step count as ``torch._fused_adamw_`` wants it: on the tensors' device (CUDA's kernel refuses a
    CPU one), made by a fill kernel rather than a host-to-device copy that would wait for the stream."""
    return torch.full((), float(step), dtype=torch.float32, device=device)


def fused_adamw_ok(params: Sequence[Tensor], grads: Sequence[Tensor], scale: float,
                    moments: Sequence[Sequence[Tensor]] = ()) -> bool:
    """Whether torch's fused AdamW kernel computes the right thing for these lists.

    The kernel pairs elements by memory position, not by index, so every tensor of one parameter
    (parameter, gradient, moments) must share one memory layout: a channels_last weight with
    contiguous moments, or a hand-set transposed gradient, takes the foreach path instead.
    """
    if scale != 1.0 or not hasattr(torch, "_fused_adamw_"):
        return False
    first = params[0]
    if first.device.type not in ("cpu", "cuda") or first.dtype != torch.float32:
        return False
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.dtype != first.dtype or p.dtype != first.dtype or p.device != first.device or g.is_sparse:
            return False
        if g.stride() != p.stride() or any(m[i].stride() != p.stride() for m in moments):
            return False
    return True


def _step_low_precision_alone(params, grads, exp_avgs, exp_avg_sqs, hyper: dict) -> tuple[list, list, list, list]:
    """Step the parameters whose dtype differs from their moments' (bf16 weights, fp32 moments) one by one;
    return the lists of the others."""
    low = {i for i, p in enumerate(params) if p.dtype != exp_avgs[i].dtype}
    h = hyper
    for i in sorted(low):
        N = adam_direction_(grads[i], exp_avgs[i], exp_avg_sqs[i], step=h["step"], beta1=h["beta1"],
                            beta2=h["beta2"], eps=h["eps"])
        with working_copy(params[i]) as W:
            decay_(W, lr=h["lr"], weight_decay=h["weight_decay"])
            apply_update_(W, N, -h["lr"] * h["scale"])
    keep = [i for i in range(len(params)) if i not in low]
    return ([params[i] for i in keep], [grads[i] for i in keep], [exp_avgs[i] for i in keep],
            [exp_avg_sqs[i] for i in keep])


def adam_step_foreach(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float = 1.0,
) -> None:
    """Plain AdamW on lists of same-step tensors: torch's fused kernel, else ``torch._foreach`` ops.

    Same formula as ``adam_direction_`` (HF/galore-torch), decoupled decay first. fp32 lists go
    through ``torch._fused_adamw_`` with a per-step eps that makes torch's formula equal HF's;
    otherwise foreach ops. Low-precision parameters keep fp32 moments and take the per-tensor path.
    """
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale)
    params, grads, exp_avgs, exp_avg_sqs = _step_low_precision_alone(params, grads, exp_avgs, exp_avg_sqs, hyper)
    if not params:
        return
    if fused_adamw_ok(params, grads, scale, (exp_avgs, exp_avg_sqs)):
        # torch's one-pass AdamW kernel computes m_hat / (sqrt(v_hat) + eps'); with
        # eps' = eps / sqrt(1 - b2^t) that is exactly the HF formula above (up to rounding).
        steps = [_step_tensor(step, p.device) for p in params]
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps / math.sqrt(1.0 - beta2**step), amsgrad=False,
                            maximize=False)
        return
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr * scale * bias_correction(step, beta1, beta2))
