"""Memory planning without the device: peak estimate of a training step, tier placement, static arenas.

    from scrimp.allocators.memory_plan import estimate_peak, plan_arena, plan_placement
    est = estimate_peak(lambda: build_model("llama_60m"),
                        lambda m: torch.optim.AdamW(m.parameters()),
                        lambda: torch.randint(0, 32000, (4, 256)), device="cuda")
    est.peak_bytes, est.by_category                  # what one GPU step would hold at its peak
    arena = plan_arena(est.trace)                    # static offsets for the same tensors

``estimate_peak`` follows xMem (estimating GPU memory of a training step on the CPU before the job runs)
but replays the real step on meta tensors instead of a learned or analytic model; ``plan_arena``
follows STAlloc's offline static planning of allocation offsets; ``plan_placement`` is the
ZeRO-Offload/Infinity tier choice (device, pinned CPU, disk) cast as a knapsack solved by
``scrimp.allocators.knapsack.solve``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from scrimp.allocators.knapsack import solve

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")

CUDA_BLOCK = 512  # the caching allocator rounds every block to a multiple of 512 bytes
CUDA_SMALL_SIZE = 1 << 20  # blocks up to 1 MiB come from the small pool, in 2 MiB segments
CUDA_SEGMENT = 2 << 20  # larger blocks live in segments rounded up to 2 MiB


def cuda_block_bytes(nbytes: np.ndarray | int) -> np.ndarray:
    """Bytes the CUDA caching allocator reports as allocated for a request (512-byte rounding, 0 stays 0)."""
    n = np.asarray(nbytes, dtype=np.int64)
    return ((n + CUDA_BLOCK - 1) // CUDA_BLOCK) * CUDA_BLOCK


def cuda_segment_bytes(block_bytes: np.ndarray) -> int:
    """Lower bound on reserved segment bytes holding these live blocks at once.

    Small blocks (<= 1 MiB) pack into 2 MiB segments; each large block needs a segment rounded up to
    2 MiB (PyTorch's CUDACachingAllocator; it may reserve more through fragmentation and its 20 MiB
    segments for 1-10 MiB requests, so this is a floor, not the nvidia-smi number).
    """
    b = np.asarray(block_bytes, dtype=np.int64)
    small = int(b[b <= CUDA_SMALL_SIZE].sum())
    large = b[b > CUDA_SMALL_SIZE]
    segments = -(-small // CUDA_SEGMENT) * CUDA_SEGMENT
    return int(segments + (-(-large // CUDA_SEGMENT) * CUDA_SEGMENT).sum())


# ------------------------------------------------------------------------------------- tracing


@dataclass
class PeakEstimate:
    """What a training step holds on its device, from a meta-tensor replay of the step.

    peak_bytes: highest live bytes (rounded as on ``device``); by_category: the live bytes of each
    category at that moment; peak_phase: e.g. "step 2 backward"; timeline: live bytes after each op;
    trace: (size, alloc_time, free_time) per tensor, ready for ``plan_arena``; segment_bytes: floor on
    CUDA reserved segments at the peak (``device="cuda"`` only).
    """

    device: str
    peak_bytes: int
    by_category: dict[str, int]
    peak_phase: str
    timeline: np.ndarray
    trace: np.ndarray
    categories: list[str]
    segment_bytes: int | None = None
    phases: list[tuple[int, str]] = field(default_factory=list)


class _LiveBytesTracker:
    """TorchDispatchMode body: records each new storage an op returns and when Python frees it."""

    def __init__(self):
        self.clock = 0
        self.records: list[list] = []  # [nbytes, alloc_time, free_time (-1 live), phase, category]
        self.live: dict[int, int] = {}  # id(storage) -> record index
        self._refs: dict[int, weakref.ref] = {}
        self.phase = "setup"

    def add(self, tensor, category: str | None = None) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live:
            if category is not None:
                self.records[self.live[key]][4] = category
            return
        index = len(self.records)
        self.records.append([storage.nbytes(), self.clock, -1, self.phase, category])
        self.live[key] = index

        def freed(_ref, key=key, index=index):
            # Freed after the op that started at `clock` began: live through that op.
            self.records[index][2] = self.clock + 1
            if self.live.get(key) == index:
                del self.live[key]
                self._refs.pop(key, None)

        self._refs[key] = weakref.ref(storage, freed)

    def label(self, tensors, category: str) -> None:
        for t in tensors:
            index = self.live.get(id(t.untyped_storage()))
            if index is not None:
                self.records[index][4] = category


def _make_mode(tracker: _LiveBytesTracker):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tracker.clock += 1
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                tracker.add(t)
            return out

    return _Mode()


def _scalars_on_cpu():
    """A mode in which ``torch.tensor(<python number>)`` without a device lands on the CPU, not on meta.

    torch's optimizers keep their step counter as such a CPU scalar and read it with ``.item()``.
    torch 2.13 passes ``device="cpu"`` itself; torch 2.11 did not, so under the meta default device
    its Adam made a meta counter and ``.item()`` failed (seen on an H200 image, 2026-11-27). This
    gives every version the 2.13 placement; tensors built from other tensors stay on meta.
    """
    import numbers

    import torch
    from torch.overrides import TorchFunctionMode

    class _Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if (func is torch.tensor and kwargs.get("device") is None and args
                    and isinstance(args[0], numbers.Number)):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    return _Mode()


def _state_tensors(optimizer):
    import torch

    stack = list(optimizer.state.values())
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _follow_cuda_defaults(optimizer) -> None:
    """On CUDA, torch optimizers left at ``foreach=None`` run their foreach kernels (list-sized
    temporaries); on meta tensors they would not, so the trace asks for them explicitly."""
    for group in getattr(optimizer, "param_groups", []):
        if "foreach" in group and group["foreach"] is None and not group.get("fused") and not group.get("differentiable"):
            group["foreach"] = True


def _default_loss(model, batch):
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, tuple | list):
        out = model(*batch)
    elif hasattr(model, "config") and hasattr(model.config, "vocab_size"):  # a transformers causal LM
        out = model(input_ids=batch, labels=batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", out)
    if loss is None or loss.ndim != 0:
        raise ValueError("the model's output is not a scalar loss; pass loss_fn(model, batch) -> scalar tensor")
    return loss


def estimate_peak(
    model_fn: Callable,
    optimizer_fn: Callable,
    batch_fn: Callable,
    device: str = "cuda",
    loss_fn: Callable | None = None,
    steps: int = 2,
) -> PeakEstimate:
    """Peak bytes of a training step on ``device``, per category, without the device.

    Builds the model under ``torch.device("meta")``, then replays ``steps`` full steps (forward,
    backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``) under a TorchDispatchMode that
    records every storage an op creates and, via a weak reference, when it dies. Meta kernels give the
    real output shapes and autograd keeps the real lifetimes, so the live-bytes curve is the step's.
    Two steps by default: the second holds optimizer state created in the first (the steady state).

    Generalizes xMem (CPU-side estimation of a training job's GPU peak before launch): no
    profiling run on any device and no per-operator model; what it cannot see are allocations inside a
    kernel (workspaces, e.g. cuBLAS) and ops whose CUDA code path allocates differently from the
    meta one. For ``device="cuda"`` sizes are rounded to 512-byte blocks as
    ``torch.cuda.max_memory_allocated`` counts them, and torch optimizers left at ``foreach=None``
    are traced with their foreach kernels, the path CUDA takes; for ``"cpu"`` sizes are exact.

    model_fn() -> nn.Module; optimizer_fn(model) -> optimizer; batch_fn() -> tensor, tuple or dict
    (created on the meta device); loss_fn(model, batch) -> scalar (default: ``.loss`` of the output,
    with labels = input_ids for a transformers causal LM).
    """
    import torch

    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu'; got {device!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    for name, fn in (("model_fn", model_fn), ("optimizer_fn", optimizer_fn), ("batch_fn", batch_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable; got {type(fn).__name__}")
    loss_fn = loss_fn or _default_loss
    tracker = _LiveBytesTracker()
    with torch.device("meta"):
        model = model_fn()
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.add(t, "parameters")
        optimizer = optimizer_fn(model)
        if device == "cuda":
            _follow_cuda_defaults(optimizer)
        phases: list[tuple[int, str]] = []
        with _make_mode(tracker):
            tracker.phase = "batch"
            batch = batch_fn()
            for step in range(1, steps + 1):
                for name in ("forward", "backward", "optimizer", "zero_grad"):
                    phases.append((tracker.clock + 1, f"step {step} {name}"))
                    tracker.phase = name
                    if name == "forward":
                        loss = loss_fn(model, batch)
                    elif name == "backward":
                        loss.backward()
                        del loss
                        tracker.label([p.grad for p in model.parameters() if p.grad is not None], "gradients")
                    elif name == "optimizer":
                        with _scalars_on_cpu():
                            optimizer.step()
                        tracker.label(_state_tensors(optimizer), "optimizer_state")
                    else:
                        optimizer.zero_grad(set_to_none=True)
            end = tracker.clock + 1
            phases.append((end, "end"))
        del batch, optimizer, model
    return _summarize(tracker.records, phases, end, device)


def _summarize(records, phases, end, device) -> PeakEstimate:
    size = np.array([r[0] for r in records], dtype=np.int64)
    start = np.array([r[1] for r in records], dtype=np.int64)
    stop = np.array([end if r[2] < 0 else r[2] for r in records], dtype=np.int64)
    category = []
    for r, s in zip(records, stop):
        if r[4] is not None:
            category.append(r[4])
        elif r[3] in ("forward", "batch"):
            # A forward output still alive when the forward ended was saved for backward (or is the batch).
            ends = [t for t, name in phases if name.endswith("backward") and t > r[1]]
            category.append("activations" if not ends or s > min(ends) else "temporaries")
        else:
            category.append("temporaries")
    block = cuda_block_bytes(size) if device == "cuda" else size
    delta = np.zeros(end + 2, dtype=np.int64)
    np.add.at(delta, start, block)
    np.add.at(delta, stop, -block)
    timeline = np.cumsum(delta)[: end + 1]
    t_peak = int(np.argmax(timeline))
    live = (start <= t_peak) & (stop > t_peak)
    cats = np.array(category)
    by_category = {c: int(block[live & (cats == c)].sum()) for c in CATEGORIES}
    phase = "setup"
    for t, name in phases:
        if t <= t_peak:
            phase = name
    trace = np.stack([block, start, stop], axis=1)
    seg = cuda_segment_bytes(block[live]) if device == "cuda" else None
    return PeakEstimate(device, int(timeline[t_peak]), by_category, phase, timeline, trace, category, seg, phases)


# ------------------------------------------------------------------------------------ placement


@dataclass
class Placement:
    """Tier per tensor ("device", "pinned", "disk"), bytes per tier and estimated seconds moved per step."""

    tiers: dict[str, str]
    bytes_per_tier: dict[str, int]
    transfer_seconds: float
    bound_seconds: float | None  # certified lower bound on the transfer time (from the knapsack bound)


def plan_placement(
    tensors,
    device_budget: int,
    costs: Mapping[str, float],
    pinned_budget: int | None = None,
    granularity: int = 1 << 20,
) -> Placement:
    """Choose a tier per tensor to minimize the estimated transfer time per step under the device budget.

    tensors: mapping name -> (nbytes, bytes_moved_per_step_when_off_device), or a sequence of
    (name, nbytes, bytes_moved) tuples (for an optimizer state group, moved = read + write per step).
    costs: seconds per byte moved for "pinned" and "disk" (e.g. {"pinned": 1/20e9, "disk": 1/2e9}).
    pinned_budget: bytes of pinned host memory (None: unlimited, and disk is never needed).

    A multiple-choice knapsack over device bytes (counted in units of ``granularity`` bytes, sizes
    rounded up so the budget is never exceeded), solved by ``scrimp.allocators.knapsack.solve``; a
    pinned budget is handled by bisection on its Lagrange multiplier. Generalizes ZeRO-Offload /
    ZeRO-Infinity (which offload all optimizer state to one tier by rule) to a per-tensor optimum.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else [(t[0], *t[1:]) for t in tensors]
    if not items:
        raise ValueError("tensors must name at least one tensor")
    names = [str(name) for name, *_ in items]
    rows = []
    for name, *rest in items:
        vals = rest[0] if len(rest) == 1 else rest
        if len(vals) != 2 or any(int(v) != v or v < 0 for v in vals):
            raise ValueError(f"tensor {name!r} must give (nbytes, bytes_moved_per_step) as non-negative integers")
        rows.append((int(vals[0]), int(vals[1])))
    size = np.array([r[0] for r in rows], dtype=np.int64)
    moved = np.array([r[1] for r in rows], dtype=np.float64)
    for tier in ("pinned", "disk"):
        if tier not in costs or not np.isfinite(costs[tier]) or costs[tier] < 0:
            raise ValueError(f"costs must give a finite non-negative seconds-per-byte for {tier!r}; got {dict(costs)!r}")
    if device_budget < 0 or granularity < 1:
        raise ValueError("device_budget must be >= 0 bytes and granularity >= 1 byte")
    units = -(-size // granularity)
    budget_units = int(device_budget // granularity)
    t_pinned = moved * costs["pinned"]
    t_disk = moved * costs["disk"]

    def solve_with(mu: float):
        # Options: device (cost = units, time 0), pinned (time + mu * bytes), disk (time).
        c = np.stack([units, np.zeros_like(units), np.zeros_like(units)], axis=1)
        v = -np.stack([np.zeros_like(t_pinned), t_pinned + mu * size, t_disk], axis=1)
        return solve(c, v, budget_units)

    alloc = solve_with(0.0)
    pinned_used = lambda a: int(size[a.choice == 1].sum())  # noqa: E731
    if pinned_budget is not None and pinned_used(alloc) > pinned_budget:
        # Above hi, pinned costs more than disk for every tensor: the pinned tier empties.
        lo, hi = 0.0, 2.0 * float(np.max((t_disk - t_pinned) / np.maximum(size, 1))) + 1e-30
        best = solve_with(hi)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            a = solve_with(mid)
            if pinned_used(a) <= pinned_budget:
                hi, best = mid, a
            else:
                lo = mid
        alloc = best
    tier_names = np.array(["device", "pinned", "disk"])
    chosen = tier_names[alloc.choice]
    seconds = float(np.where(alloc.choice == 1, t_pinned, np.where(alloc.choice == 2, t_disk, 0.0)).sum())
    by_tier = {t: int(size[chosen == t].sum()) for t in tier_names}
    bound = -alloc.bound if pinned_budget is None and alloc.bound is not None else None
    return Placement(dict(zip(names, chosen.tolist())), by_tier, seconds, bound)


# ---------------------------------------------------------------------------------------- arena


@dataclass
class ArenaPlan:
    """Static offsets for a trace, with the live-bytes peak and an online best-fit allocator to compare."""

    offsets: np.ndarray
    arena_bytes: int
    live_peak_bytes: int
    online_arena_bytes: int
    fragmentation: float  # 1 - live peak / arena (offline plan)
    online_fragmentation: float  # the same for the simulated online best-fit allocator


def _validate_trace(trace) -> np.ndarray:
    arr = np.asarray(trace)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"trace must be rows of (size, alloc_time, free_time); got shape {arr.shape}")
    if arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
        raise ValueError("trace entries must be integers (bytes and event times)")
    arr = arr.astype(np.int64)
    if np.any(arr[:, 0] < 0):
        raise ValueError("trace sizes must be non-negative bytes")
    if np.any(arr[:, 2] <= arr[:, 1]):
        bad = int(np.flatnonzero(arr[:, 2] <= arr[:, 1])[0])
        raise ValueError(f"trace row {bad} frees at {arr[bad, 2]}, not after its allocation at {arr[bad, 1]}")
    return arr


def live_peak(trace) -> int:
    """Highest sum of sizes of tensors live at once; a tensor lives on [alloc_time, free_time).

    The lower bound every allocator (STAlloc's static plan, PyTorch's caching allocator) must meet.
    """
    arr = _validate_trace(trace)
    times, inverse = np.unique(np.concatenate([arr[:, 1], arr[:, 2]]), return_inverse=True)
    delta = np.zeros(times.size, dtype=np.int64)
    n = arr.shape[0]
    np.add.at(delta, inverse[:n], arr[:, 0])
    np.add.at(delta, inverse[n:], -arr[:, 0])
    return int(np.cumsum(delta).max())


def _round_up(x, alignment):
    return -(-x // alignment) * alignment


def plan_arena(trace, alignment: int = 1) -> ArenaPlan:
    """Static offsets in one arena for tensors with known lifetimes, by best-fit decreasing.

    Largest tensor first (ties: longest life first); each goes into the smallest gap, among the
    tensors already placed that are live at the same time, that holds it, else on top. In the spirit
    of STAlloc's offline planning for training memory (plan once, replay each step); unlike STAlloc it
    plans one flat arena from an estimated trace and reports its fragmentation against a simulated
    online best-fit allocator (first free block of the smallest size that fits, coalescing on free).
    trace: rows (size, alloc_time, free_time), e.g. ``estimate_peak(...).trace``.
    """
    arr = _validate_trace(trace)
    if alignment < 1:
        raise ValueError(f"alignment must be a positive number of bytes; got {alignment}")
    size = _round_up(arr[:, 0], alignment)
    start, stop = arr[:, 1], arr[:, 2]
    order = np.lexsort((-(stop - start), -size))
    offsets = np.zeros(arr.shape[0], dtype=np.int64)
    placed = np.zeros(arr.shape[0], dtype=bool)
    for i in order:
        if size[i] == 0:
            placed[i] = True
            continue
        clash = placed & (start < stop[i]) & (stop > start[i]) & (size > 0)
        lo = offsets[clash]
        hi = lo + size[clash]
        idx = np.argsort(lo, kind="stable")
        lo, hi = lo[idx], hi[idx]
        # Gaps between the union of busy intervals: from the running max of ends to the next start.
        reach = np.maximum.accumulate(hi) if hi.size else hi
        gap_start = np.concatenate([[0], reach])
        gap_end = np.concatenate([lo, [np.iinfo(np.int64).max]])
        room = gap_end - gap_start
        fits = np.flatnonzero(room >= size[i])
        j = fits[np.argmin(room[fits])]  # best fit; the open top always fits
        offsets[i] = gap_start[j]
        placed[i] = True
    arena = int((offsets + size).max())
    peak = live_peak(np.stack([size, start, stop], axis=1))
    online = _online_best_fit(size, start, stop)
    return ArenaPlan(offsets, arena, peak, online, 1 - peak / arena if arena else 0.0, 1 - peak / online if online else 0.0)


def _online_best_fit(size: np.ndarray, start: np.ndarray, stop: np.ndarray) -> int:
    """Arena size of an online best-fit allocator that sees allocations and frees in time order."""
    events = sorted([(int(stop[i]), 0, i) for i in range(size.size)] + [(int(start[i]), 1, i) for i in range(size.size)])
    free: list[tuple[int, int]] = []  # (offset, length), sorted by offset
    top = 0
    where = np.zeros(size.size, dtype=np.int64)
    for _, kind, i in events:
        n = int(size[i])
        if n == 0:
            continue
        if kind == 1:
            best = None
            for k, (_, length) in enumerate(free):
                if length >= n and (best is None or length < free[best][1]):
                    best = k
            if best is None:
                if free and free[-1][0] + free[-1][1] == top:  # grow the last free block at the top
                    off = free.pop()[0]
                    top = off + n
                else:
                    off = top
                    top += n
            else:
                off, length = free[best]
                if length == n:
                    free.pop(best)
                else:
                    free[best] = (off + n, length - n)
            where[i] = off
        else:
            off = int(where[i])
            free.append((off, n))
            free.sort()
            merged: list[tuple[int, int]] = []
            for o, length in free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + length)
                else:
                    merged.append((o, length))
            free = merged
    return top
