"""Layer-wise updates: each parameter steps inside backward, so full gradients are never all alive.

The idea of GaLore's per-layer weight update (Zhao et al., 2024, Sec. 4.3; galore-torch's
``register_post_accumulate_grad_hook`` recipe and LOMO, Lv et al., 2023), extended to gradient
accumulation done right: for a projected parameter between refreshes the *projected* gradient is
summed over the ``accumulate`` micro-batches (the projector is fixed inside the window, so the
sum of projections is the projection of the sum) and the full gradient is freed at once; at a
refresh step, with a residual rule, or for plain parameters the full gradient is accumulated
(autograd keeps summing into ``.grad``). The step runs in the hook of the last micro-batch.

    from scrimp.optim import GaLoreAdamW, layerwise, param_groups
    opt = layerwise(model, lambda groups: GaLoreAdamW(groups), accumulate=4,
                    groups=param_groups(model, rank=128))
    for batch in micro_batches:
        (model(**batch).loss / 4).backward()   # updates run inside backward on every 4th
        opt.step(); opt.zero_grad()             # bookkeeping (and parameters unused in the last micro-batch)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .subspace import SubspaceAdamW


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Wraps one optimizer (per-parameter stepping for ``SubspaceAdamW``, one optimizer per
    parameter otherwise) and runs its updates in post-accumulate-grad hooks.

    It is a ``torch.optim.Optimizer`` whose ``param_groups`` are the inner optimizer's own group
    dicts, so learning-rate schedulers and Lightning see and change the real hyper-parameters.
    """

    needs_manual_optimization = True
    is_layerwise = True

    def __init__(self, groups: list[dict], optimizer_factory: Callable[[list[dict]], Any], accumulate: int):
        self.accumulate = accumulate
        self.optimizer = optimizer_factory(groups)
        self._engine = isinstance(self.optimizer, SubspaceAdamW)
        self._per_param: dict[Tensor, Any] = {}
        self._group_of: dict[Tensor, dict] = {}
        if self._engine:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self._group_of[p] = group
            inner_groups = self.optimizer.param_groups
        else:
            for group in groups:
                for p in group["params"]:
                    self._per_param[p] = optimizer_factory([{**group, "params": [p]}])
            inner_groups = [g for opt in self._per_param.values() for g in opt.param_groups]
        self._params = list(self._group_of) if self._engine else list(self._per_param)
        self._micro = 0
        self._accum: dict[Tensor, Tensor] = {}
        super().__init__([{"params": []}], {})
        self.param_groups = inner_groups  # the very same dicts: schedulers act on the inner optimizer
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params]

    @property
    def state(self) -> dict:
        """Optimizer state plus the low-rank accumulation buffers (for ``memory.state_bytes``)."""
        merged: dict = {}
        sources = [self.optimizer] if self._engine else list(self._per_param.values())
        for opt in sources:
            merged.update(opt.state)
        for i, buf in enumerate(self._accum.values()):
            merged[("accum", i)] = {"accum_grad": buf}
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns an empty state; unused
        pass

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        last = self._micro == self.accumulate - 1
        if not self._engine:
            if last:
                self._per_param[p].step()
                p.grad = None
            return
        group = self._group_of[p]
        if self.accumulate > 1 and self.optimizer.accumulates_low_rank(p, group):
            low = self.optimizer.project_grad(p, group, p.grad)
            p.grad = None  # the full gradient dies here: only the projected sum is kept
            acc = self._accum.get(p)
            self._accum[p] = low if acc is None else acc.add_(low)
            if last:
                self.optimizer.step_param(p, group, None, low_rank_grad=self._accum.pop(p))
        elif last:
            self.optimizer.step_param(p, group, p.grad)
            p.grad = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Advance the micro-batch counter; the updates already ran in backward.

        At the end of a window it also steps the parameters whose hooks did not fire in the last
        micro-batch (used in earlier micro-batches only), with what they accumulated, as plain
        accumulation would; their buffers never leak into the next window.
        """
        loss = closure() if closure is not None else None
        self._micro = (self._micro + 1) % self.accumulate
        if self._micro == 0:
            self._step_leftovers()
        return loss

    @torch.no_grad()
    def _step_leftovers(self) -> None:
        for p in list(self._accum):
            self.optimizer.step_param(p, self._group_of[p], None, low_rank_grad=self._accum.pop(p))
        for p in self._params:
            if p.grad is None:
                continue
            if self._engine:
                self.optimizer.step_param(p, self._group_of[p], p.grad)
            else:
                self._per_param[p].step()
            p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear leftover gradients at a window boundary; inside a window the gradients are the
        accumulation buffers, so this does nothing there."""
        if self._micro == 0:
            for p in self._params:
                p.grad = None

    def state_dict(self) -> dict:
        """Inner optimizer state, micro-batch position and low-rank buffers (tensors and numbers only).
        Resume at a window boundary: full-gradient accumulators inside a window are not saved."""
        index = {p: i for i, p in enumerate(self._params)}
        inner = self.optimizer.state_dict() if self._engine else [o.state_dict() for o in self._per_param.values()]
        return {"optimizer": inner, "micro": self._micro, "accumulate": self.accumulate,
                "accum": {index[p]: buf.clone() for p, buf in self._accum.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = {"optimizer", "micro", "accumulate", "accum"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is not a layer-wise optimizer's (missing {sorted(missing)}); save it with "
                             "this wrapper's state_dict()")
        if state_dict["accumulate"] != self.accumulate:
            raise ValueError(f"accumulate must match the saved value {state_dict['accumulate']}, got {self.accumulate}")
        # torch's load_state_dict swaps in new group dicts; copy their values into the dicts this
        # wrapper, its hooks and any LR scheduler hold, and put those back, so there is one set.
        inner = [(self.optimizer, state_dict["optimizer"])] if self._engine else \
            list(zip(self._per_param.values(), state_dict["optimizer"]))
        for opt, sd in inner:
            held = list(opt.param_groups)
            opt.load_state_dict(sd)
            for old, new in zip(held, opt.param_groups):
                old.update(new)
            opt.param_groups = held
        self._micro = state_dict["micro"]
        # Each buffer goes to its parameter's device, as torch's load_state_dict does for the inner state:
        # a checkpoint loaded to the CPU resumes on the GPU. (Lightning's own optimizer-to-device move
        # sees only the merged view of ``state``, not this dict.)
        self._accum = {self._params[i]: buf.to(self._params[i].device, copy=True)
                       for i, buf in state_dict["accum"].items()}

    def remove_hooks(self) -> None:
        """Detach the backward hooks (the wrapper stops updating)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def layerwise(
    model: nn.Module | Iterable,
    optimizer_factory: Callable[[list[dict]], Any],
    accumulate: int = 1,
    *,
    clip_grad_norm: float | None = None,
    groups: list[dict] | None = None,
) -> LayerwiseOptimizer:
    """Build a layer-wise optimizer over ``model`` (or an iterable of params / param groups).

    ``optimizer_factory(groups)`` builds the inner optimizer from param groups; pass ``groups``
    (e.g. ``param_groups(model, rank=128)``) to choose them, else all trainable parameters form one
    group. ``accumulate=k`` steps every k micro-batches. Global gradient clipping needs every
    gradient before any update, which layer-wise updates cannot give: ``clip_grad_norm`` raises.
    """
    if clip_grad_norm is not None:
        raise ValueError(
            "clip_grad_norm is not possible with layer-wise updates (each parameter steps inside backward "
            "before the global gradient norm is known); set clip_grad_norm=None or layerwise=False"
        )
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ValueError(f"accumulate must be an integer >= 1, got {accumulate!r}")
    if groups is None:
        params = model.parameters() if isinstance(model, nn.Module) else model
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = params
        else:
            groups = [{"params": [p for p in params if p.requires_grad]}]
    groups = list(groups)  # a generator is read once
    for index, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"groups[{index}] must be a dict with a 'params' list, got {group!r:.80}")
    groups = [dict(g, params=list(g["params"])) for g in groups]
    frozen = sum(not p.requires_grad for g in groups for p in g["params"])
    if frozen:
        raise ValueError(f"{frozen} parameter(s) in groups do not require grad; layer-wise updates hook each "
                         "parameter's gradient, so leave frozen parameters out of the groups")
    return LayerwiseOptimizer(groups, optimizer_factory, accumulate)
