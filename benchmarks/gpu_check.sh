#!/usr/bin/env bash
# The one-shot check of plif_cuda on a fresh GPU machine, sized for one call of at most 8 minutes
# (420 s of phases) that returns at most 8 files. Phases run in the order that makes a cut run
# useful; each has its own time cap, and after each one everything so far is packed into OUT_DIR:
#
#   summary.txt          one line per phase: name, verdict, seconds (the first file to read)
#   environment.txt      GPU, driver, toolkit, Python packages, git revision
#   results.tar.gz       every phase's log and output (build log, ptxas report, JSON results, junit)
#   smoke.txt, kernels.json, benchmark.json, bn_plif.json, anchors.json
#                        the figures, also outside the archive
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]  here: every phase up to its first GPU call
#
# OUT_DIR defaults to $OUT (the device tool's folder) and then to benchmarks/runs/gpu-<UTC time>.
# The dry run may use an extension already built in place (CI's) instead of building one; it
# fails on anything but the want of a GPU. Wheels the GPU machine lacks (benchmarks/gpu_wheels.txt
# says which and how to download them) are installed from benchmarks/wheels/ when present.
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default
# all cores), GPU_CHECK_BUDGET_S (default 420).
set -uo pipefail

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT_DIR=${1:-${OUT:-benchmarks/runs/gpu-$(date -u +%Y%m%d-%H%M%S)}}
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PLIF_PTXAS_VERBOSE=1
export PYTHONUNBUFFERED=1
# The tree is built in place, not installed: every script imports the package from here.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
SANITIZER=$CUDA_HOME/bin/compute-sanitizer
[[ -x $SANITIZER ]] || SANITIZER=compute-sanitizer
DRY=()
((DRY_RUN)) && DRY=(--dry-run)
FAILED=0

log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*"; }

# Packs what is done into OUT_DIR (at most 8 files), so that a call cut at any point returns it.
pack() {
  tar -czf "$OUT_DIR/results.tar.gz.part" --exclude=./site -C "$WORK" . && mv "$OUT_DIR/results.tar.gz.part" "$OUT_DIR/results.tar.gz"
  for name in summary.txt environment.txt smoke.txt kernels.json benchmark.json bn_plif.json anchors.json; do
    [[ -f $WORK/$name ]] && cp "$WORK/$name" "$OUT_DIR/$name"
  done
}

# run_phase NAME CAP_SECONDS COMMAND...: runs COMMAND for at most CAP seconds (less if the budget
# has less left), its output in NAME.log, and records the outcome in summary.txt.
run_phase() {
  local name=$1 cap=$2 left status verdict start=$SECONDS
  shift 2
  left=$((BUDGET_S - SECONDS))
  ((left < cap)) && cap=$left
  if ((cap < 5)); then
    verdict="SKIPPED (budget spent)"
    status=1
  else
    log "$name (limit ${cap}s)"
    timeout --signal=INT --kill-after=10 "$cap" "$@" >"$WORK/$name.log" 2>&1
    status=$?
    case $status in
      0) verdict=passed ;;
      124 | 137) verdict="TIMED OUT after ${cap}s" ;;
      *) verdict="FAILED (exit $status)" ;;
    esac
  fi
  if ((status != 0)); then
    FAILED=1
    [[ -f $WORK/$name.log ]] && tail -n 15 "$WORK/$name.log"
  fi
  printf '%-12s %-30s %4ds\n' "$name" "$verdict" $((SECONDS - start)) >>"$WORK/summary.txt"
  log "$name: $verdict"
  pack
  return "$status"
}

environment() {
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry run: $DRY_RUN"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
  echo "host: $(uname -srm), $(nproc) cores; CUDA_HOME=$CUDA_HOME MAX_JOBS=$MAX_JOBS"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem --format=csv
  "$CUDA_HOME/bin/nvcc" --version | tail -n 2
  "$SANITIZER" --version | head -n 2
  "$PYTHON" -c '
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "cupy", "numpy", "pytest", "spikingjelly", "loguru"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(name, "not importable:", type(error).__name__, error)
import torch
print("torch.version.cuda", torch.version.cuda, "| GPUs", torch.cuda.device_count())
'
}

: >"$WORK/summary.txt"
environment >"$WORK/environment.txt" 2>&1
pack

if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
  run_phase wheels 30 "$PYTHON" -m pip install --no-index --no-deps --no-compile --target "$WORK/site" benchmarks/wheels/*.whl
fi

if ((DRY_RUN)) && compgen -G "plif_cuda/_C*.so" >/dev/null; then
  log "dry run: taking the extension already built in place"
  BUILD_LOG=$REPO/.build.log
else
  run_phase build 200 "$PYTHON" setup.py build_ext --inplace
  BUILD_LOG=$WORK/build.log
fi
grep -E '^ptxas|bytes stack frame' "$BUILD_LOG" >"$WORK/ptxas.txt" 2>/dev/null
run_phase build-check 60 "$PYTHON" .ci/check_cuda_build.py --arch 90 --ptxas-log "$BUILD_LOG"

# One forward+backward per dtype on both launchers against the CPU op: the first GPU figures.
run_phase smoke 45 "$PYTHON" benchmarks/gpu_smoke.py "${DRY[@]}" --out "$WORK/smoke.txt"

# Kernel-only (CUDA-graph replay) and per-call times at the sizes benchmarks/NOTES.md predicts.
run_phase kernels 45 "$PYTHON" benchmarks/run.py "${DRY[@]}" --devices cuda --backends cuda --T 8 \
  --neurons 2^16,2^18,2^20,2^24 --dtypes fp32,fp16,bf16 --tau layer --peers none --no-network --kernel-only on \
  --out "$WORK" --name kernels

# The same cases beside SpikingJelly's GPU paths (CuPy and Triton) and our CuPy launcher.
run_phase benchmark 90 "$PYTHON" benchmarks/run.py "${DRY[@]}" --devices cuda --T 8 \
  --neurons 2^20,2^24 --dtypes fp32,fp16 --tau layer --peers spikingjelly --no-network --kernel-only off \
  --out "$WORK" --name benchmark

# The fused BatchNorm + PLIF block: bit for bit against the CPU op (the phase fails where it is not),
# the pair against nn.BatchNorm2d + our PLIF, and the Fashion-MNIST network's step and peak memory.
run_phase bn 45 "$PYTHON" benchmarks/bn_plif.py "${DRY[@]}" --device cuda --rounds 5 --network-rounds 2 \
  --json "$WORK/bn_plif.json"

# The anchors' own configurations: SpikingJelly's Triton tutorial and the Open Neuromorphic case.
run_phase anchors 60 "$PYTHON" benchmarks/anchors.py "${DRY[@]}" --out "$WORK/anchors.json"

GPU_TESTS=(tests/test_cuda.py tests/test_traffic.py -p no:cacheprovider -q -rs --junitxml="$WORK/junit-gpu.xml")
((DRY_RUN)) && GPU_TESTS+=(--collect-only)
run_phase gpu-tests 60 "$PYTHON" -m pytest "${GPU_TESTS[@]}"

# The caching allocator would hide out-of-bounds accesses inside its segments from memcheck.
for tool in memcheck initcheck; do
  if ((DRY_RUN)); then
    run_phase "$tool" 30 "$PYTHON" benchmarks/gpu_sanitizer_launches.py --dry-run
  else
    run_phase "$tool" 30 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" benchmarks/gpu_sanitizer_launches.py
  fi
done

if ((FAILED)); then OVERALL=FAILED; else OVERALL=passed; fi
printf '%-12s %-30s %4ds\n' total "$OVERALL" "$SECONDS" >>"$WORK/summary.txt"
pack
log "done; results in $OUT_DIR"
cat "$WORK/summary.txt"
exit "$FAILED"
