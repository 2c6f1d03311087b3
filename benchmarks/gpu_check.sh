#!/usr/bin/env bash
# One command for a GPU machine: bash benchmarks/gpu_check.sh OUT_DIR
#
#  1. builds the extension in place for the visible GPU's architecture only (MAX_JOBS=16);
#  2. runs tests/test_cuda.py;
#  3. runs the GPU goal benchmark (bench_lstm.py --device cuda --sets goals, float32 and
#     bfloat16, against nn.LSTM and nn.LSTM replayed from a CUDA graph);
#  4. runs a small subset of the CUDA tests (every step kernel and tile and the persistent
#     kernels once, small sizes) under
#     compute-sanitizer --tool memcheck and --tool racecheck, where compute-sanitizer works;
#  5. writes OUT_DIR/summary.json (benchmarks/gpu_summary.py) beside the logs of every step.
# Each step has a time limit, together 5 min 45 s (build 120 s, tests 100 s, benchmark 55 s, the
# two sanitizers side by side 70 s): a step that runs out is reported as failed (status 124) and
# the others still run. Without a CUDA GPU it stops at once with a message and exit status 2.
# Exit status 1: a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2
  exit 2
fi
out=$1
python=${PYTHON:-python3}

arch=$("$python" -c '
import torch
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    raise SystemExit(1)
major, minor = torch.cuda.get_device_capability(0)
print(f"{major}{minor}")' 2>/dev/null)
if [ -z "$arch" ]; then
  echo "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False): nothing to check" >&2
  exit 2
fi
echo "gpu_check: GPU of compute capability $arch; logs and summary.json in $out"
mkdir -p "$out"
steps="$out/steps.tsv"  # step, exit status, seconds
: >"$steps"

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output in OUT_DIR/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
  local status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - began))" >>"$steps"
  echo "gpu_check: $name: exit status $status after $((SECONDS - began)) s"
  return $status
}

# One architecture, the C++ sources and both .cu files in parallel, and nvcc's optimisation of
# each .cu file split over every core (the step kernels' about 90 s of one core otherwise, for
# sm_90).
export LSTM_FUSED_CUDA=1 LSTM_FUSED_CUDA_ARCHS=$arch MAX_JOBS=${MAX_JOBS:-16}
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} --split-compile=0"
export PYTHONUNBUFFERED=1
if step build 120 "$python" setup.py build_ext --inplace; then
  step tests 100 "$python" -m pytest -q -rfE tests/test_cuda.py -p no:cacheprovider \
    --junitxml="$out/test_cuda.xml"
  step benchmark 55 "$python" benchmarks/bench_lstm.py --device cuda --sets goals \
    --dtype float32,bfloat16 --providers nn.LSTM,nn.LSTM+graph,lstm_fused --repeats 7 \
    --warmup 1 --row-budget 3 --no-progress --out "$out/benchmark"
  subset=(-m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k every_kernel_once)
  if command -v compute-sanitizer >/dev/null && compute-sanitizer --version >/dev/null 2>&1; then
    step memcheck 70 compute-sanitizer --tool memcheck --error-exitcode 3 "$python" "${subset[@]}" &
    step racecheck 70 compute-sanitizer --tool racecheck --error-exitcode 3 "$python" "${subset[@]}" &
    wait
  else
    echo "compute-sanitizer is not installed or does not run here" >"$out/memcheck.log"
    cp "$out/memcheck.log" "$out/racecheck.log"
    printf 'memcheck\tabsent\t0\nracecheck\tabsent\t0\n' >>"$steps"
    echo "gpu_check: compute-sanitizer is not available: no memcheck or racecheck"
  fi
fi
"$python" benchmarks/gpu_summary.py "$out"
