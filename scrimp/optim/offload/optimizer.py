"""``OffloadedOptimizer``: a scrimp engine whose inner-rule state lives in a tier (host memory or disk).

    from scrimp.optim import GaLoreAdamW, param_groups
    from scrimp.optim.offload import OffloadedOptimizer
    opt = OffloadedOptimizer(GaLoreAdamW(param_groups(model, rank=128)), tier="disk", path="/scratch/opt")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)   # a real torch.optim.Optimizer

Between steps the engine's state keeps only the projector's state and the counters (``proj_P``,
``step``, ...); the inner rule's moments (``exp_avg``, ``exp_avg_sq``, their 8-bit forms, Natural
GaLore's history) are in the tier. Each parameter steps through the engine's public stages on the
tier's tensors, as ZeRO-Offload (Ren et al., 2021) runs Adam on the host: ``begin`` (refresh,
project; ``defer_moments=True`` leaves the moments' transition at a refresh in ``s.moment_event``),
``prepare_moments`` (that transition applied to the tier's dict: drop, rotate or fresh zeros), the
*host update* ``run_inner`` (``N`` from R and the tier's moments), ``finish`` (back-project,
residual, apply). A low-rank optimizer's host update reads only R and returns only N, which is why
offload suits it (issue 15). Plain (non-projected) groups step with ``step_param(p, group, grad,
moments=...)``, the engine's batched AdamW on one parameter, so they equal ``step()`` bitwise. What the
tier allocates is the engine's ``moment_layout``, and a non-finite gradient is refused in the
engine's own sentence (``refuse_nonfinite_gradients``).

Not yet: CUDA parameters (pinned buffers, a copy stream), the streamed-state mode, a placement plan,
zeroth-order optimizers and the layer-wise wrapper; each is refused in one sentence.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..layerwise import LayerwiseOptimizer
from ..memory import state_bytes
from ..moments import stored_keys
from ..subspace import SPARSE_GRADIENTS, SubspaceAdamW, is_projected_group
from ..zo import ZerothOrderOptimizer
from .tiers import TIERS, CpuTier, DiskTier, TensorSlot, make_tier

__all__ = ["OffloadedOptimizer"]

CLOSED = ("this OffloadedOptimizer was closed (close() released its tier); build a new one and load its state from "
          "a checkpoint to go on")


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


class OffloadedOptimizer(torch.optim.Optimizer):
    """A ``SubspaceAdamW`` (or subclass) whose moments live in ``tier``: "cpu" (host memory) or "disk"
    (files under ``path``, ``prefetch`` states read ahead; ``max_bytes`` caps the files).

    It shares the wrapped optimizer's ``param_groups``, ``state`` and ``defaults``, so LR schedulers
    work, and touches gradients only inside ``step()``, so ``clip_grad_norm_`` and accumulation work.
    ``state_dict()`` is the wrapped optimizer's format with the moments read back from the tier, so a
    plain optimizer loads it and it loads a plain optimizer's. ``close()`` releases a disk tier's path;
    a closed optimizer refuses to step or save in one sentence. ``state_bytes_by_tier()`` says where the
    state lives without reading it back, and ``check_finite`` is the wrapped optimizer's switch.
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
        self._closed = False
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

    @property
    def check_finite(self) -> bool:
        """The wrapped optimizer's refusal of non-finite gradients, which ``step()`` runs."""
        return self.optimizer.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self.optimizer.check_finite = value

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer and preallocate its parameters' state in the tier."""
        if self._adopting:  # torch's __init__ offers the wrapped optimizer's own groups back
            return
        self._refuse_closed()
        group = dict(param_group) if isinstance(param_group, dict) else {"params": param_group}
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)  # a generator is read once
        _refuse_off_cpu([group])
        self.optimizer.add_param_group(group)
        self._allocate(self.param_groups[-1])

    def _allocate(self, group: dict) -> None:
        for p in group["params"]:
            self._keys[p] = len(self._keys)
            layout = self.optimizer.moment_layout(p, group)
            self.tier.allocate(self._keys[p], {key: TensorSlot(*slot) for key, slot in layout.items()})

    # -- stepping ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every parameter with a gradient, its moments loaded from the tier and stored back."""
        self._refuse_closed()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._refuse_bad_gradients()
        self.tier.plan([self._keys[p] for _, p in stepping])  # a failed write behind raises here, before any change
        for group, p in stepping:
            self._step_one(p, group, p.grad)
        return loss

    def _step_one(self, p: Tensor, group: dict, grad: Tensor) -> None:
        """One parameter's step on the moments the tier holds for it, stored back whatever happens."""
        key, engine = self._keys[p], self.optimizer
        moments = self.tier.load(key)
        try:
            if is_projected_group(group):
                s = engine.begin(p, group, grad, defer_moments=True)
                engine.prepare_moments(s, moments)
                engine.finish(s, engine.run_inner(s))  # the host update, then the write on the device
            else:
                engine.step_param(p, group, grad, moments=moments)
        finally:
            self.tier.store(key, moments)

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
        """Sparse or non-finite gradients: one sentence (the engine's) before any weight, state or tier changes."""
        if any(p.grad is not None and p.grad.is_sparse for g in self.param_groups for p in g["params"]):
            raise RuntimeError(SPARSE_GRADIENTS)
        if self.optimizer.check_finite:
            self.optimizer.refuse_nonfinite_gradients()

    # -- state dicts ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict with every parameter's moments read back from the tier (a
        failed write behind raises here: its moments would be older than the counters beside them)."""
        self._refuse_closed()
        self.tier.flush()
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
        self._refuse_closed()
        self.tier.flush()
        self.tier.plan([])  # reads ahead of an interrupted step hold stale state
        self.optimizer.load_state_dict(state_dict)
        self._evict_all()

    def state_bytes_by_tier(self) -> dict[str, int]:
        """Bytes of optimizer state by where it lives between steps: ``device`` (the wrapped optimizer's
        ``state``: projectors, counters) and each tier, from the tier's layouts of the states it holds,
        so a disk tier's moments are counted without being read back into memory."""
        self._refuse_closed()
        counts = {"device": int(state_bytes(self.optimizer)["total"]), **dict.fromkeys(TIERS, 0)}
        counts[self.tier.name] = self.tier.held_bytes()
        return counts

    def close(self) -> None:
        """Write everything behind and release the tier (a disk tier's path can then take another optimizer).
        A second ``close`` does nothing."""
        if not self._closed:
            self._closed = True
            self.tier.close()

    def _refuse_closed(self) -> None:
        if self._closed:
            raise RuntimeError(CLOSED)


def _refuse_off_cpu(groups: list[dict]) -> None:
    for group in groups:
        for p in group["params"]:
            if p.device.type != "cpu":
                raise ValueError(f"OffloadedOptimizer takes CPU parameters for now (the device path with pinned "
                                 f"buffers and a copy stream is not built yet), got a {p.device.type} parameter")
