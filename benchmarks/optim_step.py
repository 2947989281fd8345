# Run: flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/optim_step.py --sizes 60m,1b --steps-1b 25
# Guard cost only: flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/optim_step.py --names none --guard-steps 40
"""Optimizer step time and state bytes, side by side, at the GaLore paper's LLaMA weight shapes.

Setup (GaLore, Zhao et al., 2024, Table 8 shapes): LLaMA-60M (d 512, 8 layers, FFN 1376,
vocab 32000) at rank 128 and LLaMA-1B (d 2048, 24 layers, FFN 5461) at rank 512; projection on
the attention and MLP linears, everything else (embeddings, output head, norms) plain AdamW.
The parameters are bare tensors of those shapes with fixed Gaussian gradients (no model forward):
only the optimizer step is timed.

Side by side in one run: torch AdamW (foreach and fused), bitsandbytes AdamW8bit,
galore_torch.GaLoreAdamW, scrimp GaLoreAdamW (stagger on, stagger on with the ``gram`` projector,
and stagger off), GaLoreAdamW8bit,
FrugalAdamW (RandK with as many state entries as rank r, signSGD residual), FrugalLion and FrugalSGD (the same
subspace with Lion / SGD-momentum as the state-full rule), ApolloAdamW (rank r), ApolloMiniAdamW (rank 1) and
NaturalGaLoreAdamW (rank r, a history of 20 projected gradients). Per optimizer: state
bytes, the projected matrices' state relative to AdamW's, the median step over non-refresh
steps, the slowest step after the first (refresh steps included), and the first step (state
allocation + every projector), as a markdown table.

Every optimizer runs ``update_proj_gap + 1`` steps (default 201, so galore-torch's periodic
refresh at step 200 and every staggered refresh of ours are inside the window) unless
``--steps`` says otherwise; optimizers that are slow on a CPU (bitsandbytes' 8-bit paths) run
``--slow-steps``. At the 60M shapes all optimizers live at once and step in rotating round-robin order, so a load
change on a shared machine hits all of them alike; at the 1B shapes (or with ``--sequential``)
they run one after another so that only one state is alive. ``--layers-1b N`` keeps N of the 24 LLaMA-1B blocks (plus embeddings/head) so
the run fits in memory and time; the table says what ran.

``--guard-steps N`` adds the cost of ``check_finite`` (on by default in scrimp's optimizers: one
reduction per gradient and one host read per step), side by side: scrimp GaLoreAdamW and
FrugalAdamW each with the guard on and off, and the guard alone, all at the same shapes and
gradients, timed in rotating order step by step for N steps after one warm-up step (which holds
the projector refreshes), so that load changes hit every variant alike. Goal: on / off <= 1.02.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from rich.progress import Progress

from scrimp.optim import (
    ApolloAdamW,
    ApolloMiniAdamW,
    FrugalAdamW,
    FrugalLion,
    FrugalSGD,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    NaturalGaLoreAdamW,
)
from scrimp.optim.memory import state_bytes

SIZES = {  # d_model, layers, ffn, vocab, rank
    "60m": (512, 8, 1376, 32000, 128),
    "1b": (2048, 24, 5461, 32000, 512),
}


def llama_shapes(d: int, layers: int, ffn: int, vocab: int) -> tuple[list[tuple], list[tuple]]:
    """(projected weight shapes, plain parameter shapes) of a LLaMA with nn.Linear (out, in) weights."""
    projected, plain = [], [(vocab, d), (vocab, d), (d,)]  # embeddings, lm_head, final norm
    for _ in range(layers):
        projected += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn)]  # q k v o, gate up down
        plain += [(d,), (d,)]
    return projected, plain


@dataclass
class Result:
    name: str
    state: int
    proj_ratio: float | None
    median_ms: float
    slowest_ms: float
    first_ms: float
    steps: int
    refresh_steps: int


def galore_torch_state_bytes(opt) -> dict[str, int]:
    """galore-torch keeps a GaLoreProjector object in the state; count its ortho_matrix as projector bytes."""
    out = {"moments": 0, "projectors": 0}
    for st in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                out["moments"] += st[key].numel() * st[key].element_size()
        proj = st.get("projector")
        if proj is not None and proj.ortho_matrix is not None:
            out["projectors"] += proj.ortho_matrix.numel() * proj.ortho_matrix.element_size()
    out["total"] = out["moments"] + out["projectors"]
    return out


def per_param_bytes(opt, params, galore_torch: bool) -> int:
    total = 0
    for p in params:
        st = opt.state.get(p, {})
        for key, v in st.items():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
            elif galore_torch and key == "projector" and v.ortho_matrix is not None:
                total += v.ortho_matrix.numel() * v.ortho_matrix.element_size()
    return total


def summarize(name, opt, projected, times, refresh_of) -> Result:
    steps = len(times)
    is_galore_torch = name.startswith("galore_torch")
    total = galore_torch_state_bytes(opt)["total"] if is_galore_torch else state_bytes(opt)["total"]
    proj_bytes = per_param_bytes(opt, projected, is_galore_torch)
    adamw_proj = sum(2 * p.numel() * 4 for p in projected)
    refreshing = refresh_of(opt, steps)
    later = range(1, steps)
    quiet = [times[t] for t in later if t not in refreshing]
    median = statistics.median(quiet) if quiet else float("nan")  # every step refreshed: no quiet median
    return Result(name, total, proj_bytes / adamw_proj, 1e3 * median, 1e3 * max(times[1:]),
                  1e3 * times[0], steps, len([t for t in later if t in refreshing]))


def timed_step(opt, params, grads) -> float:
    for p, g in zip(params, grads):
        p.grad = g
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def run_interleaved(chosen, projected, plain, grads, steps, slow_steps, progress, label):
    """All optimizers live at once and take their steps in rotating round-robin order, so that a
    load change on a shared machine hits every optimizer alike (ratios stay side by side)."""
    params = projected + plain
    built = [(name, make(projected, plain), min(steps, slow_steps) if slow else steps, refresh_of)
             for name, slow, make, refresh_of in chosen]
    times: list[list[float]] = [[] for _ in built]
    task = progress.add_task(label, total=sum(n for _, _, n, _ in built))
    for t in range(steps):
        order = [(i + t) % len(built) for i in range(len(built))]
        for i in order:
            name, opt, n, _ = built[i]
            if t < n:
                times[i].append(timed_step(opt, params, grads[t % len(grads)]))
                progress.advance(task)
    return [summarize(name, opt, projected, ts, refresh_of) for (name, opt, _, refresh_of), ts in zip(built, times)]


def run_sequential(chosen, projected, plain, grads, steps, slow_steps, progress, label):
    """One optimizer at a time (only its state alive): for shapes where all states do not fit together."""
    params = projected + plain
    results = []
    for name, slow, make, refresh_of in chosen:
        n = min(steps, slow_steps) if slow else steps
        task = progress.add_task(f"{label} {name}", total=n)
        opt = make(projected, plain)
        ts = []
        for t in range(n):
            ts.append(timed_step(opt, params, grads[t % len(grads)]))
            progress.advance(task)
        results.append(summarize(name, opt, projected, ts, refresh_of))
        del opt
        gc.collect()
    return results


def our_refresh_steps(opt, steps):
    """Steps (after the first) on which any projector of a scrimp optimizer is recomputed."""
    out = set()
    for group in opt.param_groups:
        if group.get("rank") is None and group.get("density") is None:
            continue
        for p in group["params"]:
            proj = opt.projector(p, group)
            if proj.kind not in ("full", "none", "blocks"):
                out |= {t for t in range(1, steps) if proj.refresh_due({"proj_refresh": 0}, t)}
    return out


def optimizers(rank: int, gap: int):
    def groups(projected, plain, **kw):
        return [{"params": projected, **kw}, {"params": plain}]

    galore_group = dict(rank=rank, update_proj_gap=gap, scale=0.25, proj_type="std")
    no_refresh = lambda opt, steps: set()  # noqa: E731
    galore_torch_refresh = lambda opt, steps: {t for t in range(1, steps) if t % gap == 0}  # noqa: E731
    table = [
        ("torch AdamW (foreach)", False, lambda a, b: torch.optim.AdamW(a + b, lr=1e-3, foreach=True), no_refresh),
        ("torch AdamW (fused)", False, lambda a, b: torch.optim.AdamW(a + b, lr=1e-3, fused=True), no_refresh),
    ]
    try:
        import bitsandbytes as bnb

        table.append(("bitsandbytes AdamW8bit", True, lambda a, b: bnb.optim.AdamW8bit(a + b, lr=1e-3), no_refresh))
    except ImportError:
        pass
    try:
        import galore_torch

        table.append(("galore_torch.GaLoreAdamW", False,
                      lambda a, b: galore_torch.GaLoreAdamW(groups(a, b, **galore_group), lr=1e-3),
                      galore_torch_refresh))
    except ImportError:
        pass
    table += [
        ("scrimp GaLoreAdamW", False, lambda a, b: GaLoreAdamW(groups(a, b, **galore_group), lr=1e-3),
         our_refresh_steps),
        ("scrimp GaLoreAdamW (projector=gram)", False,
         lambda a, b: GaLoreAdamW(groups(a, b, **galore_group), lr=1e-3, projector="gram"), our_refresh_steps),
        ("scrimp GaLoreAdamW (stagger=False)", False,
         lambda a, b: GaLoreAdamW(groups(a, b, **galore_group), lr=1e-3, stagger=False), our_refresh_steps),
        # weight_decay=0 as every other row (and as the tables in docs/optimizers.md were measured): these two
        # classes now default to their originals' 0.01.
        ("scrimp GaLoreAdamW8bit", True,
         lambda a, b: GaLoreAdamW8bit(groups(a, b, **galore_group), lr=1e-3, weight_decay=0.0), our_refresh_steps),
        ("scrimp FrugalAdamW (randk)", False,
         lambda a, b: FrugalAdamW(groups(a, b, rank=rank), lr=1e-3, weight_decay=0.0, update_gap=gap,
                                  proj_type="randk"),
         our_refresh_steps),
        # The compositions of issue 14, at the same rank and shapes (APOLLO-Mini at its own rank 1).
        ("scrimp FrugalLion (randk)", False,
         lambda a, b: FrugalLion(groups(a, b, rank=rank), lr=1e-4, update_gap=gap, proj_type="randk"),
         our_refresh_steps),
        ("scrimp FrugalSGD (randk)", False,
         lambda a, b: FrugalSGD(groups(a, b, rank=rank), lr=1e-3, update_gap=gap, proj_type="randk"),
         our_refresh_steps),
        ("scrimp ApolloAdamW", False,
         lambda a, b: ApolloAdamW(groups(a, b, rank=rank, update_proj_gap=gap), lr=1e-3), our_refresh_steps),
        ("scrimp ApolloMiniAdamW (rank 1)", False,
         lambda a, b: ApolloMiniAdamW(groups(a, b, rank=1, update_proj_gap=gap), lr=1e-3), our_refresh_steps),
        ("scrimp NaturalGaLoreAdamW (history 20)", False,
         lambda a, b: NaturalGaLoreAdamW(groups(a, b, **galore_group), lr=1e-3), our_refresh_steps),
    ]
    return table


def llama_parameters(size: str, args):
    """(rank, blocks kept, blocks, projected params, plain params, generator) at a LLaMA size's shapes."""
    d, layers, ffn, vocab, rank = SIZES[size]
    kept = layers if size != "1b" else min(args.layers_1b, layers)
    proj_shapes, plain_shapes = llama_shapes(d, kept, ffn, vocab)
    gen = torch.Generator().manual_seed(0)
    projected = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in proj_shapes]
    plain = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in plain_shapes]
    return rank, kept, layers, projected, plain, gen


def bench_size(size: str, args, progress) -> tuple[str, list[Result]]:
    rank, kept, layers, projected, plain, gen = llama_parameters(size, args)
    grads = [[torch.randn(p.shape, generator=gen) * 1e-3 for p in projected + plain] for _ in range(2)]
    steps = args.steps or args.gap + 1
    if size == "1b" and args.steps_1b:
        steps = args.steps_1b
    chosen = [o for o in optimizers(rank, args.gap) if not args.only or any(k in o[0] for k in args.only.split(","))]
    if args.names:
        chosen = [o for o in optimizers(rank, args.gap) if o[0] in args.names.split(";")]
    runner = run_sequential if (args.sequential or size == "1b") else run_interleaved
    load_before = os.getloadavg()[0]
    slow_steps = args.slow_steps_1b if size == "1b" else args.slow_steps
    results = runner(chosen, projected, plain, grads, steps, slow_steps, progress, size)
    load_after = os.getloadavg()[0]
    label = (f"LLaMA-{size.upper()} shapes: {kept} of {layers} blocks + embeddings/head/norms, "
             f"{sum(p.numel() for p in projected + plain) / 1e6:.1f}M parameters, rank {rank}, "
             f"update_proj_gap {args.gap}; {'sequential' if runner is run_sequential else 'interleaved'} runs; "
             f"1-min load average {load_before:.1f} before, {load_after:.1f} after")
    return label, results


def guarded_optimizers(rank: int, gap: int):
    """(name, make(params, check_finite)) of the scrimp optimizers whose guard is measured."""
    def groups(projected, plain, **kw):
        return [{"params": projected, **kw}, {"params": plain}]

    return [
        ("scrimp GaLoreAdamW", lambda a, b, check: GaLoreAdamW(
            groups(a, b, rank=rank, update_proj_gap=gap, scale=0.25, proj_type="std"), lr=1e-3, check_finite=check)),
        ("scrimp FrugalAdamW (randk)", lambda a, b, check: FrugalAdamW(
            groups(a, b, rank=rank), lr=1e-3, weight_decay=0.0, update_gap=gap, proj_type="randk",
            check_finite=check)),
    ]


def guard_cost(size: str, args, progress) -> str:
    """The check_finite guard's share of a step, measured side by side (see the module doc)."""
    from scrimp.optim.finite_guard import first_nonfinite

    rank, _, _, projected, plain, gen = llama_parameters(size, args)
    params = projected + plain
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    variants = [("guard alone", lambda: first_nonfinite(grads))]
    for name, make in guarded_optimizers(rank, args.gap):
        for check in (True, False):
            opt = make(projected, plain, check)
            opt.step()  # warm-up: state allocation and every projector's first refresh
            variants.append((f"{name}, check_finite={check}", opt.step))
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    task = progress.add_task(f"{size} guard", total=args.guard_steps * len(variants))
    load_before = os.getloadavg()[0]
    for t in range(args.guard_steps):
        for i in range(len(variants)):
            name, run = variants[(i + t) % len(variants)]
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            progress.advance(task)
    load_after = os.getloadavg()[0]
    median = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    lines = [f"**check_finite cost, LLaMA-{size.upper()} shapes ({sum(p.numel() for p in params) / 1e6:.1f}M "
             f"parameters, rank {rank}), {args.guard_steps} interleaved steps each after a warm-up step; 1-min load "
             f"average {load_before:.1f} before, {load_after:.1f} after**", "",
             "| optimizer | median step ms, guard on | median step ms, guard off | on / off (goal <= 1.02) | "
             "guard alone ms | guard alone / step off |", "|---|---:|---:|---:|---:|---:|"]
    for name, _ in guarded_optimizers(rank, args.gap):
        on, off = median[f"{name}, check_finite=True"], median[f"{name}, check_finite=False"]
        alone = median["guard alone"]
        lines.append(f"| {name} | {on:.1f} | {off:.1f} | {on / off:.3f} | {alone:.1f} | {alone / off:.3f} |")
    return "\n".join(lines)


def markdown(label: str, results: list[Result]) -> str:
    ref = next((r for r in results if r.name.startswith("galore_torch")), None)
    adamw = next((r for r in results if r.name == "torch AdamW (foreach)"), None)
    lines = [f"**{label}**", "",
             "| optimizer | state MiB | state / AdamW | proj. matrices state / AdamW | median step ms "
             "(non-refresh) | slowest step ms (after 1st) | first step ms | steps run | refresh steps | "
             "median / galore-torch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rel = f"{r.median_ms / ref.median_ms:.2f}x" if ref else "-"
        st = f"{r.state / adamw.state:.2f}" if adamw else "-"
        lines.append(f"| {r.name} | {r.state / 2**20:.1f} | {st} | {r.proj_ratio:.3f} | {r.median_ms:.1f} | "
                     f"{r.slowest_ms:.1f} | {r.first_ms:.1f} | {r.steps} | {r.refresh_steps} | {rel} |")
    ours = next((r for r in results if r.name == "scrimp GaLoreAdamW"), None)
    gram = next((r for r in results if r.name == "scrimp GaLoreAdamW (projector=gram)"), None)
    if gram:
        lines.append("")
        lines.append(f"- scrimp GaLoreAdamW (projector=gram) slowest (after 1st) / own median: "
                     f"{gram.slowest_ms / gram.median_ms:.2f}x (target <= 3x)")
    if ours:
        lines.append("")
        if ref:
            lines.append(f"- scrimp GaLoreAdamW median / galore-torch median: {ours.median_ms / ref.median_ms:.2f}x "
                         "(target <= 0.6x)")
        lines.append(f"- scrimp GaLoreAdamW slowest (after 1st) / own median: {ours.slowest_ms / ours.median_ms:.2f}x "
                     "(target <= 3x)")
        lines.append(f"- projected matrices' state / AdamW's: {ours.proj_ratio:.3f} (target <= 0.40)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="60m", help="comma list of 60m,1b")
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap for every projected optimizer")
    parser.add_argument("--steps", type=int, default=0, help="steps per optimizer (default gap + 1)")
    parser.add_argument("--steps-1b", type=int, default=0, help="steps per optimizer at the 1B shapes")
    parser.add_argument("--slow-steps", type=int, default=12, help="steps for the bitsandbytes 8-bit paths")
    parser.add_argument("--slow-steps-1b", type=int, default=3, help="steps for the 8-bit paths at the 1B shapes")
    parser.add_argument("--layers-1b", type=int, default=2, help="LLaMA-1B blocks to keep (of 24)")
    parser.add_argument("--only", default="", help="comma list of name fragments to run")
    parser.add_argument("--names", default="", help="semicolon list of exact optimizer names to run ('none': only "
                        "the guard's table)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sequential", action="store_true", help="one optimizer at a time (always for 1b)")
    parser.add_argument("--guard-steps", type=int, default=0,
                        help="also measure check_finite's cost over this many interleaved steps (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tables = []
    with Progress() as progress:
        for size in args.sizes.split(","):
            if args.names != "none":
                tables.append(markdown(*bench_size(size, args, progress)))
            if args.guard_steps:
                tables.append(guard_cost(size, args, progress))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
