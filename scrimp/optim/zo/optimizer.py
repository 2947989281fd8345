"""Zeroth-order optimizers with a closure API: ``opt.step(closure)``, the closure runs a forward only.

Follows MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023,
princeton-nlp/MeZO): two-point SPSA with a seeded Gaussian perturbation that is regenerated, never
stored. Generalizes it with bit-exact restore (``perturbation="hook"``), several queries per step,
gradient accumulation as (seed, scalar) pairs, a per-example query allocator, seed-replayed
momentum, checkpoints that are (seed, projected gradient) logs, and a deferred per-parameter update
that ZO2-style streaming (``scrimp.optim.offload.stream``) applies block by block.

    from scrimp.optim.zeroth_order import ZOSGD
    opt = ZOSGD(model.parameters(), lr=1e-6, eps=1e-3)
    loss = opt.step(lambda: model(input_ids, labels=input_ids).loss)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from scrimp.checks import check_integer, check_number, is_integer
from scrimp.optim import state_check
from scrimp.optim.zo.perturbation import hook_perturbation, inplace_perturb_, mix_seed
from scrimp.optim.zo.rules import AdamRule, Plan, SGDRule
from scrimp.optim.zo.rules import momentum_window as window_for_momentum

PERTURBATIONS = ("hook", "inplace")


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """Two-point SPSA estimate of the directional derivative ``z . grad``: ``(f+ - f-) / (2 eps)``."""
    return (loss_plus - loss_minus) / (2.0 * eps)


def _as_loss(value, what: str) -> torch.Tensor:
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the closure must return the loss as a tensor or a number, got {type(value).__name__}")
    return value.detach()


def check_record(record: dict, n_groups: int) -> None:
    """Raise one sentence unless ``record`` (``make_record``'s) has one seed per projected gradient,
    one lr and weight decay per group, and only finite scalars: it is about to move every weight."""
    if not isinstance(record, dict) or not {"seeds", "grads", "lrs", "weight_decays"} <= set(record):
        raise ValueError(f"a step record needs seeds, grads, lrs and weight_decays, got {record!r:.80}")
    if len(record["seeds"]) != len(record["grads"]):
        raise ValueError(f"a step record has {len(record['seeds'])} seeds and {len(record['grads'])} projected gradients")
    for key in ("lrs", "weight_decays"):
        if len(record[key]) != n_groups:
            raise ValueError(f"a step record has {len(record[key])} {key} for {n_groups} parameter group(s)")
    for key in ("grads", "lrs", "weight_decays"):
        values = torch.as_tensor(record[key], dtype=torch.float64)
        if not bool(torch.isfinite(values).all()):
            raise FloatingPointError(f"a step record's {key} hold inf or NaN ({values.tolist()[:4]}); refusing to apply "
                                     "it to the weights (a diverged loss difference, a tiny eps or a NaN lr)")


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Shared engine: queries, accumulation, skips, logs, plans. Configured by an update rule.

    Use ``ZOSGD`` or ``ZOAdam``. State kept: a few counters, the (seed, projected gradient) records
    of the momentum window and of the steps since the last full checkpoint (``mark_full_save``).

    ``step(closure)`` is ``accumulate(closure)`` then ``finish_step``. A driver that runs its own
    forwards (``scrimp.optim.offload.stream``'s dual forward) uses the same public seam, in order:
    ``query_seeds()``; the perturbed losses (``perturbed``, ``evaluate``, or its own forward with
    ``perturbation.sliced_perturbation``); ``finite_loss`` on each; ``add_estimate`` with the
    projected gradients; ``finish_step(seeds, apply=False)`` for the plan; ``apply_plan`` per parameter.
    """

    needs_manual_optimization = True
    is_zeroth_order = True

    def __init__(
        self,
        params,
        rule,
        *,
        lr: float,
        eps: float,
        weight_decay: float = 0.0,
        n_queries: int = 1,
        seed: int = 0,
        perturbation: str = "hook",
        query_allocator: Callable | None = None,
    ):
        check_number("lr", lr, low=0)
        check_number("eps (the perturbation scale)", eps, low=0, open_low=True)
        check_number("weight_decay", weight_decay, low=0)
        if not is_integer(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        check_integer("n_queries", n_queries, 1)
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if query_allocator is not None and not callable(query_allocator):
            raise TypeError("query_allocator must be callable (e.g. scrimp.optim.zo.VarianceQueryAllocator)")
        if query_allocator is not None and n_queries != 1:
            raise ValueError("query_allocator sets the number of queries itself; leave n_queries at 1")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.rule = rule
        self.eps = float(eps)
        self.n_queries = n_queries
        self.seed = int(seed)
        self.perturbation = perturbation
        self.query_allocator = query_allocator
        self.draws = 0  # step attempts so far; keys the seeds, so a skipped step never reuses them
        self.steps = 0  # committed steps
        self.skipped = 0  # micro-batches whose loss was non-scalar or non-finite
        self.window: list[dict] = []
        self.log: list[dict] = []
        self._micro: list[list[float]] = []  # accumulated projected gradients, one list per micro-batch
        self._attempted = False  # accumulate() ran since the last step (even if every micro-batch was skipped)
        self._unperturbed_warned = False

    # ---- parameters -------------------------------------------------------------------------------
    def indexed_params(self) -> list[tuple[int, int, torch.Tensor]]:
        """(global index, group index, parameter) in a fixed order: the index keys each ``z``."""
        out, index = [], 0
        for group_index, group in enumerate(self.param_groups):
            for param in group["params"]:
                out.append((index, group_index, param))
                index += 1
        return out

    def trainable_params(self) -> list[tuple[int, int, torch.Tensor]]:
        """``indexed_params`` without frozen parameters (``requires_grad=False``): those are never
        perturbed or updated, as with any torch optimizer; the others keep their global index."""
        return [(i, g, p) for i, g, p in self.indexed_params() if p.requires_grad]

    def index_of(self) -> dict[int, int]:
        return {id(p): i for i, _, p in self.trainable_params()}

    # ---- seeds and evaluation ---------------------------------------------------------------------
    def query_seeds(self, n: int | None = None) -> list[int]:
        """The seeds of the current step attempt (the same for every micro-batch of the step)."""
        return [mix_seed(self.seed, self.draws, j) for j in range(n or self.n_queries)]

    def finite_loss(self, value, reduce_examples: bool = False) -> torch.Tensor | None:
        """``value`` (a loss the closure or a driver computed) as a float64 CPU tensor, or None after
        counting a skip and warning: a non-finite loss, or (unless ``reduce_examples``: the query
        allocator's per-example losses) one that is not a scalar. A None means: drop this step's
        estimate and call ``finish_step`` without adding it, which moves on to the next seeds."""
        loss = _as_loss(value, "loss")
        if not reduce_examples and loss.numel() != 1:
            self._skip(f"the closure returned a loss with shape {tuple(loss.shape)}, not a scalar")
            return None
        if not bool(torch.isfinite(loss).all()):
            self._skip(f"the closure returned a non-finite loss ({loss.flatten()[:4].tolist()})")
            return None
        # On the CPU from here on: the estimate's arithmetic is a handful of scalars (and, with the
        # query allocator, numpy), and the finiteness check above has already synchronized.
        return loss.detach().to(device="cpu", dtype=torch.float64)

    def _skip(self, why: str) -> None:
        self.skipped += 1
        warnings.warn(f"{why}; skipping this update (skipped so far: {self.skipped})", RuntimeWarning)

    @contextmanager
    def perturbed(self, seed: int, scale: float, *, index_of: dict[int, int] | None = None) -> Iterator[set[int]]:
        """Inside the block, the trainable parameters are at ``theta + scale * z(seed)`` (``direction``).

        ``perturbation="hook"``: each module runs with its perturbed weights swapped in, the stored
        weights are never written (exact restore), and the yielded set fills with the indices of the
        parameters that a forward did perturb (one read outside its own module's forward is not).
        ``"inplace"``: the weights move in place and back on exit, inexact in floats as in MeZO; the
        set holds every index. ``evaluate`` is the two-point estimate built on this.
        """
        index_of = self.index_of() if index_of is None else index_of
        if self.perturbation == "hook":
            with torch.no_grad(), hook_perturbation(index_of, seed, scale) as materialized:
                yield materialized
            return
        trainable = self.trainable_params()
        params, order = [p for _, _, p in trainable], [i for i, _, _ in trainable]
        inplace_perturb_(params, order, seed, scale)
        try:
            yield set(order)
        finally:
            inplace_perturb_(params, order, seed, -scale)

    def _evaluate_at(self, closure, seed: int, scale: float, index_of):
        with torch.no_grad():
            if self.perturbation == "inplace":
                return closure()  # evaluate() moved the weights itself (MeZO's +eps, -2 eps, +eps)
            with self.perturbed(seed, scale, index_of=index_of) as materialized:
                value = closure()
            if not self._unperturbed_warned and len(materialized) < len(index_of):
                self._unperturbed_warned = True
                warnings.warn(
                    f"{len(index_of) - len(materialized)} optimized parameters were not read inside their "
                    "own module's forward, so perturbation='hook' did not perturb them: they are unused, "
                    "or used outside their module (then use perturbation='inplace')",
                    RuntimeWarning,
                )
            return value

    def evaluate(self, closure, seed: int, *, index_of: dict[int, int] | None = None, per_example: bool = False,
                 indices=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(f+, f-): ``closure()`` at theta + eps z(seed) and at theta - eps z(seed), as float64 CPU
        tensors; None if either loss is invalid (``finite_loss``: skip counted, warned). The weights
        are unperturbed afterwards (bit-exact with ``perturbation="hook"``), and both forwards see the
        same RNG state (dropout masks). With ``per_example`` the closure takes ``indices`` and returns
        one loss per example. ``index_of`` (``index_of()``) may be passed to save recomputing it."""
        index_of = self.index_of() if index_of is None else index_of
        call = (lambda: closure(indices)) if per_example else closure
        params = [p for _, _, p in self.trainable_params()]
        order = [i for i, _, _ in self.trainable_params()]
        # f+ and f- must see the same network: a model in training mode draws its dropout masks from
        # the global RNG, so the second forward replays the first one's random state.
        rng_state = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        inplace = self.perturbation == "inplace"
        offset = 0.0  # how far the stored weights are moved (in place only), undone even if the closure raises
        try:
            if inplace:
                inplace_perturb_(params, order, seed, self.eps)
                offset = self.eps
            plus = self._evaluate_at(call, seed, self.eps, index_of)
            if inplace:
                inplace_perturb_(params, order, seed, -2.0 * self.eps)
                offset = -self.eps
            torch.set_rng_state(rng_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
            minus = self._evaluate_at(call, seed, -self.eps, index_of)
        finally:
            if offset:
                inplace_perturb_(params, order, seed, -offset)
        plus = self.finite_loss(plus, per_example)
        minus = self.finite_loss(minus, per_example) if plus is not None else None
        if plus is None or minus is None:
            return None
        return plus, minus

    # ---- public API ---------------------------------------------------------------------------------
    def accumulate(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """Evaluate one micro-batch with this step's seeds and store its projected gradients.

        The update is applied by the next ``step()``: the average over micro-batches of the stored
        scalars, with the same seeds, equals one step on the concatenated batch (mean losses).
        Returns the mean of the +eps and -eps losses, or None when the micro-batch was skipped.
        """
        if closure is None or not callable(closure):
            raise TypeError("accumulate(closure) needs a callable closure that returns the loss")
        if self.query_allocator is not None:
            raise ValueError("gradient accumulation is not combined with query_allocator; use one or the other")
        index_of = self.index_of()
        grads, losses = [], []
        self._attempted = True  # a skipped micro-batch still makes step() without closure legitimate
        for seed in self.query_seeds():
            pair = self.evaluate(closure, seed, index_of=index_of)
            if pair is None:
                return None
            plus, minus = pair
            # each query contributes its projected gradient / q (plain query averaging)
            grads.append(projected_gradient(float(plus), float(minus), self.eps) / self.n_queries)
            losses.append((plus + minus) / 2)
        self.add_estimate(grads)
        return torch.stack(losses).mean().to(torch.float32)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor | None:
        """One ZO step. ``closure()`` runs a forward and returns the scalar loss; it never calls backward.

        With ``query_allocator`` set, the closure takes ``indices`` (None for the whole batch, else a
        LongTensor of example positions) and returns per-example losses. Without a closure, applies
        what ``accumulate`` stored. Returns the mean loss of the evaluated points (or None if skipped).
        """
        if closure is None and not self._micro and not self._attempted:
            raise ValueError(
                "step() needs a closure that runs a forward pass and returns the loss "
                "(zeroth-order optimizers estimate the gradient from forward passes only)"
            )
        loss = None
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be callable, got {type(closure).__name__}")
            if self.query_allocator is not None:
                seeds, grads, loss = self._allocated_queries(closure)
                if grads is not None:
                    self.add_estimate(grads)
                return self.finish_step(seeds or [], loss)  # without an estimate: a skip, loss is None
            loss = self.accumulate(closure)
        return self.finish_step(self.query_seeds(), loss)

    def add_estimate(self, grads: Sequence[float]) -> None:
        """Store one micro-batch's projected gradients, one per seed of ``query_seeds()``, each already
        divided by the number of queries (``projected_gradient(f+, f-, eps) / n``): what ``accumulate``
        stores, for a driver that evaluates the perturbed losses itself (the streamed dual forward).
        ``finish_step`` averages the estimates added since the last step."""
        grads = [float(g) for g in grads]
        if not grads or (self._micro and len(grads) != len(self._micro[0])):
            expected = len(self._micro[0]) if self._micro else "one or more"
            raise ValueError(f"add_estimate needs {expected} projected gradients (one per query seed), "
                             f"got {len(grads)}")
        self._micro.append(grads)
        self._attempted = True

    def finish_step(self, seeds: Sequence[int], loss=None, apply: bool = True):
        """End the step attempt: average the estimates added since the last step (one projected
        gradient per seed in ``seeds``) into a record and ``commit`` it, applying it to every
        parameter if ``apply``; with no estimate (every micro-batch skipped) only move on to the
        next seeds. Returns ``loss`` if ``apply``, else the committed ``Plan`` (None without an
        estimate), which the caller applies per parameter with ``apply_plan``. A record ``commit``
        refuses (non-finite scalars) raises, drops the estimates and books nothing: the next attempt
        draws the same seeds."""
        if self._micro and len(self._micro[0]) != len(seeds):
            raise ValueError(f"finish_step got {len(seeds)} seeds for {len(self._micro[0])} projected gradients per "
                             "estimate; pass the seeds the estimates were made with (query_seeds())")
        micro, self._micro = self._micro, []
        self._attempted = False
        self.draws += 1
        if not micro:
            return loss if apply else None
        n = len(micro)
        # average over micro-batches: one weight per seed
        grads = [sum(m[j] for m in micro) / n for j in range(len(seeds))]
        record = self.make_record(seeds, grads)
        try:
            check_record(record, len(self.param_groups))
        except (ValueError, FloatingPointError):
            # refused before anything is booked, the draw counter included: a retry draws the same
            # directions, as a run that never met this step would (its scalars are dropped: not finite)
            self.draws -= 1
            raise
        plan = self.commit(record, apply=apply)
        return loss if apply else plan

    def make_record(self, seeds: list[int], grads: list[float]) -> dict:
        """A (seed, projected gradient) record of one step, loadable with ``torch.load(weights_only=True)``."""
        return {
            "seeds": torch.tensor(seeds, dtype=torch.int64),
            "grads": torch.tensor(grads, dtype=torch.float64),
            "lrs": torch.tensor([float(g["lr"]) for g in self.param_groups], dtype=torch.float64),
            "weight_decays": torch.tensor([float(g["weight_decay"]) for g in self.param_groups], dtype=torch.float64),
            "draws": self.draws,
        }

    def commit(self, record: dict, apply: bool = True) -> Plan:
        """Book a step (counters, momentum window, log) and return its plan; apply it to all params if asked.

        A record whose projected gradients, lrs or weight decays are not finite is refused before
        anything is booked: the closure path never makes one (``finite_loss`` skips non-finite
        losses), but an eps small enough to overflow ``(f+ - f-) / (2 eps)``, a scheduler's NaN lr
        or a replayed log can.
        """
        check_record(record, len(self.param_groups))
        self.steps += 1
        self.window = (self.window + [record])[-self.rule.window :]
        self.log.append(record)
        plan = Plan(
            terms=self.rule.plan_terms(self.window),
            lrs=tuple(record["lrs"].tolist()),
            weight_decays=tuple(record["weight_decays"].tolist()),
            step=self.steps,
        )
        if apply:
            for index, group, param in self.trainable_params():
                self.apply_plan(plan, param, index, group)
        return plan

    def apply_plan(self, plan: Plan, param: torch.Tensor, index: int, group: int) -> None:
        """Apply one committed step to one parameter (the streamed path calls this block by block)."""
        with torch.no_grad():
            self.rule.apply_(param, index, plan, group, self.state[param])

    def replay(self, records: Iterable[dict]) -> None:
        """Re-apply logged steps in order: bitwise the same parameters as the original run on CPU."""
        for record in records:
            self.commit(record, apply=True)
            self.draws = int(record["draws"])

    def mark_full_save(self) -> None:
        """Forget the log: a full checkpoint of the parameters was just written."""
        self.log = []

    # ---- query allocation -------------------------------------------------------------------------
    def _allocated_queries(self, closure):
        """Pilot query on every example, then the allocator's extra queries, one shared seed per round.

        Estimator: ``(1/n) sum_i (1/k_i) sum_{r < k_i} c_ir z_r``; round r evaluates the examples
        with ``k_i > r`` under seed r, so each round is one (seed, weight) term.
        """
        index_of = self.index_of()
        pilot_seed = mix_seed(self.seed, self.draws, 0)
        pair = self.evaluate(closure, pilot_seed, index_of=index_of, per_example=True, indices=None)
        if pair is None:
            return None, None, None
        plus, minus = pair
        if plus.dim() != 1:
            raise ValueError("with query_allocator the closure must return per-example losses (a 1-D tensor, one "
                             f"loss per example), got a tensor of shape {tuple(plus.shape)}")
        pilot = ((plus - minus) / (2.0 * self.eps)).flatten()
        n = pilot.numel()
        counts = torch.as_tensor(self.query_allocator(pilot.square().numpy()), dtype=torch.int64).flatten()
        if counts.numel() != n or int(counts.min()) < 1:
            raise ValueError(
                f"query_allocator must return {n} counts >= 1 (one per example), got {counts.tolist()}"
            )
        per_round = [(pilot_seed, pilot)]
        losses = [((plus + minus) / 2).mean()]
        for r in range(1, int(counts.max())):
            indices = torch.nonzero(counts > r).flatten()
            seed = mix_seed(self.seed, self.draws, r)
            pair = self.evaluate(closure, seed, index_of=index_of, per_example=True, indices=indices)
            if pair is None:
                return None, None, None
            c = torch.zeros(n, dtype=torch.float64)
            c[indices] = ((pair[0] - pair[1]) / (2.0 * self.eps)).flatten()
            per_round.append((seed, c))
            losses.append(((pair[0] + pair[1]) / 2).mean())
        weights = 1.0 / counts.to(torch.float64)
        seeds = [seed for seed, _ in per_round]
        grads = [float((c * weights).sum() / n) for _, c in per_round]
        return seeds, grads, torch.stack(losses).mean().to(torch.float32)

    # ---- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Torch optimizer state plus ``zo``: counters, momentum window and the log since the last full save."""
        state = state_check.tag_state_dict(super().state_dict(), self)
        state["zo"] = {
            "draws": self.draws,
            "steps": self.steps,
            "skipped": self.skipped,
            "window": list(self.window),
            "log": list(self.log),
            "settings": self.rule_settings(),
        }
        return state

    def rule_settings(self) -> dict:
        """The update rule's settings that a loaded state must match: they decide what the saved
        window means (the rule, momentum, sign, the replayed window) and which directions the next
        steps draw (seed). Saved in the ``zo`` entry. ZOAdam's betas and eps pass, as the first-order
        optimizers' do."""
        rule = self.rule
        settings = {"seed": self.seed, "rule": type(rule).__name__}
        if isinstance(rule, SGDRule):
            settings.update(momentum=rule.momentum, sign=rule.sign, momentum_window=rule.window)
        return settings

    def check_state_dict(self, state_dict: dict) -> None:
        """Raise ``state_check.StateDictMismatch`` (one sentence) if ``state_dict`` does not fit this
        optimizer; change nothing. Checked: the class (tagged, or inferred), the group structure,
        the rule's settings (``rule_settings``; state dicts saved before they were recorded skip
        this), every moment's shape against its parameter (ZOAdam; ZOSGD keeps no tensors), and
        that every saved record has one lr and one weight decay per group and finite scalars.
        lr, weight_decay, eps and n_queries may change on resume."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
            state_check.refuse(self, "it is not an optimizer state dict (it needs 'state' and 'param_groups' entries)")
        zo = state_dict.get("zo")
        if not isinstance(zo, dict) or not {"draws", "steps", "skipped", "window", "log"} <= set(zo):
            state_check.check_class(self, state_dict)  # names the writer when its keys tell
            state_check.refuse(self, "it has no 'zo' entry with the counters, window and log, so it was not written by "
                                     "a zeroth-order optimizer")
        saved_groups = state_check.untag_groups(state_dict["param_groups"])
        state_check.check_loadable(self, state_dict, saved_groups, settings=lambda group: {}, spec=self._state_spec)
        saved = zo.get("settings", {})
        for key, value in self.rule_settings().items():
            if key in saved and saved[key] != value:
                state_check.refuse(self, f"its {key} is {saved[key]!r} in the state dict and {value!r} in this optimizer; "
                                         "build the optimizer with the saved value to resume this state")
        for name in ("window", "log"):
            for index, record in enumerate(zo[name]):
                try:
                    check_record(record, len(self.param_groups))
                except (ValueError, FloatingPointError) as err:
                    state_check.refuse(self, f"record {index} of its {name} is not usable: {err}")

    def _state_spec(self, param: torch.Tensor, group: dict) -> dict[str, state_check.Expect]:
        if isinstance(self.rule, AdamRule) and param.requires_grad:
            moment = state_check.Expect(shape=tuple(param.shape), why="the parameter's shape")
            return {"exp_avg": moment, "exp_avg_sq": moment}
        why = f"{type(self).__name__} keeps no per-parameter tensors here"
        return {"exp_avg": state_check.Expect(absent=True, why=why),
                "exp_avg_sq": state_check.Expect(absent=True, why=why)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict that ``check_state_dict`` accepts; else nothing changes."""
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict, param_groups=state_check.untag_groups(state_dict["param_groups"]))
        zo = state_dict.pop("zo")
        super().load_state_dict(state_dict)
        self.draws, self.steps, self.skipped = int(zo["draws"]), int(zo["steps"]), int(zo["skipped"])
        self.window, self.log = list(zo["window"]), list(zo["log"])


class ZOSGD(ZerothOrderOptimizer):
    """MeZO's ZO-SGD; ``sign=True`` gives ZO-signSGD; ``momentum`` is replayed from seeds (no buffer).

    Memory: no state tensors. A step holds a forward pass plus one perturbed copy of the parameters
    of the module running, and during the update at most two tensors the size of one parameter.
    Momentum regenerates ``z`` for the last K = ceil(log(momentum_tol)/log(momentum)) steps (or
    ``momentum_window``) for every parameter at every step: K times the generation cost, no memory.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        momentum: float = 0.0,
        sign: bool = False,
        n_queries: int = 1,
        weight_decay: float = 0.0,
        seed: int = 0,
        perturbation: str = "hook",
        query_allocator: Callable | None = None,
        momentum_window: int | None = None,
        momentum_tol: float = 1e-3,
    ):
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if not 0.0 < momentum_tol < 1.0:
            raise ValueError(f"momentum_tol must be in (0, 1), got {momentum_tol!r}")
        if momentum_window is not None and (not isinstance(momentum_window, int) or momentum_window < 1):
            raise ValueError(f"momentum_window must be an integer >= 1 or None, got {momentum_window!r}")
        window = momentum_window or window_for_momentum(momentum, momentum_tol)
        if momentum == 0.0:
            window = 1
        rule = SGDRule(momentum=float(momentum), sign=bool(sign), window=window)
        super().__init__(
            params, rule, lr=lr, eps=eps, weight_decay=weight_decay, n_queries=n_queries, seed=seed,
            perturbation=perturbation, query_allocator=query_allocator,
        )


class ZOAdam(ZerothOrderOptimizer):
    """Adam on the ZO gradient estimate. Keeps two full-size moments per parameter, so it loses the
    inference-memory advantage of ZO-SGD (its state is twice the model, like first-order Adam)."""

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        eps: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        n_queries: int = 1,
        weight_decay: float = 0.0,
        seed: int = 0,
        perturbation: str = "hook",
        query_allocator: Callable | None = None,
    ):
        betas = tuple(betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {adam_eps!r}")
        super().__init__(
            params, AdamRule(betas=betas, adam_eps=adam_eps), lr=lr, eps=eps, weight_decay=weight_decay,
            n_queries=n_queries, seed=seed, perturbation=perturbation, query_allocator=query_allocator,
        )
