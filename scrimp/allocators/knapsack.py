"""Multiple-choice knapsack: pick one option per item, total integer cost within a budget, maximum value.

    from scrimp.allocators import solve
    alloc = solve(costs=[[1, 2, 4], [1, 3]], values=[[0.2, 0.5, 0.6], [0.1, 0.9]], budget=5)
    alloc.choice, alloc.value, alloc.optimal, alloc.bound

It generalizes the count-allocation DP of Knapsack RL (Li et al., 2025, github.com/liziniu/KnapsackRL),
which gives each prompt a number of rollouts with a numba loop over (item, budget, count). Here:
- options are arbitrary (cost, value) pairs, ragged per item, not only "k samples at cost k";
- the exact DP is numpy-vectorized over the budget axis (one shifted-array max per option);
- a certified greedy on each item's upper concave hull answers concave instances in milliseconds and
  proves optimality with the LP bound; a Lagrangian method handles instances too large for the DP;
- every non-exact answer carries a certified upper bound, so the caller knows how far from optimal it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scrimp.checks import check_integer

# Work (items x options x budget cells) and table bytes above which `auto` avoids the DP.
DP_MAX_WORK = 3e8
DP_MAX_TABLE_BYTES = 1 << 30
_REL_TOL = 1e-9


@dataclass
class Allocation:
    """A solution: option index per item, its value and cost, and how good it provably is.

    ``bound`` is a certified upper bound on the optimum (equal to ``value`` when ``optimal``) and
    ``gap = bound - value``. ``counts`` is filled by ``allocate_counts`` (samples per item).
    """

    choice: np.ndarray
    value: float
    cost: int
    method: str
    optimal: bool
    bound: float | None = None
    gap: float | None = None
    counts: np.ndarray | None = None


@dataclass
class _Problem:
    costs: np.ndarray  # (n, m) int64; padded entries are 0
    values: np.ndarray  # (n, m) float64; padded entries are -inf
    valid: np.ndarray  # (n, m) bool
    budget: int
    min_cost: np.ndarray  # (n,) cheapest allowed option per item


# ----------------------------------------------------------------------------------------- input


def _as_rows(name: str, data) -> list[np.ndarray]:
    if isinstance(data, np.ndarray):
        if data.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array (items x options) or a list of lists; got ndim={data.ndim}")
        return list(data)
    if not isinstance(data, Sequence) or isinstance(data, str | bytes):
        raise TypeError(f"{name} must be a 2-D numpy array or a list of per-item lists; got {type(data).__name__}")
    return [np.asarray(row) for row in data]


def _validate(costs, values, budget, min_choice, max_choice) -> _Problem:
    if isinstance(costs, np.ndarray) and isinstance(values, np.ndarray) and costs.ndim == values.ndim == 2:
        if costs.shape != values.shape:
            raise ValueError(f"costs and values must have the same shape; got {costs.shape} and {values.shape}")
        # Dense fast path: one row per item, no padding.
        cost_rows, value_rows = [costs.reshape(-1)], [values.reshape(-1)]
        dense_shape = costs.shape
    else:
        cost_rows, value_rows = _as_rows("costs", costs), _as_rows("values", values)
        dense_shape = None
    if len(cost_rows) == 0:
        raise ValueError("costs must have at least one item; got none")
    if len(cost_rows) != len(value_rows):
        raise ValueError(f"costs and values must have the same number of items; got {len(cost_rows)} and {len(value_rows)}")
    n = len(cost_rows) if dense_shape is None else dense_shape[0]
    widths = np.array([np.size(r) for r in cost_rows]) if dense_shape is None else np.full(n, dense_shape[1])
    if dense_shape is not None and (n == 0 or dense_shape[1] == 0):
        raise ValueError(f"costs and values must have at least one item and one option; got shape {dense_shape}")
    for i, (c, v) in enumerate(zip(cost_rows, value_rows) if dense_shape is None else ()):
        if c.ndim != 1 or v.ndim != 1:
            raise ValueError(f"costs[{i}] and values[{i}] must be flat lists of options")
        if c.size != v.size:
            raise ValueError(f"costs[{i}] has {c.size} options but values[{i}] has {v.size}; they must match item by item")
        if c.size == 0:
            raise ValueError(f"item {i} has no options; every item needs at least one")
    m = int(widths.max())
    valid = np.ones((n, m), dtype=bool) if dense_shape is not None else np.arange(m)[None, :] < widths[:, None]
    flat_c = cost_rows[0] if dense_shape is not None else np.concatenate(cost_rows)
    flat_v = value_rows[0] if dense_shape is not None else np.concatenate(value_rows)
    if flat_c.dtype.kind not in "iuf" or flat_v.dtype.kind not in "iufb":
        raise TypeError("costs must be integers and values must be real numbers")
    if flat_c.dtype.kind == "f" and (not np.all(np.isfinite(flat_c)) or np.any(flat_c != np.round(flat_c))):
        raise ValueError("costs must be non-negative integers; got a non-integer cost")
    if np.any(flat_c < 0):
        raise ValueError(f"costs must be non-negative integers; got {flat_c.min()}")
    # Costs are summed in int64: the items' largest costs (exactly, in Python ints) must stay below 2**63.
    if sum(int(c) for c in np.maximum.reduceat(flat_c, np.cumsum(widths) - widths).tolist()) >= 2**63:
        raise ValueError("costs must add up to less than 2**63 over the items' largest options (the solver sums "
                         "them in int64); scale them down")
    flat_v = flat_v.astype(np.float64, copy=False)
    if not np.isfinite(flat_v).all():
        if np.isnan(flat_v).any():
            raise ValueError(f"values contain NaN ({int(np.isnan(flat_v).sum())} entries); every option needs a real value")
        raise ValueError("values must be finite; got an infinite value")
    if dense_shape is not None:
        C = flat_c.astype(np.int64, copy=False).reshape(dense_shape)
        V = flat_v.reshape(dense_shape)
    else:
        C = np.zeros((n, m), dtype=np.int64)
        V = np.full((n, m), -np.inf)
        C[valid] = flat_c.astype(np.int64)
        V[valid] = flat_v
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer):
        if not (isinstance(budget, float | np.floating) and float(budget).is_integer()):
            raise TypeError(f"budget must be a non-negative integer; got {budget!r}")
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"budget must be a non-negative integer; got {budget}")
    if min_choice is not None or max_choice is not None:
        valid = valid & _choice_mask(min_choice, max_choice, widths, n, m)
    min_cost = C.min(axis=1) if valid.all() else np.where(valid, C, np.iinfo(np.int64).max).min(axis=1)
    need = int(min_cost.sum())
    if budget < need:
        raise ValueError(
            f"budget {budget} is below the sum of the items' minimum costs ({need}) by {need - budget}; "
            "no selection of one option per item fits"
        )
    return _Problem(C, V, valid, budget, min_cost)


def _choice_index(name: str, value, default: np.ndarray, n: int) -> np.ndarray:
    if value is None:
        return default
    arr = np.asarray(value)
    if arr.ndim and arr.shape != (n,):
        raise ValueError(f"{name} must be one option index or one per item, {n} in all; got shape {arr.shape}")
    return np.broadcast_to(arr, (n,))


def _choice_mask(min_choice, max_choice, widths, n, m) -> np.ndarray:
    lo = _choice_index("min_choice", min_choice, np.zeros(n, dtype=np.int64), n)
    hi = _choice_index("max_choice", max_choice, widths - 1, n)
    if lo.dtype.kind not in "iu" or hi.dtype.kind not in "iu":
        raise TypeError("min_choice and max_choice must be integer option indices (scalar or one per item)")
    if np.any(lo < 0) or np.any(hi >= widths) or np.any(lo > hi):
        bad = int(np.flatnonzero((lo < 0) | (hi >= widths) | (lo > hi))[0])
        raise ValueError(
            f"min_choice/max_choice for item {bad} is [{lo[bad]}, {hi[bad]}], but it must be a non-empty "
            f"range inside the item's option indices 0..{widths[bad] - 1}"
        )
    j = np.arange(m)[None, :]
    return (j >= lo[:, None]) & (j <= hi[:, None])


def _allocation(p: _Problem, choice: np.ndarray, method: str, bound: float | None) -> Allocation:
    rows = np.arange(len(choice))
    value = float(p.values[rows, choice].sum())
    cost = int(p.costs[rows, choice].sum())
    if bound is None:
        return Allocation(choice, value, cost, method, True, value, 0.0)
    bound = max(bound, value)  # rounding in the bound's own sum must not make it look invalid
    gap = bound - value
    return Allocation(choice, value, cost, method, gap <= _REL_TOL * max(1.0, abs(value)), bound, gap)


# ------------------------------------------------------------------------------------------- DP


def _dp_work(p: _Problem) -> tuple[float, float]:
    slack = p.budget - int(p.min_cost.sum())
    return float(p.valid.sum()) * (slack + 1), 8.0 * (len(p.min_cost) + 1) * (slack + 1)


def _solve_dp(p: _Problem) -> Allocation:
    """Exact DP over the budget with every cost shifted by the item's cheapest option.

    ``best[t][b]`` is the best value of items < t with shifted cost at most b. Per item, a max over
    options of shifted copies of the previous row; only the window of budgets that are both reachable
    from the left and still useful for the right is computed.
    """
    n = len(p.min_cost)
    slack = p.budget - int(p.min_cost.sum())
    shifted = p.costs - p.min_cost[:, None]
    span = np.where(p.valid, shifted, 0).max(axis=1)
    reach = np.minimum(np.cumsum(span), slack)  # highest budget worth computing after item t
    rest = np.concatenate([np.cumsum(span[::-1])[::-1][1:], [0]])  # spans of items after t
    low = np.maximum(slack - rest, 0)  # lowest budget item t can be left with in any final solution
    table = np.zeros((n + 1, slack + 1))
    tmp = np.empty(slack + 1)
    for t in range(n):
        prev, row = table[t], table[t + 1]
        lo, hi = int(low[t]), int(reach[t])
        width = hi - lo + 1
        out = row[lo : hi + 1]
        out.fill(-np.inf)
        for j in np.flatnonzero(p.valid[t]):
            c = int(shifted[t, j])
            start = max(lo, c)
            if start > hi:
                continue
            k = hi + 1 - start
            np.add(prev[start - c : hi + 1 - c], p.values[t, j], out=tmp[:k])
            seg = out[start - lo : width]
            np.maximum(seg, tmp[:k], out=seg)
        row[hi + 1 :] = row[hi]  # "cost at most b": flat beyond the reachable range
    # Backtrack: at item t with budget b, find an option that attains the table entry.
    choice = np.empty(n, dtype=np.int64)
    b = slack
    for t in range(n - 1, -1, -1):
        opts = np.flatnonzero(p.valid[t] & (shifted[t] <= b))
        cand = table[t][b - shifted[t, opts]] + p.values[t, opts]
        j = opts[int(np.argmax(cand))]
        choice[t] = j
        b -= int(shifted[t, j])
    return _allocation(p, choice, "dp", None)


# --------------------------------------------------------------------------------------- greedy


@dataclass
class _Hulls:
    pos: np.ndarray  # (n, m) original option index, columns sorted by cost
    cost: np.ndarray  # (n, m) int64 sorted
    value: np.ndarray  # (n, m) float64 sorted
    vertex: np.ndarray  # flat (row-major) indices into (n, m) of the hull vertices, in order
    vertex_row: np.ndarray  # the item of each vertex
    concave: np.ndarray  # (n,) every Pareto-optimal option is on the hull (up to rounding)


def _concave_dense_hulls(p: _Problem) -> _Hulls | None:
    """The common case in 2-D: options sorted by strictly increasing cost, values concave in cost.

    Then the hull is every option up to the last one with a positive slope before it. Returns None
    when the case does not apply (the general path decides then).
    """
    n, m = p.costs.shape
    dc = np.diff(p.costs, axis=1)
    if not np.all(dc > 0):
        return None
    slope = np.diff(p.values, axis=1) / dc
    # Slopes may rise by rounding only: |error| <= a few ulps of the values over a cost step >= 1.
    tol = 1e-12 * np.abs(p.values).max(axis=1, keepdims=True)
    if not np.all(np.diff(slope, axis=1) <= tol):
        return None
    on = np.empty((n, m), dtype=bool)
    on[:, 0] = True
    on[:, 1:] = slope > 0  # concave: positive slopes come first
    vertex = np.flatnonzero(on)
    order = np.broadcast_to(np.arange(m), (n, m))
    return _Hulls(order, p.costs, p.values, vertex, vertex // m, np.ones(n, dtype=bool))


def _hulls(p: _Problem) -> _Hulls:
    """Upper concave hull of each item's (cost, value) options, vectorized over items.

    Pareto filter (cheaper or better), then repeated removal of every vertex that lies strictly below
    the chord of its neighbours (such a point can never be a hull vertex, so removing all at once is safe).
    Work is on the flat list of surviving points, so each pass is one vectorized sweep.
    """
    n, m = p.costs.shape
    big = np.iinfo(np.int64).max
    all_valid = bool(p.valid.all())
    if all_valid and m > 1:
        fast = _concave_dense_hulls(p)
        if fast is not None:
            return fast
    key = p.costs if all_valid else np.where(p.valid, p.costs, big)
    vals = p.values if all_valid else np.where(p.valid, p.values, -np.inf)
    step = np.diff(key, axis=1)
    distinct = bool(np.all(step > 0))
    if distinct:  # already sorted by cost (the "k samples" case): skip the sort
        order = np.broadcast_to(np.arange(m), (n, m))
        cost, value = key, vals
    else:
        order = np.lexsort((vals, key), axis=-1)
        cost = np.take_along_axis(key, order, axis=1)
        value = np.take_along_axis(vals, order, axis=1)
    last_of_cost = np.ones((n, m), dtype=bool) if all_valid and distinct else cost != big
    if not distinct:
        last_of_cost[:, :-1] &= cost[:, 1:] != cost[:, :-1]
    reps = value if all_valid and distinct else np.where(last_of_cost, value, -np.inf)
    # Running max along items' options, computed option-major so each step is one contiguous sweep.
    running = np.maximum.accumulate(np.ascontiguousarray(reps.T), axis=0)
    best_before = np.empty((n, m))
    best_before[:, 0] = -np.inf
    best_before[:, 1:] = running[:-1].T
    rows, cols = np.nonzero(last_of_cost & (value > best_before))  # Pareto-optimal options, row-major
    points = rows * m + cols
    pc = cost[rows, cols].astype(np.float64)
    pv = value[rows, cols]
    alive = np.ones(points.size, dtype=bool)
    concave = np.ones(n, dtype=bool)
    idx = None  # surviving points of the items still changing (None: all, without a gather)
    while True:
        r, c, v = (rows, pc, pv) if idx is None else (rows[idx], pc[idx], pv[idx])
        same = r[1:] == r[:-1]
        inner = same[:-1] & same[1:]
        dv, dc = np.diff(v), np.diff(c)
        left = dv[:-1] * dc[1:]  # slope in, cross-multiplied
        right = dv[1:] * dc[:-1]  # slope out
        reflex = inner & (left < right)
        if not reflex.any():
            break
        ri = np.flatnonzero(reflex)  # the dented point is ri + 1
        # Rounding-level dents (e.g. 1-(1-p)^k at p near 1) do not make an item non-concave.
        slack = 1e-12 * (np.abs(v[ri]) + np.abs(v[ri + 1]) + np.abs(v[ri + 2])) * (c[ri + 2] - c[ri])
        concave[r[ri + 1][left[ri] < right[ri] - slack]] = False
        if idx is None:
            idx = np.arange(points.size)
        alive[idx[ri + 1]] = False
        changed = np.zeros(n, dtype=bool)
        changed[r[ri + 1]] = True
        idx = idx[alive[idx] & changed[r]]  # only items that lost a point can lose another
    return _Hulls(order, cost, value, points[alive], rows[alive], concave)


def _solve_greedy(p: _Problem, hulls: _Hulls | None = None) -> Allocation:
    """Marginal-gain greedy over hull segments, sorted by efficiency (value per unit cost) at once.

    Exact for concave items with unit cost steps; in general it carries the LP (hull) bound.
    """
    h = hulls if hulls is not None else _hulls(p)
    n = len(p.min_cost)
    slack = p.budget - int(p.min_cost.sum())
    cost, value = h.cost.ravel(), h.value.ravel()
    same = h.vertex_row[1:] == h.vertex_row[:-1]  # consecutive vertices of one item form a segment
    dc = (cost[h.vertex[1:]] - cost[h.vertex[:-1]])[same]
    dv = (value[h.vertex[1:]] - value[h.vertex[:-1]])[same]
    seg_item = h.vertex_row[1:][same]
    neg_eff = -dv / dc
    # Division may undo the hull's cross-multiplied order by an ulp; restore it within each item so that
    # the stable sort below never takes a segment before its predecessor.
    while True:
        bad = np.flatnonzero((seg_item[1:] == seg_item[:-1]) & (neg_eff[1:] < neg_eff[:-1]))
        if bad.size == 0:
            break
        neg_eff[bad + 1] = neg_eff[bad]
    # Each segment costs >= 1, so the taken prefix plus the first misfit lie among the slack+1 best.
    if neg_eff.size > slack + 1:
        threshold = np.partition(neg_eff, slack)[slack]
        cand = np.flatnonzero(neg_eff <= threshold)
    else:
        cand = np.arange(neg_eff.size)
    ordered = cand[np.argsort(neg_eff[cand], kind="stable")]  # stable keeps each item's hull order
    spent = np.cumsum(dc[ordered])
    n_take = int(np.searchsorted(spent, slack, side="right"))
    taken = ordered[:n_take]
    steps = np.bincount(seg_item[taken], minlength=n)
    first = np.searchsorted(h.vertex_row, np.arange(n))  # each item's first (cheapest, best) vertex
    reached = h.vertex[first + steps]
    choice = h.pos[np.arange(n), reached % h.pos.shape[1]]
    used = int(spent[n_take - 1]) if n_take else 0
    bound_extra = float(-neg_eff[ordered[n_take]] * (slack - used)) if n_take < ordered.size else 0.0
    bound = float(value[h.vertex[first]].sum()) + float(dv[taken].sum()) + bound_extra
    alloc = _allocation(p, choice, "greedy", bound)
    # Without concavity the greedy's promise is void; the bound still holds and is reported.
    alloc.optimal = bool(alloc.optimal and h.concave.all())
    return alloc


# ------------------------------------------------------------------------------------- lagrange


def _best_response(p: _Problem, lam: float) -> tuple[np.ndarray, float]:
    score = np.where(p.valid, p.values - lam * p.costs, -np.inf)
    top = score.max(axis=1)
    near = score >= top[:, None] - _REL_TOL * np.maximum(1.0, np.abs(top))[:, None]
    choice = np.where(near, p.costs, np.iinfo(np.int64).max).argmin(axis=1)  # cheapest among the best
    return choice, float(lam * p.budget + top.sum())


def _solve_lagrange(p: _Problem, iterations: int = 60) -> Allocation:
    """Lagrangian relaxation of the budget with bisection on the multiplier lambda >= 0.

    For any lambda, ``lambda*B + sum_i max_j (v_ij - lambda*c_ij)`` bounds the optimum from above;
    bisection finds the smallest lambda whose best response fits, then leftover budget is filled by
    switching the items that change at the threshold, best ratio first.
    """
    rows = np.arange(len(p.min_cost))

    def cost_of(choice):
        return int(p.costs[rows, choice].sum())

    lo_choice, bound = _best_response(p, 0.0)
    if cost_of(lo_choice) <= p.budget:
        return _allocation(p, lo_choice, "lagrange", bound)
    finite = p.values[p.valid]
    lam_lo, lam_hi = 0.0, float(finite.max() - finite.min()) + 1.0  # above it, everyone takes the cheapest
    hi_choice, hi_bound = _best_response(p, lam_hi)
    bound = min(bound, hi_bound)
    for _ in range(iterations):
        lam = 0.5 * (lam_lo + lam_hi)
        choice, b = _best_response(p, lam)
        bound = min(bound, b)
        if cost_of(choice) <= p.budget:
            lam_hi, hi_choice = lam, choice
        else:
            lam_lo, lo_choice = lam, choice
        if lam_hi - lam_lo <= 1e-12 * max(1.0, lam_hi):
            break
    # Fill: move items from the feasible to the infeasible response while it fits, best gain per cost.
    choice = hi_choice.copy()
    extra = p.costs[rows, lo_choice] - p.costs[rows, hi_choice]
    gain = p.values[rows, lo_choice] - p.values[rows, hi_choice]
    movable = np.flatnonzero((extra > 0) & (gain > 0))
    movable = movable[np.argsort(-gain[movable] / extra[movable], kind="stable")]
    room = p.budget - cost_of(choice)
    fits = movable[np.cumsum(extra[movable]) <= room]
    choice[fits] = lo_choice[fits]
    return _allocation(p, choice, "lagrange", bound)


# ----------------------------------------------------------------------------------------- public


def solve(costs, values, budget, min_choice=None, max_choice=None, method: str = "auto") -> Allocation:
    """Solve the multiple-choice knapsack: exactly one option per item, total cost <= budget, max value.

    Generalizes Knapsack RL's rollout-allocation DP (liziniu/KnapsackRL), which handles only
    "k samples at cost k" with a numba triple loop; this takes arbitrary ragged integer costs and real
    values, and offers:
      - ``"dp"``: exact, numpy-vectorized over the budget (a max of shifted rows per option);
      - ``"greedy"``: marginal gains on each item's upper concave hull, all sorted at once; ``optimal``
        is True only when every item is concave and the LP bound is attained (always, for unit steps);
      - ``"lagrange"``: bisection on the budget multiplier, for instances too large for the DP;
      - ``"auto"``: the greedy when it certifies optimality, else the DP when it is small enough
        (``DP_MAX_WORK`` cells, ``DP_MAX_TABLE_BYTES``), else the better of greedy and lagrange.
    Non-exact answers carry a certified upper bound ``bound`` and ``gap = bound - value``.

    costs, values: ragged lists of per-item lists, or 2-D arrays (items x options); costs non-negative
    integers, values finite. min_choice, max_choice: inclusive option-index range allowed per item
    (scalar or one per item). budget: non-negative integer, at least the sum of the minimum costs.
    """
    if method not in ("auto", "dp", "greedy", "lagrange"):
        raise ValueError(f"method must be one of 'auto', 'dp', 'greedy', 'lagrange'; got {method!r}")
    p = _validate(costs, values, budget, min_choice, max_choice)
    if method == "dp":
        work, table_bytes = _dp_work(p)
        if table_bytes > 4 * DP_MAX_TABLE_BYTES:
            raise ValueError(
                f"method='dp' would need a {table_bytes / 2**30:.1f} GiB table (items x budget slack); "
                "use method='greedy' or 'lagrange' for an instance this large"
            )
        return _solve_dp(p)
    if method == "lagrange":
        return _solve_lagrange(p)
    hulls = _hulls(p)
    greedy = _solve_greedy(p, hulls)
    if method == "greedy" or greedy.optimal:
        return greedy
    work, table_bytes = _dp_work(p)
    if work <= DP_MAX_WORK and table_bytes <= DP_MAX_TABLE_BYTES:
        return _solve_dp(p)
    lagrange = _solve_lagrange(p)
    best = lagrange if lagrange.value > greedy.value else greedy
    bound = min(greedy.bound, lagrange.bound)
    return _allocation(p, best.choice, best.method, bound)


def allocate_counts(utility, params, budget, k_min: int = 1, k_max: int | None = None, method: str = "auto") -> Allocation:
    """Give each item a number of samples k in [k_min, k_max] (cost k) maximizing the summed utility.

    The Knapsack RL setting (liziniu/KnapsackRL: rollouts per prompt under a total rollout budget),
    but with any vectorized utility, including expectations under a posterior (see
    ``scrimp.allocators.posterior``) instead of a point estimate of the success rate.

    utility(k, params) is called with k an int array of shape (1, K) and must return (n_items, K);
    params is passed through unchanged. k_max defaults to the most one item can get:
    budget - (n_items - 1) * k_min, as long as the utility table stays below ``DP_MAX_TABLE_BYTES``
    (else pass k_max). The result's ``counts`` is the samples per item.
    """
    k_min, budget = check_integer("k_min", k_min, 0), check_integer("budget", budget, 0)
    check_integer("k_max", k_max, k_min, minimum_name="k_min", optional=True)
    # Probe at k = 1 where allowed (a utility may be undefined at 0), but never beyond k_max.
    probe_k = max(k_min, 1) if k_max is None or k_max >= 1 else k_min
    probe = np.asarray(utility(np.array([[probe_k]]), params))
    if probe.ndim != 2 or probe.shape[1] != 1:
        raise ValueError(
            f"utility(k, params) must return shape (n_items, K) for k of shape (1, K); got {probe.shape} for "
            "K=1 (give per-item parameters shape (n_items, 1), e.g. p[:, None])"
        )
    n = probe.shape[0]
    if n * k_min > budget:
        raise ValueError(
            f"budget {budget} is below the sum of the items' minimum costs ({n * k_min} = {n} items x k_min) "
            f"by {n * k_min - budget}"
        )
    if k_max is None:
        k_max = budget - (n - 1) * k_min
        table_bytes = 8.0 * n * (k_max - k_min + 1)
        if table_bytes > DP_MAX_TABLE_BYTES:
            raise ValueError(f"k_max was not given and defaults to budget - (n_items - 1) * k_min = {k_max}, a "
                             f"utility table of {table_bytes / 2**30:.1f} GiB; pass k_max, the most samples one "
                             "item may get")
    ks = np.arange(k_min, int(k_max) + 1)[None, :]
    vals = np.asarray(utility(ks, params), dtype=np.float64)
    if vals.shape != (n, ks.shape[1]):
        raise ValueError(f"utility(k, params) must return shape {(n, ks.shape[1])} for k of shape {ks.shape}; got {vals.shape}")
    alloc = solve(np.broadcast_to(ks, vals.shape), vals, budget, method=method)
    alloc.counts = ks[0, alloc.choice]
    return alloc
