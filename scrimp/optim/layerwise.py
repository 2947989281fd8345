"""Layer-wise updates: each parameter steps inside backward, so full gradients are never all alive.

The idea of GaLore's per-layer weight update (Zhao et al., 2024, Sec. 4.3; galore-torch's
``register_post_accumulate_grad_hook`` recipe and LOMO, Lv et al., 2023), extended to gradient
accumulation done right.

With ``accumulate=1`` each parameter is updated in its post-accumulate-grad hook, as soon as
autograd has its gradient, and the gradient is freed at once. With ``accumulate=k > 1`` the hooks
only accumulate: for a projected parameter between refreshes the *projected* gradient is summed
over the window (the projector is fixed inside the window, so the sum of projections is the
projection of the sum) and the full gradient is freed at once; at a refresh step, with a residual
rule, or for plain parameters the full gradient is summed in ``.grad`` as autograd does. The
window's update runs in ``step()``, so it is the update of plain accumulation, whichever of the two
supported loops drives it. Scale the loss as for plain accumulation (the gradients are summed).

    from scrimp.optim import GaLoreAdamW, layerwise, param_groups
    opt = layerwise(model, lambda groups: GaLoreAdamW(groups), accumulate=4,
                    groups=param_groups(model, rank=128))

    # the usual accumulation loop: one backward per micro-batch, step() once per window
    for i, batch in enumerate(micro_batches):
        (model(**batch).loss / 4).backward()
        if (i + 1) % 4 == 0:
            opt.step()          # the window's update
            opt.zero_grad()     # optional: step() has cleared the window

    # or step() after every backward (Lightning's manual optimization does this): step() counts
    # the micro-batches and updates on every 4th; zero_grad() inside the window keeps the sums
    for batch in micro_batches:
        (model(**batch).loss / 4).backward()
        opt.step()
        opt.zero_grad()

With ``accumulate=1`` both loops are the same loop: ``step()`` after every backward.

Any other loop is refused in one sentence before the window updates anything: ``step()`` after a
number of backward passes other than 1 or k (or k after a ``step()`` inside a window), more than
k backward passes without ``step()``, ``zero_grad()`` between a backward and its ``step()`` (it
would throw away the window's gradients), and with ``accumulate=1`` a second backward without
``step()`` (each backward updates at once, so it would not be accumulation).

Non-finite gradients (``check_finite=True``, the default) raise ``FloatingPointError`` naming the
parameter, and that parameter is never updated with them. The wrapper owns this rule (written once,
in ``finite_guard``): it turns the inner optimizer's own ``check_finite`` off, whose check would run
after the low-rank updates of a window and see only the full sums.

- ``accumulate > 1``: the gradients a projection is about to discard are checked on the device in
  their hooks (a coordinate projector would drop a NaN outside its coordinates); in ``step()``,
  before any parameter is updated, the sums the update will use are checked too (finite
  micro-batch gradients can overflow when summed) and all verdicts are read at once: no parameter
  is updated with a window that fails, whose gradients are dropped.
- ``accumulate == 1``: each parameter's gradient is checked in its hook before its update (one
  host read per parameter). The parameters whose hooks already ran in the same backward — those
  whose gradients autograd finished earlier, typically the layers nearest the loss — have been
  updated with their (finite) gradients; no parameter whose gradient comes later is touched.
  The gradients still in flight are dropped. Reload the last checkpoint to undo the partial step.

``check_finite=False`` checks nothing, in the wrapper or the inner optimizer: a non-finite gradient
reaches the weights as it would with plain accumulation and an unchecked optimizer, and the wrapper
goes on to the next window. Whatever else stops an update partway (an inner optimizer's error) drops
the window's gradients, so the next window starts clean, and is re-raised saying that some
parameters may already hold the update.

``state_dict()`` taken inside a window holds the window's partial sums (low-rank buffers and the
full gradients summed in ``.grad``) and its counters; ``load_state_dict`` puts them back, so a
resume from it equals the uninterrupted run. Loaded state is checked before anything is replaced:
its accumulate setting, parameter count and shapes, and each buffer's shape against its parameter
(full sums) or the projector the parameter's group implies (low-rank sums); the inner optimizer's
own ``load_state_dict`` checks its state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .finite_guard import all_finite_exact
from .projection import Projector, choose_side
from .subspace import SPARSE_GRADIENTS, SubspaceAdamW, is_projected_group, resolve_rank

STATE_KEYS = ("optimizer", "micro", "accumulate", "accum")
# torch optimizers' per-parameter state tensors that have their parameter's shape (the per-parameter
# inner optimizers of a non-engine wrapper; factored states such as Adafactor's are not listed)
PARAM_SHAPED_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum")


def _loop_rule(k: int) -> str:
    if k == 1:
        return ("with accumulate=1 each backward updates the weights at once, so call step() after every backward "
                "pass (or pass accumulate=k to sum k backward passes into one update)")
    return f"with accumulate={k} call step() after every backward pass, or once after every {k} (one backward per micro-batch)"


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Wraps one optimizer (per-parameter stepping for ``SubspaceAdamW``, one optimizer per
    parameter otherwise) and runs its updates in post-accumulate-grad hooks (see the module doc
    for the supported loops, non-finite gradients and checkpoints).

    It is a ``torch.optim.Optimizer`` whose ``param_groups`` are the inner optimizer's own group
    dicts, so learning-rate schedulers and Lightning see and change the real hyper-parameters.
    """

    needs_manual_optimization = True
    is_layerwise = True

    def __init__(self, groups: list[dict], optimizer_factory: Callable[[list[dict]], Any], accumulate: int, *,
                 names: dict[Tensor, str] | None = None, check_finite: bool = True):
        self.accumulate = accumulate
        self.check_finite = check_finite
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
        self._own_the_finite_check()
        self._names = names or {}
        self._micro = 0  # step() calls so far in the current window (the step-every-backward loop)
        self._arrivals: dict[Tensor, int] = {}  # gradient arrivals per parameter since the last step()
        self._accum: dict[Tensor, Tensor] = {}  # low-rank sums of the current window
        self._in_window: dict[Tensor, None] = {}  # parameters with a gradient in the current window (ordered)
        self._finite: dict[Tensor, Tensor] = {}  # device-side verdict per parameter of the window
        super().__init__([{"params": []}], {})
        self.param_groups = inner_groups  # the very same dicts: schedulers act on the inner optimizer
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in self._params]
        if accumulate > 1:  # before each accumulation into .grad: has the window's sum been cleared?
            self._hooks += [p.register_hook(self._sum_guard(p)) for p in self._params]

    def _own_the_finite_check(self) -> None:
        """Turn the inner optimizers' own finite-gradient checks off: with the wrapper's check on they
        would read every gradient a second time, and in either case the engine's check would run after
        the window's low-rank updates, so a refusal there would leave half a window applied."""
        for opt in [self.optimizer, *self._per_param.values()]:
            if getattr(opt, "check_finite", None) is True:
                opt.check_finite = False

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

    def _name(self, p: Tensor) -> str:
        name = self._names.get(p)
        if name is not None:
            return name
        index = next(i for i, q in enumerate(self._params) if q is p)
        return f"parameter {index} (shape {tuple(p.shape)})"

    # -- backward hooks ---------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        seen = self._arrivals.get(p, 0)
        if seen + 1 > self.accumulate - self._micro:  # before this parameter (or anything of this pass) changes
            raise RuntimeError(f"the gradient of {self._name(p)} arrived {seen + 1} times without step(); "
                               f"{_loop_rule(self.accumulate)}")
        if self._engine and p.grad.is_sparse:
            raise RuntimeError(SPARSE_GRADIENTS)
        self._arrivals[p] = seen + 1
        if self.accumulate == 1:
            self._update_now(p)
        else:
            self._accumulate(p)

    def _sum_guard(self, p: Tensor) -> Callable[[Tensor], None]:
        def guard(grad: Tensor) -> None:
            if p in self._in_window and p not in self._accum and p.grad is None:
                self._refuse_cleared(p)
        return guard

    def _refuse_cleared(self, p: Tensor) -> None:
        self._drop_window()
        raise RuntimeError(f"the summed gradient of {self._name(p)} was cleared inside an accumulation window "
                           f"(model.zero_grad() between backward passes?); {_loop_rule(self.accumulate)}")

    def _update_now(self, p: Tensor) -> None:
        """accumulate=1: check this gradient (one host read), then update and free it."""
        if self.check_finite and not bool(all_finite_exact([p.grad])):
            self._drop_window()
            raise FloatingPointError(
                f"the gradient of {self._name(p)} holds inf or NaN; it was not updated, nor any parameter whose "
                "gradient comes later in this backward (those updated earlier in it were finite: reload the last "
                "checkpoint to undo them), and the gradients in flight were dropped"
            )
        try:
            if self._engine:
                self.optimizer.step_param(p, self._group_of[p], p.grad)
            else:
                self._per_param[p].step()
        except Exception as err:
            self._fail_partway(err, "in flight")
        p.grad = None

    def _accumulate(self, p: Tensor) -> None:
        """accumulate>1: keep the window's sum (low-rank where the projector allows) and a device-side
        finiteness verdict; nothing is updated before step()."""
        self._in_window[p] = None
        grad = p.grad
        group = self._group_of.get(p)
        if group is not None and self.optimizer.accumulates_low_rank(p, group):
            if self.check_finite:  # this gradient dies here; a full sum in .grad is checked in step()
                ok = all_finite_exact([grad])  # on the device on CUDA: no host read inside backward
                prev = self._finite.get(p)
                self._finite[p] = ok if prev is None else prev & ok
            low = self.optimizer.project_grad(p, group, grad)
            p.grad = None  # the full gradient dies here: only the projected sum is kept
            acc = self._accum.get(p)
            self._accum[p] = low if acc is None else acc.add_(low)

    # -- the optimizer interface -------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """End a micro-batch (the step-every-backward loop) or a window (the usual loop).

        With ``accumulate=1`` the updates already ran in backward. Otherwise the window's update
        runs here once its k micro-batches are in, as plain accumulation's ``step()`` would: the
        parameters used in any micro-batch of the window are updated with their sums. A ``step()``
        with no backward since the previous one counts as a micro-batch that contributed nothing.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        passes = max(self._arrivals.values(), default=0)
        if self.accumulate == 1:
            self._arrivals.clear()
            return loss
        if passes <= 1:  # one micro-batch of the step-every-backward loop (0: a micro-batch without backward)
            if self._micro + 1 < self.accumulate:
                self._micro += 1
                self._arrivals.clear()
                return loss
        elif passes != self.accumulate or self._micro:
            raise RuntimeError(f"step() came after {passes} backward passes since the previous step()"
                               + (f", inside a window that had {self._micro} already" if self._micro else "")
                               + f"; {_loop_rule(self.accumulate)}")
        self._apply_window()
        return loss

    @torch.no_grad()
    def _apply_window(self) -> None:
        """Check, then update every parameter of the window with its sum, then clear the window."""
        self._check_window_finite()
        cleared = [p for p in self._in_window if p not in self._accum and p.grad is None]
        if cleared:
            self._refuse_cleared(cleared[0])
        try:
            self._update_with_window()
        except Exception as err:
            self._fail_partway(err, "of this accumulation window")
        self._drop_window()

    def _update_with_window(self) -> None:
        if self._engine:
            for p, low in self._accum.items():
                self.optimizer.step_param(p, self._group_of[p], None, low_rank_grad=low)
            self.optimizer.step()  # the parameters holding full sums: plain accumulation's own step
        else:
            for p in self._params:
                if p.grad is not None:
                    self._per_param[p].step()

    def _fail_partway(self, err: Exception, gradients: str) -> None:
        """An update stopped partway (the inner optimizer raised): leave a usable wrapper and say so."""
        self._drop_window()
        raise RuntimeError(f"a layer-wise update stopped partway, so some parameters may already hold it (reload the "
                           f"last checkpoint to undo them), and the gradients {gradients} were dropped so that the "
                           f"next window starts clean: {type(err).__name__}: {err}") from err

    def _check_window_finite(self) -> None:
        """One host read for the whole window, before any update; on a non-finite gradient (one that a
        projection discarded, or a sum the update would use) nothing is updated."""
        if not self.check_finite:
            return
        sums = {p: p.grad for p in self._params if p.grad is not None} | self._accum
        flags = list(self._finite.values()) + ([all_finite_exact(list(sums.values()))] if sums else [])
        if not flags or bool(torch.stack([flag.to(flags[0].device) for flag in flags]).all()):
            return
        bad = next(p for p in self._params if not self._finite_in_window(p, sums.get(p)))
        self._drop_window()
        raise FloatingPointError(f"the gradient of {self._name(bad)} holds inf or NaN in this accumulation window (in "
                                 "a micro-batch, or in the sum of finite ones); no parameter was updated with the "
                                 "window, whose gradients were dropped")

    def _finite_in_window(self, p: Tensor, window_sum: Tensor | None) -> bool:
        """The failure path's search (host reads per parameter): its discarded gradients and its sum."""
        flag = self._finite.get(p)
        if flag is not None and not bool(flag):
            return False
        return window_sum is None or bool(all_finite_exact([window_sum]))

    def _drop_window(self) -> None:
        for p in self._params:
            p.grad = None
        self._accum.clear()
        self._finite.clear()
        self._in_window.clear()
        self._arrivals.clear()
        self._micro = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients at a window boundary. Inside a window the gradients are the window's sums,
        so this keeps them after a ``step()`` and refuses between a backward and its ``step()``."""
        if self.accumulate > 1 and self._arrivals:
            raise RuntimeError(f"zero_grad() came after a backward pass that no step() has taken, which would throw "
                               f"away the window's gradients; {_loop_rule(self.accumulate)} and call zero_grad() "
                               "after step() (or not at all)")
        if self._micro == 0:
            for p in self._params:
                p.grad = None

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Inner optimizer state and the current window: its counters, low-rank sums and full-gradient
        sums (tensors and numbers only). A state dict taken inside a window resumes exactly."""
        index = {p: i for i, p in enumerate(self._params)}
        inner = self.optimizer.state_dict() if self._engine else [o.state_dict() for o in self._per_param.values()]
        return {
            "optimizer": inner, "micro": self._micro, "accumulate": self.accumulate,
            "accum": {index[p]: buf.clone() for p, buf in self._accum.items()},
            # copies: autograd adds the next micro-batch into .grad in place
            "grads": {index[p]: p.grad.clone() for p in self._params if p.grad is not None},
            "arrivals": {index[p]: n for p, n in self._arrivals.items()},
            "window": sorted(index[p] for p in self._in_window),
            "nonfinite": sorted(index[p] for p, flag in self._finite.items() if not bool(flag)),
            "shapes": [list(p.shape) for p in self._params],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this wrapper, checked before anything is replaced (module doc)."""
        self._check_loadable(state_dict)
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
        self._restore_window(state_dict)

    def _restore_window(self, state_dict: dict) -> None:
        # Each buffer goes to its parameter's device, as torch's load_state_dict does for the inner state:
        # a checkpoint loaded to the CPU resumes on the GPU. (Lightning's own optimizer-to-device move
        # sees only the merged view of ``state``, not these.)
        params = self._params
        self._drop_window()
        self._micro = state_dict["micro"]
        self._accum = {params[i]: buf.to(params[i].device, copy=True) for i, buf in state_dict["accum"].items()}
        for i, grad in state_dict.get("grads", {}).items():
            params[i].grad = grad.to(device=params[i].device, dtype=params[i].dtype, copy=True)
        self._arrivals = {params[i]: n for i, n in state_dict.get("arrivals", {}).items()}
        window = state_dict.get("window", list(state_dict["accum"]))
        self._in_window = dict.fromkeys(params[i] for i in window)
        if self.check_finite and self.accumulate > 1:
            bad = set(state_dict.get("nonfinite", []))
            self._finite = {params[i]: torch.tensor(i not in bad, device=params[i].device) for i in window}

    def _check_loadable(self, sd: Any) -> None:
        """Every check that needs only the saved dict and this wrapper, before anything is replaced."""
        if not isinstance(sd, dict) or set(STATE_KEYS) - set(sd):
            missing = sorted(set(STATE_KEYS) - set(sd)) if isinstance(sd, dict) else list(STATE_KEYS)
            raise ValueError(f"state_dict is not a layer-wise optimizer's (missing {missing}); save it with "
                             "this wrapper's state_dict()")
        if sd["accumulate"] != self.accumulate:
            raise ValueError(f"accumulate must match the saved value {sd['accumulate']}, got {self.accumulate}")
        micro = sd["micro"]
        if not isinstance(micro, int) or isinstance(micro, bool) or not 0 <= micro < self.accumulate:
            raise ValueError(f"the saved micro-batch position must be an integer in [0, {self.accumulate}), got {micro!r}")
        if "grads" not in sd and (micro or sd["accum"]):
            raise ValueError("this layer-wise state was saved inside an accumulation window by a version that did not "
                             "save the window's full gradients, so it cannot resume exactly; resume from a "
                             "checkpoint taken at a window boundary")
        self._check_shapes(sd.get("shapes"))
        n = len(self._params)
        for key in ("accum", "grads", "arrivals"):
            bad = [i for i in sd.get(key, {}) if not (isinstance(i, int) and 0 <= i < n)]
            if bad:
                raise ValueError(f"the saved {key!r} names parameter index {bad[0]!r}, but this optimizer has {n} parameters")
        for i, grad in sd.get("grads", {}).items():
            if tuple(grad.shape) != tuple(self._params[i].shape):
                raise ValueError(f"the saved window gradient of {self._name(self._params[i])} has shape "
                                 f"{tuple(grad.shape)}, the parameter {tuple(self._params[i].shape)}")
        for i, buf in sd["accum"].items():
            p = self._params[i]
            expected = self._low_rank_shape(p)
            if expected is None or tuple(buf.shape) != expected:
                raise ValueError(f"the saved low-rank window sum of {self._name(p)} has shape {tuple(buf.shape)}, but "
                                 f"its group here implies {expected if expected is not None else 'no low-rank sum'}")
        if not self._engine:
            self._check_per_param_states(sd["optimizer"])

    def _check_shapes(self, shapes: list | None) -> None:
        if shapes is None:  # written before shapes were saved: the inner optimizer's checks remain
            return
        if len(shapes) != len(self._params):
            raise ValueError(f"the saved layer-wise state holds {len(shapes)} parameters, this optimizer "
                             f"{len(self._params)}")
        for shape, p in zip(shapes, self._params):
            if tuple(shape) != tuple(p.shape):
                raise ValueError(f"the saved layer-wise state has shape {tuple(shape)} for {self._name(p)}, "
                                 f"which here has shape {tuple(p.shape)}")

    def _low_rank_shape(self, p: Tensor) -> tuple[int, ...] | None:
        """The shape of ``p``'s low-rank window sum under its current group settings (None: it has none)."""
        group = self._group_of.get(p)
        if group is None or not is_projected_group(group):
            return None
        # built here, not with optimizer.projector(), which would add an entry to the state being guarded
        shape = (p.shape[0], p.shape[1])
        side = choose_side(shape, group["proj_type"])
        kind, rank = resolve_rank(group["projector"], shape, side, group.get("rank"), group.get("density"),
                                  group["density_rounding"])
        return tuple(Projector(kind=kind, shape=shape, rank=rank, side=side, gap=group["update_proj_gap"]).moment_shape())

    def _check_per_param_states(self, saved: Any) -> None:
        """One torch state dict per parameter, each of one group of one parameter, moments of its shape."""
        if not isinstance(saved, list) or len(saved) != len(self._params):
            count = len(saved) if isinstance(saved, list) else type(saved).__name__
            raise ValueError(f"the saved layer-wise state holds {count} per-parameter optimizers, this one "
                             f"{len(self._params)}")
        for sd, p in zip(saved, self._params):
            groups = sd.get("param_groups", []) if isinstance(sd, dict) else []
            if len(groups) != 1 or len(groups[0].get("params", [])) != 1:
                raise ValueError(f"the saved optimizer of {self._name(p)} is not one group of one parameter")
            for state in sd.get("state", {}).values():
                for key, value in state.items():
                    if key in PARAM_SHAPED_KEYS and isinstance(value, Tensor) and tuple(value.shape) != tuple(p.shape):
                        raise ValueError(f"the saved {key} of {self._name(p)} has shape {tuple(value.shape)}, the "
                                         f"parameter {tuple(p.shape)}")

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
    check_finite: bool = True,
) -> LayerwiseOptimizer:
    """Build a layer-wise optimizer over ``model`` (or an iterable of params / param groups).

    ``optimizer_factory(groups)`` builds the inner optimizer from param groups; pass ``groups``
    (e.g. ``param_groups(model, rank=128)``) to choose them, else all trainable parameters form one
    group. ``accumulate=k`` sums k micro-batches per update (the module doc shows the loops).
    ``check_finite`` refuses non-finite gradients before they reach a weight (module doc); with
    ``accumulate=1`` it costs one host read per parameter per backward. It is the only check: the
    inner optimizer's own ``check_finite`` is turned off either way (module doc). Global gradient clipping
    needs every gradient before any update, which layer-wise updates cannot give:
    ``clip_grad_norm`` raises.
    """
    if clip_grad_norm is not None:
        raise ValueError(
            "clip_grad_norm is not possible with layer-wise updates (each parameter steps inside backward "
            "before the global gradient norm is known); set clip_grad_norm=None or layerwise=False"
        )
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ValueError(f"accumulate must be an integer >= 1, got {accumulate!r}")
    if not isinstance(check_finite, bool):
        raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
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
    names = {p: n for n, p in model.named_parameters()} if isinstance(model, nn.Module) else None
    return LayerwiseOptimizer(groups, optimizer_factory, accumulate, names=names, check_finite=check_finite)
