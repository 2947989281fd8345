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
resume from it equals the uninterrupted run. The state is keyed by parameter name (``layerwise``
takes the names from ``model.named_parameters()``), the inner optimizer's state included, so it loads
into a model that lists its parameters in another order; a state keyed by position, as written
before names were, is read in this wrapper's order. Loaded state is checked before anything is
replaced: its accumulate setting, parameter count, names (missing and extra ones are named) and
shapes, each buffer's shape against its parameter (full sums) or the projector the parameter's group
implies (low-rank sums), and that no parameter changed group; the inner optimizer's own
``load_state_dict`` checks its state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .finite_guard import all_finite_exact

STATE_KEYS = ("optimizer", "micro", "accumulate", "accum")
# torch optimizers' per-parameter state tensors that have their parameter's shape (the per-parameter
# inner optimizers of a non-engine wrapper; factored states such as Adafactor's are not listed)
PARAM_SHAPED_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum")
SHOWN_NAMES = 4  # how many missing or extra parameters a refusal names before counting the rest


@runtime_checkable
class StepsPerParameter(Protocol):
    """An optimizer the wrapper can drive one parameter at a time (the engine, ``SubspaceAdamW``, is one).

    ``step_param(p, group, grad)`` updates ``p`` alone with its gradient; with ``grad=None`` and
    ``low_rank_grad`` it takes a sum of ``project_grad`` outputs instead, which is allowed while
    ``accumulates_low_rank(p, group)`` holds, with the shape ``low_rank_shape(p, group)``; ``step()`` updates the parameters whose ``.grad`` is set.
    Any other optimizer is wrapped as one instance per parameter.
    """

    param_groups: list[dict]

    def accumulates_low_rank(self, p: Tensor, group: dict) -> bool: ...

    def project_grad(self, p: Tensor, group: dict, grad: Tensor) -> Tensor: ...

    def low_rank_shape(self, p: Tensor, group: dict) -> tuple[int, ...] | None: ...

    def step_param(self, p: Tensor, group: dict, grad: Tensor | None, low_rank_grad: Tensor | None = None) -> None: ...

    def step(self, closure: Callable[[], Any] | None = None) -> Any: ...


def _loop_rule(k: int) -> str:
    if k == 1:
        return ("with accumulate=1 each backward updates the weights at once, so call step() after every backward "
                "pass (or pass accumulate=k to sum k backward passes into one update)")
    return f"with accumulate={k} call step() after every backward pass, or once after every {k} (one backward per micro-batch)"


def _is_position(key: Any) -> bool:
    """Whether a saved parameter key is a position (an int) rather than a name."""
    return isinstance(key, int) and not isinstance(key, bool)


def _shown(keys: list) -> str:
    """Up to SHOWN_NAMES parameter keys for a sentence, then how many more."""
    words = [k if isinstance(k, str) else f"parameter {k}" for k in keys[:SHOWN_NAMES]]
    more = len(keys) - SHOWN_NAMES
    return ", ".join(words) + (f" and {more} more" if more > 0 else "")


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Wraps one optimizer (per-parameter stepping for one that ``StepsPerParameter`` describes, one
    optimizer per parameter otherwise) and runs its updates in post-accumulate-grad hooks (see the
    module doc for the supported loops, non-finite gradients and checkpoints).

    ``names`` maps parameters to their names (``layerwise`` passes ``model.named_parameters()``); the
    state dict is keyed by them, so a checkpoint loads into a model whose parameters are listed in
    another order. A parameter without a name is keyed by its position.

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
        self._engine = isinstance(self.optimizer, StepsPerParameter)
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
        self._keys: list[str | int] = [self._names.get(p, i) for i, p in enumerate(self._params)]
        self._key_of: dict[Tensor, str | int] = dict(zip(self._params, self._keys))
        self._param_of: dict[str | int, Tensor] = dict(zip(self._keys, self._params))
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
        for p, buf in self._accum.items():
            merged[("accum", self._key_of[p])] = {"accum_grad": buf}
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
            raise RuntimeError(f"{type(self.optimizer).__name__} does not support sparse gradients ({self._name(p)}, "
                               "e.g. nn.Embedding(sparse=True)); use dense gradients or torch.optim.SparseAdam for it")
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
        sums (tensors and numbers only), keyed by parameter name (by position where unnamed).
        ``shapes`` holds every parameter's shape in the inner optimizer's order, the order in which the
        engine's own torch state numbers them. A state dict taken inside a window resumes exactly."""
        key = self._key_of
        inner = self.optimizer.state_dict() if self._engine else \
            {key[p]: opt.state_dict() for p, opt in self._per_param.items()}
        return {
            "optimizer": inner, "micro": self._micro, "accumulate": self.accumulate,
            "accum": {key[p]: buf.clone() for p, buf in self._accum.items()},
            # copies: autograd adds the next micro-batch into .grad in place
            "grads": {key[p]: p.grad.clone() for p in self._params if p.grad is not None},
            "arrivals": {key[p]: n for p, n in self._arrivals.items()},
            "window": [key[p] for p in self._params if p in self._in_window],
            "nonfinite": [key[p] for p in self._params if p in self._finite and not bool(self._finite[p])],
            "shapes": {key[p]: list(p.shape) for p in self._params},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this wrapper, checked before anything is replaced (module doc). Its
        parameters are matched by name; a state keyed by position (saved before states were keyed by
        name, or by a wrapper without names) is read in this wrapper's order."""
        state_dict = self._checked(state_dict)
        # torch's load_state_dict swaps in new group dicts; copy their values into the dicts this
        # wrapper, its hooks and any LR scheduler hold, and put those back, so there is one set.
        inner = [(self.optimizer, state_dict["optimizer"])] if self._engine else \
            [(opt, state_dict["optimizer"][self._key_of[p]]) for p, opt in self._per_param.items()]
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
        param = self._param_of
        self._drop_window()
        self._micro = state_dict["micro"]
        self._accum = {param[k]: buf.to(param[k].device, copy=True) for k, buf in state_dict["accum"].items()}
        for k, grad in state_dict.get("grads", {}).items():
            param[k].grad = grad.to(device=param[k].device, dtype=param[k].dtype, copy=True)
        self._arrivals = {param[k]: n for k, n in state_dict.get("arrivals", {}).items()}
        window = state_dict.get("window", list(state_dict["accum"]))
        self._in_window = dict.fromkeys(param[k] for k in window)
        if self.check_finite and self.accumulate > 1:
            bad = set(state_dict.get("nonfinite", []))
            self._finite = {param[k]: torch.tensor(k not in bad, device=param[k].device) for k in window}

    def _checked(self, sd: Any) -> dict:
        """Every check that needs only the saved dict and this wrapper, before anything is replaced.
        Returns the dict keyed by this wrapper's parameter keys, the inner state in this wrapper's order."""
        self._check_counters(sd)
        saved_keys = self._saved_keys(sd.get("shapes"))
        sd = {**sd, **{entry: self._rekeyed(entry, sd[entry], saved_keys)
                       for entry in ("accum", "grads", "arrivals", "window", "nonfinite") if entry in sd}}
        self._check_window_shapes(sd)
        if self._engine:
            sd["optimizer"] = self._inner_in_this_order(sd["optimizer"], saved_keys)
        else:
            sd["optimizer"] = self._checked_per_param_states(sd["optimizer"], saved_keys)
        return sd

    def _check_counters(self, sd: Any) -> None:
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

    def _saved_keys(self, shapes: Any) -> list[str | int]:
        """The saved parameters' keys in the saved order, checked against this wrapper's: their count, their
        names and their shapes. A position (a list of shapes, as saved before names, or an unnamed
        parameter) stands for this wrapper's parameter there; without shapes (older states) every key does."""
        if shapes is None:  # written before shapes were saved: the inner optimizer's checks remain
            return list(self._keys)
        if isinstance(shapes, list):
            shapes = dict(enumerate(shapes))
        if not isinstance(shapes, Mapping):
            raise ValueError("the saved layer-wise shapes must map parameter names to shapes, got "
                             f"{type(shapes).__name__}")
        n = len(self._params)
        if len(shapes) != n:
            raise ValueError(f"the saved layer-wise state holds {len(shapes)} parameters, this optimizer {n}")
        keys = [self._keys[k] if _is_position(k) and 0 <= k < n else k for k in shapes]
        self._check_same_parameters(keys)
        for key, shape in zip(keys, shapes.values()):
            p = self._param_of[key]
            if tuple(shape) != tuple(p.shape):
                raise ValueError(f"the saved layer-wise state has shape {tuple(shape)} for {self._name(p)}, "
                                 f"which here has shape {tuple(p.shape)}")
        return keys

    def _check_same_parameters(self, saved_keys: list) -> None:
        """Refuse, naming them, parameters here that the state lacks and saved parameters not here."""
        saved = set(saved_keys)
        missing = [k for k in self._keys if k not in saved]
        extra = [k for k in saved_keys if k not in self._param_of]
        if missing or extra:
            parts = ([f"does not hold {_shown(missing)}, which this optimizer has"] if missing else []) + \
                ([f"holds {_shown(extra)}, which this optimizer does not"] if extra else [])
            raise ValueError(f"the saved layer-wise state {', and '.join(parts)} (parameters are matched by their "
                             "names in model.named_parameters())")

    def _rekeyed(self, entry: str, saved: Any, saved_keys: list) -> Any:
        """A saved window entry (a mapping or a list over parameters) keyed by this wrapper's keys: a
        position is one in the saved order; a name must be one of this wrapper's parameters."""
        n = len(saved_keys)

        def key(k):
            if _is_position(k):
                if not 0 <= k < n:
                    raise ValueError(f"the saved {entry!r} names parameter index {k!r}, but this optimizer has {n} "
                                     "parameters")
                return saved_keys[k]
            if k not in self._param_of:
                raise ValueError(f"the saved {entry!r} names parameter {k!r}, which this optimizer does not hold")
            return k

        return {key(k): v for k, v in saved.items()} if isinstance(saved, Mapping) else [key(k) for k in saved]

    def _check_window_shapes(self, sd: dict) -> None:
        for k, grad in sd.get("grads", {}).items():
            p = self._param_of[k]
            if tuple(grad.shape) != tuple(p.shape):
                raise ValueError(f"the saved window gradient of {self._name(p)} has shape {tuple(grad.shape)}, the "
                                 f"parameter {tuple(p.shape)}")
        for k, buf in sd["accum"].items():
            p = self._param_of[k]
            expected = self._low_rank_shape(p)
            if expected is None or tuple(buf.shape) != expected:
                raise ValueError(f"the saved low-rank window sum of {self._name(p)} has shape {tuple(buf.shape)}, but "
                                 f"its group here implies {expected if expected is not None else 'no low-rank sum'}")

    def _inner_in_this_order(self, inner: Any, saved_keys: list) -> Any:
        """The engine's torch state dict with each group's parameter ids listed in this wrapper's order.

        torch numbers the parameters from 0 in group order (the order ``shapes`` is saved in) and its
        load pairs saved ids with parameters by position; listing the ids by name pairs them by name.
        A parameter in another group than when saved is refused: it would take that group's settings.
        """
        if saved_keys == self._keys or not isinstance(inner, dict) or not isinstance(inner.get("param_groups"), list):
            return inner  # the same order, or no torch state dict (the engine's own load refuses that one)
        saved_id = {k: i for i, k in enumerate(saved_keys)}
        saved_group = {saved_keys[i]: g for g, group in enumerate(inner["param_groups"])
                       for i in group.get("params", []) if _is_position(i) and 0 <= i < len(saved_keys)}
        here_group = {self._key_of[p]: g for g, group in enumerate(self.optimizer.param_groups)
                      for p in group["params"]}
        moved = [k for k in self._keys if saved_group.get(k) != here_group[k]]
        if moved:
            raise ValueError(f"the saved layer-wise state has {_shown(moved[:1])} in parameter group "
                             f"{saved_group.get(moved[0])} and this optimizer in group {here_group[moved[0]]}; build "
                             "the parameter groups as they were when it was saved")
        groups = [{**saved, "params": [saved_id[self._key_of[p]] for p in current["params"]]}
                  for saved, current in zip(inner["param_groups"], self.optimizer.param_groups)]
        return {**inner, "param_groups": groups + inner["param_groups"][len(groups):]}

    def _low_rank_shape(self, p: Tensor) -> tuple[int, ...] | None:
        """The shape of ``p``'s low-rank window sum under its current group settings (None: it has none)."""
        group = self._group_of.get(p)
        return None if group is None else self.optimizer.low_rank_shape(p, group)

    def _checked_per_param_states(self, saved: Any, saved_keys: list) -> dict:
        """One torch state dict per parameter (keyed by name; a list, as saved before names, is in the saved
        order), each of one group of one parameter, with moments of its parameter's shape."""
        if isinstance(saved, list) and len(saved) == len(saved_keys):
            saved = dict(enumerate(saved))
        if not isinstance(saved, Mapping) or len(saved) != len(self._params):
            count = len(saved) if isinstance(saved, (list, Mapping)) else type(saved).__name__
            raise ValueError(f"the saved layer-wise state holds {count} per-parameter optimizers, this one "
                             f"{len(self._params)}")
        saved = self._rekeyed("optimizer", saved, saved_keys)
        for k, sd in saved.items():
            p = self._param_of[k]
            groups = sd.get("param_groups", []) if isinstance(sd, dict) else []
            if len(groups) != 1 or len(groups[0].get("params", [])) != 1:
                raise ValueError(f"the saved optimizer of {self._name(p)} is not one group of one parameter")
            for state in sd.get("state", {}).values():
                for key, value in state.items():
                    if key in PARAM_SHAPED_KEYS and isinstance(value, Tensor) and tuple(value.shape) != tuple(p.shape):
                        raise ValueError(f"the saved {key} of {self._name(p)} has shape {tuple(value.shape)}, the "
                                         f"parameter {tuple(p.shape)}")
        return saved

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
