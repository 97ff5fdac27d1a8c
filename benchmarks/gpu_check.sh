#!/usr/bin/env bash
# One-shot check of plif_cuda on a fresh GPU machine (torch, nvcc, ninja; cuobjdump and
# compute-sanitizer from the toolkit): builds the extension in place, checks the compiled kernels
# (cubins, spills, loads in flight read from the SASS), runs the GPU tests, a few launches under
# compute-sanitizer memcheck and racecheck, the rest of the test suite and the GPU benchmark (with
# the device's copy bandwidth measured in the same run), and writes everything into one folder.
# Sized for one 8-minute call on a 16-core H200 machine.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      (default: benchmarks/results/gpu-<UTC date-time>)
#
# Environment (all optional):
#   PYTHON                  interpreter with torch (default: python3)
#   CUDA_HOME               CUDA toolkit root (default: setup.py's guess)
#   TORCH_CUDA_ARCH_LIST    architectures to build (default: 9.0, enough for an H200 and fast)
#   MAX_JOBS                parallel compile jobs (default: all cores)
#   GPU_CHECK_BUDGET_S      wall-clock budget for the whole script (default 450 s); each phase
#                           gets at most what is left, so the script ends within it
#   SPIKINGJELLY_WHEEL      a SpikingJelly wheel to install first (--no-deps), so that the
#                           benchmark runs its GPU path beside ours
#
# Exit status 0 only when every phase passed. The folder holds:
#   summary.txt       one line per phase with its status and duration
#   environment.txt   GPU, driver, toolkit, Python package versions, git revision
#   nvidia-smi.txt    nvidia-smi before and after the runs
#   build.log         the full build output, with the ptxas report (PLIF_PTXAS_VERBOSE=1)
#   ptxas.txt         just the ptxas lines of build.log
#   build_check.txt   .ci/check_cuda_build.py: cubins, no spills or local memory, loads in flight,
#                     resident threads per SM (half an SM, or the exceptions it lists)
#   pytest-gpu.log, junit-gpu.xml      the CUDA (and CuPy) test files
#   memcheck.log, racecheck.log        benchmarks/gpu_sanitizer_launches.py under compute-sanitizer
#   pytest-rest.log, junit-rest.xml    the rest of the suite
#   benchmark/, benchmark.log          benchmarks/run.py --devices cuda --out benchmark
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

OUT=${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)

PYTHON=${PYTHON:-python3}
SANITIZER=compute-sanitizer
if [[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/compute-sanitizer ]]; then SANITIZER=$CUDA_HOME/bin/compute-sanitizer; fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PLIF_PTXAS_VERBOSE=1
FAILED=0

log() {
  echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*"
}

# Seconds left for a phase: the smaller of its cap and what remains of the budget.
time_left() {
  local cap=$1 left=$((BUDGET_S - SECONDS))
  if ((left < cap)); then cap=$left; fi
  if ((cap < 1)); then cap=1; fi
  echo "$cap"
}

# run_phase NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND with its output in LOGFILE and
# records the outcome in summary.txt.
run_phase() {
  local name=$1 cap=$2 logfile=$3 limit start status verdict
  shift 3
  limit=$(time_left "$cap")
  start=$SECONDS
  log "$name (limit ${limit}s) -> ${logfile#"$OUT"/}"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$logfile" 2>&1
  status=$?
  case $status in
    0) verdict=passed ;;
    124 | 137) verdict="TIMED OUT after ${limit}s" ;;
    5) verdict="FAILED (no tests collected)" ;;
    *) verdict="FAILED (exit $status)" ;;
  esac
  if ((status != 0)); then
    FAILED=1
    tail -n 20 "$logfile"
  fi
  printf '%-12s %-28s %4ds\n' "$name" "$verdict" $((SECONDS - start)) >>"$OUT/summary.txt"
  log "$name: $verdict"
  return "$status"
}

: >"$OUT/summary.txt"

{
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout') $(git status --porcelain 2>/dev/null | grep -q . && echo '(modified)')"
  echo "host: $(uname -srm), $(nproc) cores"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset}"
  echo
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv 2>&1
  echo
  if [[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]]; then "$CUDA_HOME/bin/nvcc" --version; else nvcc --version; fi 2>&1
  echo
  "$SANITIZER" --version 2>&1 | head -n 3
  echo
  "$PYTHON" - <<'EOF' 2>&1
import importlib
import platform

print("python", platform.python_version())
for name in ("torch", "triton", "cupy", "numpy", "pytest", "ninja"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "not importable:", error)
import torch

print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available(),
      "| devices", torch.cuda.device_count())
EOF
} >"$OUT/environment.txt"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

if [[ -n ${SPIKINGJELLY_WHEEL:-} ]]; then
  run_phase spikingjelly 60 "$OUT/spikingjelly.log" "$PYTHON" -m pip install --no-deps "$SPIKINGJELLY_WHEEL"
fi

run_phase build 240 "$OUT/build.log" "$PYTHON" setup.py build_ext --inplace
grep -E '^ptxas|bytes stack frame' "$OUT/build.log" >"$OUT/ptxas.txt"

# The architectures just built, as check_cuda_build.py --arch arguments ("8.0;9.0+PTX" -> 80 90).
ARCH_ARGS=()
IFS='; ' read -r -a ARCHS <<<"$TORCH_CUDA_ARCH_LIST"
for arch in "${ARCHS[@]}"; do
  arch=${arch%+PTX}
  [[ -n $arch ]] && ARCH_ARGS+=(--arch "${arch//./}")
done
run_phase build-check 60 "$OUT/build_check.txt" \
  "$PYTHON" .ci/check_cuda_build.py "${ARCH_ARGS[@]}" --ptxas-log "$OUT/build.log"

run_phase has-cuda 60 "$OUT/has_cuda.txt" "$PYTHON" -c '
import torch
from plif_cuda import _build_info, ops
assert torch.cuda.is_available(), "torch sees no GPU"
assert ops.extension_has_cuda(), f"the extension has no CUDA kernels: {_build_info.CUDA_SKIPPED_BECAUSE}"
print("CUDA kernels registered; GPU:", torch.cuda.get_device_name())
'

GPU_TESTS=(tests/test_cuda.py)
for extra in tests/test_cupy*.py; do
  [[ -e $extra ]] && GPU_TESTS+=("$extra")
done
run_phase gpu-tests 180 "$OUT/pytest-gpu.log" \
  "$PYTHON" -m pytest "${GPU_TESTS[@]}" -rs --durations=10 -p no:cacheprovider --junitxml="$OUT/junit-gpu.xml"

# Memory errors (out-of-bounds or misaligned accesses) and shared-memory races in a few launches
# that cover both memory paths, short chunks and the CuPy launcher.
for tool in memcheck racecheck; do
  run_phase "$tool" 90 "$OUT/$tool.log" \
    "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" benchmarks/gpu_sanitizer_launches.py
done

if [[ -f benchmarks/run.py ]]; then
  # The sizes and dtypes whose GB/s benchmarks/NOTES.md predicts; run.py measures the copy
  # bandwidth of the device first, in the same process.
  run_phase benchmark 150 "$OUT/benchmark.log" "$PYTHON" benchmarks/run.py --devices cuda \
    --T 8 --neurons 2^16,2^18,2^20,2^24 --dtypes fp32,fp16,bf16 --tau layer --peers spikingjelly --no-network \
    --out "$OUT/benchmark"
else
  printf '%-12s %-28s\n' benchmark "skipped (no benchmarks/run.py)" >>"$OUT/summary.txt"
fi

IGNORES=()
for done_file in "${GPU_TESTS[@]}"; do IGNORES+=(--ignore "$done_file"); done
run_phase rest-tests 180 "$OUT/pytest-rest.log" \
  "$PYTHON" -m pytest tests "${IGNORES[@]}" -rs --durations=10 -p no:cacheprovider --junitxml="$OUT/junit-rest.xml"

nvidia-smi >>"$OUT/nvidia-smi.txt" 2>&1
if ((FAILED)); then OVERALL=FAILED; else OVERALL=passed; fi
printf '%-12s %-28s %4ds\n' total "$OVERALL" "$SECONDS" >>"$OUT/summary.txt"
log "done; results in $OUT"
cat "$OUT/summary.txt"
exit "$FAILED"
