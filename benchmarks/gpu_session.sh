#!/usr/bin/env bash
# Run on a lent GPU machine, from the repository root, in one device call:
#   bash benchmarks/gpu_session.sh            (writes logs and JSON under $OUT, or ./gpu_out without it)
# Every GPU check the issues ask for, in order of importance, each under its own time limit so that
# one hang cannot eat the device budget: the `gpu` tests (kernels vs float64, optimizer fused vs
# unfused, estimate_peak vs torch.cuda.max_memory_allocated), the fused-kernel benchmark, and the
# streamed zeroth-order benchmark. The machine's image has torch, triton, transformers and lightning
# but not every dependency of scrimp (no hydra-core, optuna, datasets, bitsandbytes, galore-torch):
# carry wheels for those where a check needs them; a missing one is reported, not fatal.
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "lightning", "bitsandbytes", "galore_torch", "datasets",
             "hydra", "optuna", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as err:  # noqa: BLE001 - report any import failure, keep going
        print(f"{name} MISSING ({type(err).__name__})")
EOF
} 2>&1 | tee "$out/environment.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, print the last lines
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "exit $? ($name)" >>"$out/$name.log"
  tail -n 25 "$out/$name.log"
}

step gpu_tests 240 "$py" -m pytest -q -m gpu -p no:cacheprovider \
  tests/optim/kernels tests/allocators/test_memory_plan.py
step fused_kernels 300 "$py" benchmarks/fused_kernels.py --json "$out/kernels_bench.json"
step zo_stream 240 "$py" benchmarks/zo_stream_gpu.py
