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
RESIDUAL_RULES = (None, "sign_sgd", "sgd", "scaled")


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
    if _fused_adamw_ok([exp_avg], [grad], 1.0, ([exp_avg_sq],)) and exp_avg_sq.dtype == exp_avg.dtype:
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
    overlap = P_new.t().to(exp_avg.dtype) @ P_old.to(exp_avg.dtype)
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


def residual_update(
    res: Tensor, rule: str | None, *, low_rank_grad: Tensor | None = None, direction: Tensor | None = None
) -> Tensor | None:
    """The state-free update direction for the residual ``res`` under ``rule`` (None: no update).

    "sign_sgd" and "sgd" follow FRUGAL; "scaled" multiplies the residual by the norm ratio
    ``||N|| / ||R||`` of the Adam direction to the raw low-rank gradient, the idea of Fira
    (Chen et al., 2024, arXiv:2410.01623) and APOLLO (Zhu et al., 2024): the residual inherits the
    adaptive step size that Adam chose in the subspace. Clean-room, per-matrix norms.
    """
    if rule is None:
        return None
    if rule == "sign_sgd":
        return torch.sign(res)
    if rule == "sgd":
        return res
    if rule == "scaled":
        if low_rank_grad is None or direction is None:
            raise ValueError("residual rule 'scaled' needs low_rank_grad and direction")
        return res * norm_ratio(direction, low_rank_grad)
    raise ValueError(f"residual rule must be one of {RESIDUAL_RULES}, got {rule!r}")


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


def low_rank_adam_(
    W: Tensor,
    R: Tensor,
    P: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    side: str,
) -> Tensor:
    """Adam on low-rank coordinates ``R`` (already projected), decay, back-projection into ``W``; returns N.

    The shared core of ``projected_adam_step_torch`` and of layer-wise accumulation, which sums
    projected gradients ``R`` over micro-batches (P is fixed inside an accumulation window).
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    N = adam_direction_(R, exp_avg, exp_avg_sq, step=step, beta1=beta1, beta2=beta2, eps=eps)
    with working_copy(W) as Wk:
        decay_(Wk, lr=lr, weight_decay=weight_decay)
        work = P.dtype
        if Wk.dtype == work:
            # addmm_ writes into W without a full-size temporary for the update.
            if side == "left":
                Wk.addmm_(P, N.to(work), alpha=-lr * scale)
            else:
                Wk.addmm_(N.to(work), P.t(), alpha=-lr * scale)
        else:
            apply_update_(Wk, back_project(N.to(work), P, side), -lr * scale)
    return N


def projected_adam_step_torch(
    W: Tensor,
    G: Tensor,
    P: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    side: str,
    residual: str | None = None,
    residual_lr_scale: float = 1.0,
) -> None:
    """One GaLore/FRUGAL step for a 2-D weight with a dense projector, in place on ``W`` and the moments.

    side "left": P (m, r), R = P^T G, moments (r, n), U = P N. side "right": P (n, r), R = G P,
    moments (m, r), U = N P^T. Then ``W <- W (1 - lr wd) - lr scale U`` and, for a residual rule,
    ``W <- W - lr residual_lr_scale rule(G - back(R))``. Math in fp32 when W is bf16/fp16.
    This is the torch reference that ``scrimp.optim.kernels.projected_adam_step`` must match.
    """
    if residual not in RESIDUAL_RULES:
        raise ValueError(f"residual must be one of {RESIDUAL_RULES}, got {residual!r}")
    G_w = G if G.dtype == P.dtype else G.to(P.dtype)
    R = project(G_w, P, side)
    with working_copy(W) as Wk:
        N = low_rank_adam_(Wk, R, P, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                           weight_decay=weight_decay, scale=scale, side=side)
        if residual is not None:
            res = subspace_residual(G_w, P, side, R=R)
            update = residual_update(res, residual, low_rank_grad=R, direction=N)
            apply_update_(Wk, update, -lr * residual_lr_scale)


def coordinate_adam_step_torch(
    W: Tensor,
    G: Tensor | None,
    index: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    dim: int | None,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    residual: str | None = None,
    residual_lr_scale: float = 1.0,
    R: Tensor | None = None,
) -> None:
    """The projected step when the projector selects coordinates (FRUGAL's RandK / rows / columns).

    ``dim=0``: rows ``index`` of G are the subspace (moments (r, n)); ``dim=1``: columns (moments
    (m, r)); ``dim=None``: flat entries (moments (k,)). The selection matrix is orthonormal, so this
    equals ``projected_adam_step_torch`` with the corresponding 0/1 matrix, without building it.
    ``R`` (the selected coordinates, e.g. accumulated) may replace ``G`` when there is no residual.
    """
    if residual not in RESIDUAL_RULES:
        raise ValueError(f"residual must be one of {RESIDUAL_RULES}, got {residual!r}")
    flat = dim is None
    d = 0 if flat else dim
    G_v = None if G is None else (G.reshape(-1) if flat else G)
    if R is None:
        R = G_v.index_select(d, index)
    if R.dtype != exp_avg.dtype:
        R = R.to(exp_avg.dtype)
    N = adam_direction_(R, exp_avg, exp_avg_sq, step=step, beta1=beta1, beta2=beta2, eps=eps)
    if weight_decay == 0.0 and residual is None and W.dtype != N.dtype:
        # Only the selected coordinates change: round just those, not a full-size copy of W.
        W_v = W.view(-1) if flat else W
        rows = W_v.index_select(d, index).to(update_dtype(W)).add_(N, alpha=-lr * scale)
        W_v.index_copy_(d, index.long(), rows.to(W.dtype))  # index_copy_ needs int64; projectors keep int32
        return
    with working_copy(W) as Wk:
        W_v = Wk.view(-1) if flat else Wk
        decay_(Wk, lr=lr, weight_decay=weight_decay)
        if residual is not None:
            res = G_v.to(N.dtype).index_fill(d, index.long(), 0.0)
            update = residual_update(res, residual, low_rank_grad=R, direction=N)
            apply_update_(W_v, update, -lr * residual_lr_scale)
        if W_v.dtype == N.dtype:
            W_v.index_add_(d, index, N, alpha=-lr * scale)
        else:
            W_v.index_add_(d, index, N.to(W_v.dtype), alpha=-lr * scale)


def residual_only_step_torch(
    W: Tensor, G: Tensor, *, lr: float, weight_decay: float, rule: str | None, residual_lr_scale: float = 1.0
) -> None:
    """The step of a parameter with no active subspace (FRUGAL's inactive blocks / density 0).

    ``W <- W (1 - lr wd) - lr residual_lr_scale rule(G)`` with rule "sign_sgd" (signSGD, Bernstein
    et al., 2018), "sgd", or None (only decay). "scaled" has no subspace to borrow a scale from
    and acts as "sgd" here.
    """
    if rule not in RESIDUAL_RULES:
        raise ValueError(f"rule must be one of {RESIDUAL_RULES}, got {rule!r}")
    if rule is None and weight_decay == 0.0:
        return
    with working_copy(W) as Wk:
        decay_(Wk, lr=lr, weight_decay=weight_decay)
        if rule is not None:
            apply_update_(Wk, torch.sign(G) if rule == "sign_sgd" else G, -lr * residual_lr_scale)


def _step_tensor(step: int, device: torch.device) -> Tensor:
    """The step count as ``torch._fused_adamw_`` wants it: on the tensors' device (CUDA's kernel refuses a
    CPU one), made by a fill kernel rather than a host-to-device copy that would wait for the stream."""
    return torch.full((), float(step), dtype=torch.float32, device=device)


def _fused_adamw_ok(params: Sequence[Tensor], grads: Sequence[Tensor], scale: float,
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
    if not params:
        return
    low = [i for i, p in enumerate(params) if p.dtype != exp_avgs[i].dtype]
    if low:
        for i in low:
            N = adam_direction_(grads[i], exp_avgs[i], exp_avg_sqs[i], step=step, beta1=beta1, beta2=beta2,
                                eps=eps)
            with working_copy(params[i]) as W:
                decay_(W, lr=lr, weight_decay=weight_decay)
                apply_update_(W, N, -lr * scale)
        keep = [i for i in range(len(params)) if i not in set(low)]
        params, grads = [params[i] for i in keep], [grads[i] for i in keep]
        exp_avgs, exp_avg_sqs = [exp_avgs[i] for i in keep], [exp_avg_sqs[i] for i in keep]
        if not params:
            return
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    if _fused_adamw_ok(params, grads, scale, (exp_avgs, exp_avg_sqs)):
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
