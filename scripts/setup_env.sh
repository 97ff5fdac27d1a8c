#!/usr/bin/env bash
# Creates .venv (once), installs what plif_cuda needs, and builds the extension in place.
# Sourced by scripts/bench.sh and scripts/test.sh; safe to run again (reuses .venv, rebuilds
# only what changed). Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.14.1),
# CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, PLIF_CPU_ONLY (see setup.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
echo "[setup] installing $TORCH_SPEC and the development requirements"
"$VENV_PY" -m pip install --quiet --upgrade pip setuptools wheel
"$VENV_PY" -m pip install --quiet "$TORCH_SPEC" -r requirements-dev.txt
# Peers and optional backends, without their dependency lists: SpikingJelly's would pull other
# torch, torchvision and torchaudio builds; cupy-cuda13x needs only numpy and cuda-pathfinder,
# which torch's CUDA wheel already brings. The CuPy backend's NVRTC build is tested without a GPU.
"$VENV_PY" -m pip install --quiet --no-deps spikingjelly==2.0.0 "loguru>=0.7,<1" snntorch==1.0.0 cupy-cuda13x
# nvcc on PATH may be a wrapper script; point torch's cpp_extension at the toolkit root.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "[setup] building the extension (CUDA_HOME=${CUDA_HOME:-none}, MAX_JOBS=$MAX_JOBS); log in .build.log"
if ! "$VENV_PY" -m pip install --no-build-isolation --no-deps -v -e . > .build.log 2>&1; then
  tail -n 60 .build.log
  echo "[setup] the build failed; the whole log is in $ROOT/.build.log" >&2
  exit 1
fi
grep -E "^plif_cuda: building" .build.log || true
"$VENV_PY" -c "import plif_cuda; print('[setup] plif_cuda ready; backends on cpu:', plif_cuda.available_backends('cpu'))"
