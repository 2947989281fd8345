# GPU:  flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/kernels.py [--dtypes fp32,bf16] [--json out.json]
# CPU smoke (tiny shapes, Triton interpreter, proves the script runs):
#       flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/kernels.py --interpret-smoke
# sm_90 compile report, no GPU needed (registers, spills, shared memory, MMA kind per autotune config):
#       flock /tmp/scrimp-bench.lock .venv/bin/python benchmarks/kernels.py --compile-report
"""Benchmark of the fused GaLore/FRUGAL step (scrimp.optim.kernels) against its alternatives.

Side by side, in one run, per shape (rows x cols, rank) and weight dtype (fp32; bf16 weights with
fp32 states):
- ``fused``: ``projected_adam_step(backend="triton")`` (two Triton launches);
- ``torch``: ``scrimp.optim.functional.projected_adam_step_torch`` (the same math, unfused);
- ``galore_torch``: ``galore_torch.GaLoreAdamW.step`` on one parameter (Zhao et al., 2024), its
  projector preset to the same P, so no SVD is computed or timed;
- ``adamw``: ``torch.optim.AdamW(fused=True)`` full-rank step on the same W (the cost to stay under).

Times are medians of ``triton.testing.do_bench`` (CUDA events). The floor is the bytes a step must
move (read G, W, P and both moments; write W and both moments) over the device-to-device copy
bandwidth measured in the same run (bytes read + written by a large ``Tensor.copy_``). The
issue's targets (issue 7): fused >= 2x the torch path at 4096x11008 r128, <= 1.0x fused AdamW,
within 2x of the floor at r <= 128. Rows with ``+sign`` add FRUGAL's sign residual.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# This file is named as issue 7 asks, which shadows the hub's `kernels` package for any script run
# from this folder: bitsandbytes and transformers probe for that name. Run as a script, it takes its
# folder off sys.path (nothing here imports a sibling). Imported by such a probe from another
# benchmark, it does nothing at import: the probe finds no `get_kernel` and goes on, as it does
# when the package is not installed.
if __name__ == "__main__":
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

# The target shape first: a run cut short by --budget-s still answers the main questions.
GPU_SHAPES = [(4096, 11008, 128), (4096, 4096, 128), (4096, 11008, 32), (4096, 11008, 512), (8192, 28672, 512)]
SMOKE_SHAPES = [(48, 80, 8), (80, 48, 16)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="run tiny shapes on the CPU through TRITON_INTERPRET=1 (no timing value)")
    parser.add_argument("--compile-report", action="store_true",
                        help="compile every autotune config for sm_90 with Triton's bundled ptxas (no GPU) and "
                             "print registers, spilled stack bytes, shared memory and the MMA instruction used")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of weight dtypes: fp32, bf16")
    parser.add_argument("--residuals", default="none,sign_sgd", help="comma list: none, sign_sgd, sgd")
    parser.add_argument("--json", default=None, help="also write every measured number to this JSON file "
                        "(rewritten after each case, so a run cut short keeps what it measured)")
    parser.add_argument("--shapes", default=None,
                        help="comma list of MxNxR to run instead of the default list, e.g. 4096x11008x128")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds; the table covers the cases done")
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.shapes is not None:
        try:
            args.shapes = [tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")]
        except ValueError:
            args.shapes = None
        if not args.shapes or any(len(s) != 3 or min(s) < 1 for s in args.shapes):
            parser.error("--shapes must be a comma list of MxNxR with positive integers, e.g. 4096x11008x128")
    return args


def load_galore_adamw():
    """galore-torch's ``GaLoreAdamW`` (Zhao et al., 2024), or ``(None, reason)`` when it cannot be imported.

    ``import galore_torch`` also imports its 8-bit optimizer, hence bitsandbytes, which the AdamW
    compared here never uses. Where bitsandbytes is missing (GPU images often lack it) the two
    modules the AdamW needs are loaded by file, under a package shell that skips ``__init__``.
    """
    try:
        import galore_torch

        return galore_torch.GaLoreAdamW, None
    except ModuleNotFoundError as err:
        if err.name == "galore_torch":
            return None, "galore-torch not installed (dev extra)"
        missing = err.name
    import importlib.util
    import types

    spec = importlib.util.find_spec("galore_torch")
    shell = types.ModuleType("galore_torch")
    shell.__path__ = list(spec.submodule_search_locations)
    saved = sys.modules.get("galore_torch")
    sys.modules["galore_torch"] = shell
    try:
        from galore_torch.adamw import AdamW
    except ImportError as err:
        return None, f"galore-torch's AdamW does not import ({err})"
    finally:
        if saved is not None:
            sys.modules["galore_torch"] = saved
    return AdamW, f"loaded without galore_torch/__init__ ({missing} missing)"


def galore_torch_optimizer(GaLoreAdamW, w, P, rank, side):
    """A galore-torch AdamW on one parameter whose projector is already P: no SVD at the first step.

    galore-torch computes its projector when ``step % update_proj_gap == 0``, so the state starts at
    step 1 with ``ortho_matrix`` set to what its SVD would store (left: U[:, :r]; right: Vh[:r]).
    """
    from galore_torch.galore_projector import GaLoreProjector

    opt = GaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}],
                      lr=1e-3, weight_decay=0.01, no_deprecation_warning=True)
    projector = GaLoreProjector(rank, update_proj_gap=10**9, scale=0.25, proj_type="std")
    projector.ortho_matrix = P if side == "left" else P.T.contiguous()
    opt.state[w].update(step=1, projector=projector)
    return opt


def galore_side(m: int, n: int) -> str:
    """galore-torch's "std" rule: project the shorter side (right when rows >= cols)."""
    return "right" if m >= n else "left"


def floor_bytes(m, n, rank, w_bytes, p_bytes):
    """Bytes that must move: read G, W, P, both moments; write W and both moments (moments fp32)."""
    side = galore_side(m, n)
    low = rank * (n if side == "left" else m)
    p_rows = m if side == "left" else n
    read_g_w_write_w = 3 * m * n * w_bytes
    return read_g_w_write_w + p_rows * rank * p_bytes + 4 * low * 4


def fused_model_bytes(m, n, rank, w_bytes, p_bytes, residual):
    """Bytes our two kernels move when tiles re-read from L2 are free: the floor + N (and R, G again)."""
    side = galore_side(m, n)
    low = rank * (n if side == "left" else m)
    extra = 2 * low * 4 + p_rows_bytes(m, n, rank, p_bytes)  # N written and read; P read by both kernels
    if residual is not None:
        extra += 2 * low * 4 + m * n * w_bytes  # R written and read; G read again by kernel 2
    return floor_bytes(m, n, rank, w_bytes, p_bytes) + extra


def p_rows_bytes(m, n, rank, p_bytes):
    return (m if galore_side(m, n) == "left" else n) * rank * p_bytes


def make_timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_median_ms(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_median_ms


def copy_bandwidth(torch, device, timer, n_bytes):
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def one_case(torch, kernels, functional, GaLoreAdamW, device, timer, m, n, rank, dtype, residual):
    gen = torch.Generator(device="cpu").manual_seed(m * 7 + n * 3 + rank)
    side = galore_side(m, n)
    p_rows = m if side == "left" else n
    low = (rank, n) if side == "left" else (m, rank)
    W0 = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
    G = (torch.randn(m, n, generator=gen) * 1e-2).to(device=device, dtype=dtype)
    P = torch.linalg.qr(torch.randn(p_rows, rank, generator=gen))[0].to(device=device, dtype=dtype)
    m0 = (torch.randn(*low, generator=gen) * 1e-3).to(device)
    v0 = (torch.rand(*low, generator=gen) * 1e-4 + 1e-6).to(device)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, scale=0.25, side=side,
                 residual=residual)

    def state():
        return W0.clone(), m0.clone(), v0.clone()

    # Correctness of this very configuration first: one fused step against one torch-path step.
    Wf, mf, vf = state()
    kernels.projected_adam_step(Wf, G, P, mf, vf, step=5, backend="triton", **hyper)
    Wt, mt, vt = state()
    functional.projected_adam_step_torch(Wt, G, P, mt, vt, step=5, **hyper)
    # W: difference relative to the update itself (W's own norm would hide an lr-sized error); in
    # bf16 the update is mostly below W's rounding, so only the states are a meaningful check there.
    rel = float((Wf.float() - Wt.float()).norm() / (Wt.float() - W0.float()).norm().clamp_min(1e-30))
    rel_states = max(float((mf - mt).norm() / mt.norm()), float((vf - vt).norm() / vt.norm()))

    Wf, mf, vf = state()
    fused_ms = timer(lambda: kernels.projected_adam_step(Wf, G, P, mf, vf, step=5, backend="triton", **hyper))
    Wt, mt, vt = state()
    torch_ms = timer(lambda: functional.projected_adam_step_torch(Wt, G, P, mt, vt, step=5, **hyper))

    # The same call timed a second time: the spread between the two is the noise of this run.
    fused_again_ms = timer(lambda: kernels.projected_adam_step(Wf, G, P, mf, vf, step=5, backend="triton", **hyper))

    galore_ms = float("nan")  # galore-torch has no residual rule: timed on GaLore rows only
    if residual is None and GaLoreAdamW is not None:
        w = torch.nn.Parameter(W0.clone())
        w.grad = G.clone()
        opt = galore_torch_optimizer(GaLoreAdamW, w, P, rank, side)
        opt.step()
        galore_ms = timer(opt.step)

    w = torch.nn.Parameter(W0.clone())
    w.grad = G.clone()
    adamw = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.01, fused=True)
    adamw.step()
    adamw_ms = timer(adamw.step)

    w_bytes = torch.finfo(dtype).bits // 8
    return dict(
        shape=f"{m}x{n}", rank=rank, dtype=str(dtype).replace("torch.", ""), side=side,
        residual=residual or "none", fused_ms=fused_ms, fused_again_ms=fused_again_ms, torch_ms=torch_ms, galore_torch_ms=galore_ms,
        adamw_fused_ms=adamw_ms, floor_bytes=floor_bytes(m, n, rank, w_bytes, w_bytes),
        model_bytes=fused_model_bytes(m, n, rank, w_bytes, w_bytes, residual),
        rel_err_vs_torch=rel, rel_err_states=rel_states,
    )


def markdown(rows, copy_gbs):
    head = ("| shape | r | W dtype | rule | fused ms | torch ms | galore_torch ms | AdamW(fused) ms | "
            "torch/fused | fused/AdamW | floor MB | floor ms | fused/floor | fused GB/s | rel err W | rel err states |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        floor_ms = r["floor_bytes"] / (copy_gbs * 1e9) * 1e3
        galore = "—" if r["galore_torch_ms"] != r["galore_torch_ms"] else f"{r['galore_torch_ms']:.3f}"  # NaN: not run
        lines.append(
            f"| {r['shape']} | {r['rank']} | {r['dtype']} | {r['residual']} | {r['fused_ms']:.3f} | "
            f"{r['torch_ms']:.3f} | {galore} | {r['adamw_fused_ms']:.3f} | "
            f"{r['torch_ms'] / r['fused_ms']:.2f} | {r['fused_ms'] / r['adamw_fused_ms']:.2f} | "
            f"{r['floor_bytes'] / 1e6:.4g} | {floor_ms:.3f} | {r['fused_ms'] / floor_ms:.2f} | "
            f"{r['floor_bytes'] / (r['fused_ms'] * 1e-3) / 1e9:.4g} | {r['rel_err_vs_torch']:.1e} | "
            f"{r['rel_err_states']:.1e} |"
        )
    return "\n".join(lines)


def _resource_usage(compiled) -> tuple[str, str]:
    """(registers, stack bytes) of a compiled kernel, read from its cubin with Triton's bundled cuobjdump."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(fh.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (found.group(1), found.group(2)) if found else ("?", "?")


def compile_report(capability: int = 90) -> str:
    """Compile each autotune config of both kernels for sm_<capability> and tabulate its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from scrimp.optim.kernels import back_projection, configs, projection

    target = GPUTarget("cuda", capability, 32)

    def build(kernel, config, constants, pointer_dtypes):
        names = kernel.arg_names
        constants = {**constants, **config.kwargs}
        signature = {}
        for name in names:
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + pointer_dtypes.get(name, "fp32")
            elif name in ("M", "K", "RANK") or name.startswith("stride"):
                signature[name] = "i32"
            else:
                signature[name] = "fp32"
        source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
        return triton.compile(source, target=target,
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})

    def mma_kind(compiled):
        ptx = compiled.asm["ptx"]
        return "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "FMA")

    k1_variants = [
        ("fp32 W, tf32x3, writes R", {"WRITE_R": True, "DOT_PRECISION": "tf32x3", "LOW_PRECISION_DOT": False}, "fp32"),
        ("bf16 G,P, bf16 dot", {"WRITE_R": True, "DOT_PRECISION": "tf32x3", "LOW_PRECISION_DOT": True}, "bf16"),
    ]
    k2_variants = [
        ("fp32 W, tf32x3, GaLore", {"RESIDUAL": 0}, "fp32"),
        ("fp32 W, tf32x3, sign residual", {"RESIDUAL": 2}, "fp32"),
        ("bf16 W, tf32x3, sign residual", {"RESIDUAL": 2}, "bf16"),
    ]
    lines = ["| kernel | config (blocks, warps, stages) | variant | registers | spilled stack B | shared B | MMA |",
             "|---|---|---|---|---|---|---|"]
    jobs = [("projection", projection._project_adam_kernel, c, v) for c in configs.PROJECTION_CONFIGS
            for v in k1_variants]
    jobs += [("back_projection", back_projection._back_project_update_kernel, c, v)
             for c in configs.BACK_PROJECTION_CONFIGS for v in k2_variants]
    for name, kernel, config, (label, flags, dtype) in jobs:
        if name == "projection":
            pointers = {"x_ptr": dtype, "p_ptr": dtype}
        else:
            flags = {**flags, "DOT_PRECISION": "tf32x3", "MANUAL_BF16_ROUNDING": False}
            pointers = {"w_in_ptr": dtype, "w_out_ptr": dtype, "g_ptr": dtype, "p_ptr": dtype}
        compiled = build(kernel, config, flags, pointers)
        regs, stack = _resource_usage(compiled)
        blocks = ",".join(str(v) for v in config.kwargs.values())
        lines.append(f"| {name} | {blocks} w{config.num_warps} s{config.num_stages} | {label} | {regs} | {stack} | "
                     f"{compiled.metadata.shared} | {mma_kind(compiled)} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.compile_report:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("--compile-report compiles real kernels: unset TRITON_INTERPRET")
        print("sm_90 compile report (Triton's bundled ptxas; no GPU used); configs from scrimp/optim/kernels/configs.py\n")
        print(compile_report())
        return
    if args.interpret_smoke:
        # Must precede the first import of the kernels: Triton reads it when decorating them.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.interpret_smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py measures GPU kernels and needs CUDA; none is visible here. "
                 "Run it on a GPU machine, or pass --interpret-smoke for a CPU check that the script works.")
    GaLoreAdamW, galore_note = load_galore_adamw()

    import scrimp.optim.kernels as kernels
    from scrimp.optim import functional
    from scrimp.optim.kernels import back_projection, projection

    device = torch.device("cpu" if args.interpret_smoke else "cuda")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    chosen = [dtypes[d] for d in args.dtypes.split(",")]
    residuals = [None if r == "none" else r for r in args.residuals.split(",")]
    shapes = args.shapes or (SMOKE_SHAPES if args.interpret_smoke else GPU_SHAPES)
    timer = make_timer(device)
    copy_gbs = copy_bandwidth(torch, device, timer, (1 << 24) if args.interpret_smoke else (1 << 30))
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter smoke)"

    rows = []
    try:
        from rich.progress import track
    except ImportError:  # rich is a dependency; keep the script usable without it anyway
        def track(x, description=""):
            return x
    cases = [(s, d, r) for s in shapes for d in chosen for r in residuals]
    failures, skipped, started = [], 0, time.perf_counter()

    def winners():
        if device.type != "cuda":
            return {}
        return {
            "projection": {str(k): str(v) for k, v in projection._project_adam_tuned.cache.items()},
            "back_projection": {str(k): str(v) for k, v in back_projection._back_project_update_tuned.cache.items()},
        }

    def save():
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"device": device_name, "torch": torch.__version__, "copy_GBps": copy_gbs,
                           "galore_torch": galore_note, "rows": rows, "failures": failures,
                           "autotune": winners()}, fh, indent=1)
            os.replace(tmp, args.json)

    for index, ((m, n, rank), dtype, residual) in enumerate(track(cases, description="benchmarking")):
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            skipped = len(cases) - index
            break
        label = f"{m}x{n} r{rank} {dtype} {residual or 'none'}"
        try:
            rows.append(one_case(torch, kernels, functional, GaLoreAdamW, device, timer, m, n, rank, dtype, residual))
            r = rows[-1]
            print(f"case {index + 1}/{len(cases)} {label}: fused {r['fused_ms']:.3f} ms (again "
                  f"{r['fused_again_ms']:.3f}), torch {r['torch_ms']:.3f}, AdamW {r['adamw_fused_ms']:.3f}", flush=True)
        except Exception as err:  # noqa: BLE001 - one failing case must not lose the others' numbers
            if not device.type == "cuda":
                raise
            failures.append({"case": label, "error": f"{type(err).__name__}: {err}"[:500]})
            print(f"case {index + 1}/{len(cases)} {label}: FAILED {failures[-1]['error']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    print(f"\ndevice: {device_name}; torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s (read+write)")
    if args.interpret_smoke:
        print("interpret smoke: CPU times of the Triton interpreter, not kernel performance")
    print(f"galore-torch: {galore_note or 'imported'}")
    for name, table in winners().items():
        for key, cfg in table.items():
            print(f"autotune {name} {key}: {cfg}")
    if skipped:
        print(f"--budget-s {args.budget_s:g} reached: {skipped} of {len(cases)} cases not run")
    print()
    print(markdown(rows, copy_gbs))
    save()
    if failures:
        sys.exit(f"{len(failures)} case(s) failed: " + "; ".join(f"{f['case']}: {f['error']}" for f in failures))
    # The torch path computes in P's dtype (bf16 here for bf16 weights), the kernels in fp32.
    bad = [r for r in rows if not (r["rel_err_states"] < (1e-4 if r["dtype"] == "float32" else 5e-2)
                                   and (r["dtype"] != "float32" or r["rel_err_vs_torch"] < 1e-3))]
    if bad:
        sys.exit(f"fused and torch steps disagree on {len(bad)} case(s): see the rel err column")


if __name__ == "__main__":
    main()
