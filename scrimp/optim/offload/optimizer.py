"""``OffloadedOptimizer``: a scrimp engine whose inner-rule state lives in a tier (host memory or disk).

    from scrimp.optim import GaLoreAdamW, param_groups
    from scrimp.optim.offload import OffloadedOptimizer
    opt = OffloadedOptimizer(GaLoreAdamW(param_groups(model, rank=128)), tier="disk", path="/scratch/opt")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)   # a real torch.optim.Optimizer

Between steps the engine's state keeps only the projector's state and the counters (``proj_P``,
``step``, ...); the inner rule's moments (``exp_avg``, ``exp_avg_sq``, their 8-bit forms, Natural
GaLore's history) are in the tier. Each parameter steps through the engine's public stages, as
ZeRO-Offload (Ren et al., 2021) runs Adam on the host: ``begin`` (refresh, project), the *host
update* ``N = inner.direction(R, moments, hp)`` on the tier's tensors, ``finish`` (back-project,
residual, apply). A low-rank optimizer's host update reads only R and returns only N, which is why
offload suits it (issue 15). Plain (non-projected) groups step through the engine's own ``step()``
one parameter at a time, so they equal the engine's batched AdamW bitwise.

Not yet: CUDA parameters (pinned buffers, a copy stream), the streamed-state mode, a placement plan,
zeroth-order optimizers and the layer-wise wrapper; each is refused in one sentence.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..finite_guard import first_nonfinite
from ..layerwise import LayerwiseOptimizer
from ..moments import stored_keys
from ..state_check import describe
from ..subspace import SPARSE_GRADIENTS, ParamStep, SubspaceAdamW, is_projected_group
from ..zo import ZerothOrderOptimizer
from .tiers import CpuTier, DiskTier, Layout, layout_of, make_tier

__all__ = ["OffloadedOptimizer"]


def _refuse_unsupported(optimizer: Any) -> None:
    """One sentence for an optimizer this first slice cannot drive."""
    if isinstance(optimizer, ZerothOrderOptimizer):
        raise ValueError("OffloadedOptimizer does not take zeroth-order optimizers yet (they keep at most a momentum "
                         "buffer; scrimp.optim.offload.stream streams their parameters instead)")
    if isinstance(optimizer, LayerwiseOptimizer):
        raise ValueError("OffloadedOptimizer does not drive the layer-wise wrapper's backward hooks yet; wrap a "
                         "SubspaceAdamW that steps with step()")
    if not isinstance(optimizer, SubspaceAdamW):
        raise ValueError(f"optimizer must be a scrimp SubspaceAdamW (GaLoreAdamW, FrugalAdamW, ApolloAdamW, ...), "
                         f"got {type(optimizer).__name__}")


def moment_keys(optimizer: SubspaceAdamW, group: dict) -> tuple[str, ...]:
    """Every state key the group's inner rule may keep in the engine's store (fp32 or 8-bit forms)."""
    return tuple(key for spec in optimizer.parts(group).inner.moment_specs() for key in stored_keys(spec))


def moment_layout(optimizer: SubspaceAdamW, p: Tensor, group: dict) -> Layout:
    """The moments' layout for ``p``, as the group's store creates it (on ``meta``: no memory)."""
    parts = optimizer.parts(group)
    shape = optimizer.low_rank_shape(p, group)
    scratch: dict[str, Tensor] = {}
    parts.store.zeros(scratch, parts.inner.moment_specs(), tuple(p.shape) if shape is None else shape,
                      torch.device("meta"))
    return layout_of(scratch)


def host_update(optimizer: SubspaceAdamW, s: ParamStep) -> Tensor | None:
    """The inner rule on R and the moments where they are (the host): N, or None without a subspace this step."""
    if s.R is None:
        return None
    moments = optimizer.open_moments(s)
    N = s.parts.inner.direction(s.R, moments, s.hp)
    optimizer.close_moments(s, moments)
    return N


@contextmanager
def gradients_aside(params: list[Tensor]) -> Iterator[dict[Tensor, Tensor]]:
    """Take the gradients off ``params`` for the step and put them back after it, whatever happens."""
    saved = {p: p.grad for p in params if p.grad is not None}
    for p in saved:
        p.grad = None
    try:
        yield saved
    finally:
        for p, grad in saved.items():
            p.grad = grad


class OffloadedOptimizer(torch.optim.Optimizer):
    """A ``SubspaceAdamW`` (or subclass) whose moments live in ``tier``: "cpu" (host memory) or "disk"
    (files under ``path``, ``prefetch`` states read ahead; ``max_bytes`` caps the files).

    It shares the wrapped optimizer's ``param_groups``, ``state`` and ``defaults``, so LR schedulers
    work, and touches gradients only inside ``step()``, so ``clip_grad_norm_`` and accumulation work.
    ``state_dict()`` is the wrapped optimizer's format with the moments read back from the tier, so a
    plain optimizer loads it and it loads a plain optimizer's. ``close()`` releases a disk tier's path.
    """

    def __init__(self, optimizer: SubspaceAdamW, tier: str = "cpu", path: str | os.PathLike | None = None,
                 prefetch: int = 2, *, max_bytes: int | None = None) -> None:
        _refuse_unsupported(optimizer)
        _refuse_off_cpu(optimizer.param_groups)
        self.optimizer = optimizer
        self._adopting = True
        super().__init__(optimizer.param_groups, optimizer.defaults)  # hooks and step profiling; groups stay shared
        self._adopting = False
        self.tier: CpuTier | DiskTier = make_tier(tier, path, prefetch=prefetch, max_bytes=max_bytes)
        self._keys: dict[Tensor, int] = {}
        try:
            for group in self.param_groups:
                self._allocate(group)
            self._evict_all()  # an optimizer that already stepped hands its moments over
        except BaseException:
            self.tier.close()
            raise

    # -- shared with the wrapped optimizer --------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        if value:  # torch.optim.Optimizer.__init__ assigns an empty list; the groups are the wrapped optimizer's
            raise AttributeError("param_groups are the wrapped optimizer's; change them there or with add_param_group")

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @state.setter
    def state(self, value: dict) -> None:
        if value:  # as param_groups: only torch's empty initial state is ever assigned
            raise AttributeError("state is the wrapped optimizer's (the moments are in the tier); use load_state_dict")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer and preallocate its parameters' state in the tier."""
        if self._adopting:  # torch's __init__ offers the wrapped optimizer's own groups back
            return
        group = dict(param_group) if isinstance(param_group, dict) else {"params": param_group}
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)  # a generator is read once
        _refuse_off_cpu([group])
        self.optimizer.add_param_group(group)
        self._allocate(self.param_groups[-1])

    def _allocate(self, group: dict) -> None:
        for p in group["params"]:
            self._keys[p] = len(self._keys)
            self.tier.allocate(self._keys[p], moment_layout(self.optimizer, p, group))

    # -- stepping ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every parameter with a gradient, its moments loaded from the tier and stored back."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._refuse_bad_gradients()
        self.tier.plan([self._keys[p] for _, p in stepping])
        with gradients_aside([p for g in self.param_groups for p in g["params"]]) as grads:
            for group, p in stepping:
                self._step_one(p, group, grads[p])
        return loss

    def _step_one(self, p: Tensor, group: dict, grad: Tensor) -> None:
        """Admit the moments into the engine's state for this parameter's step only, then evict them."""
        loaded = self.tier.load(self._keys[p])
        if loaded:
            self.optimizer.state[p].update(loaded)
        try:
            if is_projected_group(group):
                s = self.optimizer.begin(p, group, grad)
                self.optimizer.finish(s, host_update(self.optimizer, s))
            else:
                self._plain_step(p, grad)
        finally:
            self._evict(p, group)

    def _plain_step(self, p: Tensor, grad: Tensor) -> None:
        """The engine's own AdamW for a plain parameter: ``step()`` with only this gradient set (the
        engine batches plain groups with foreach ops, which the stages do not reproduce bitwise)."""
        p.grad = grad
        try:
            self.optimizer.step()
        finally:
            p.grad = None

    def _evict(self, p: Tensor, group: dict) -> None:
        """Move the parameter's moments from the engine's state to the tier (``{}``: it has none now)."""
        state = self.optimizer.state.get(p, {})
        moved = {key: state.pop(key) for key in moment_keys(self.optimizer, group) if key in state}
        self.tier.store(self._keys[p], moved)

    def _evict_all(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self._evict(p, group)

    def _refuse_bad_gradients(self) -> None:
        """Sparse or non-finite gradients: one sentence before any weight, state or tier changes."""
        located = [(g, i, p) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])
                   if p.grad is not None]
        if any(p.grad.is_sparse for _, _, p in located):
            raise RuntimeError(SPARSE_GRADIENTS)
        if not self.optimizer.check_finite:
            return
        bad = first_nonfinite([p.grad for _, _, p in located])
        if bad is not None:
            raise FloatingPointError(f"the gradient of {describe(*located[bad])} holds inf or NaN; step() stopped "
                                     "before changing any weight or optimizer state (check_finite=False turns this "
                                     "check off)")

    # -- state dicts ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict with every parameter's moments read back from the tier."""
        sd = self.optimizer.state_dict()
        flat = [p for g in self.param_groups for p in g["params"]]
        for index, p in enumerate(flat):
            moments = self.tier.read_copy(self._keys[p])
            if moments:  # a new dict: torch's entries are the engine's own state dicts
                sd["state"][index] = {**sd["state"].get(index, {}), **moments}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the wrapped optimizer (its checks refuse a state that does not fit, changing nothing),
        then move the moments into the tier."""
        self.tier.plan([])  # reads ahead of an interrupted step hold stale state
        self.optimizer.load_state_dict(state_dict)
        self._evict_all()

    def close(self) -> None:
        """Write everything behind and release the tier (a disk tier's path can then take another optimizer)."""
        self.tier.close()


def _refuse_off_cpu(groups: list[dict]) -> None:
    for group in groups:
        for p in group["params"]:
            if p.device.type != "cpu":
                raise ValueError(f"OffloadedOptimizer takes CPU parameters for now (the device path with pinned "
                                 f"buffers and a copy stream is not built yet), got a {p.device.type} parameter")
