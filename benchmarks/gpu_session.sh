#!/usr/bin/env bash
# Run on a lent GPU machine, from the repository root, in one device call:
#   bash benchmarks/gpu_session.sh            (writes logs and JSON under $OUT, or ./gpu_out without it)
# Every GPU check the issues ask for, in order of importance, each under its own time limit so that
# one hang cannot eat the device budget: the `gpu` tests (kernels vs float64, optimizer fused vs
# unfused, estimate_peak vs torch.cuda.max_memory_allocated), the fused-kernel benchmark, and the
# streamed zeroth-order benchmark. The machine's image has torch, triton, transformers, lightning and
# pytest-xdist but not every dependency of scrimp (no hydra-core, optuna, datasets, bitsandbytes,
# galore-torch). None of the checks below needs the missing ones except galore-torch, for the
# benchmark's comparison column: put its wheel in .whl/ (carried) and it is installed first; without
# it that column reads "—". Limits are in seconds and can be set from the environment.
set -u
out="${OUT:-gpu_out}"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "benchmarks/gpu_session.sh needs a CUDA GPU and torch with CUDA; none is visible here" >&2
  exit 2
fi
mkdir -p "$out"
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

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
        print(f"{name} MISSING ({type(err).__name__}: {err})")
EOF
} 2>&1 | tee "$out/environment.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, print the last lines
  local name=$1 limit=$2 began=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "exit $? ($name, $((SECONDS - began)) s)" >>"$out/$name.log"
  tail -n "${TAIL_LINES:-25}" "$out/$name.log"
}

# The fused-kernel benchmark first: its table is what docs/kernels.md reports. --budget-s stops starting
# new cases early enough that the table is printed before the limit.
TAIL_LINES=40 step kernels "${BENCH_LIMIT:-260}" "$py" benchmarks/kernels.py \
  --budget-s "${BENCH_BUDGET:-200}" --json "$out/kernels_bench.json"
# Every kernel test, compiled (not only the `gpu` ones: the small-shape and every-autotune-config
# tests run compiled here too), plus the peak-memory estimate against the CUDA allocator. Several
# workers, because most of the time is Triton compiling one kernel variant at a time per process.
# Each failure's traceback goes to failures.log as it happens, so a run cut short still says why.
timeout_flag=()
"$py" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout "${TEST_TIMEOUT:-100}")
SCRIMP_FAILURE_LOG="$out/failures.log" step gpu_tests "${TESTS_LIMIT:-200}" "$py" -m pytest -q -rf --tb=short \
  -p no:cacheprovider -n "${TEST_WORKERS:-8}" --durations=15 "${timeout_flag[@]}" \
  tests/optim/kernels tests/allocators/test_memory_plan.py
if [ "${ZO_LIMIT:-100}" -gt 0 ]; then
  step zo_stream "${ZO_LIMIT:-100}" "$py" benchmarks/zo_stream_gpu.py --steps 3
fi
