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
# nvcc on PATH may be a wrapper script; point torch's cpp_extension at the toolkit root.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "[setup] building the extension (CUDA_HOME=${CUDA_HOME:-none}, MAX_JOBS=$MAX_JOBS)"
"$VENV_PY" -m pip install --no-build-isolation --no-deps --quiet -e .
"$VENV_PY" -c "import plif_cuda; print('[setup] plif_cuda ready; backends on cpu:', plif_cuda.available_backends('cpu'))"
