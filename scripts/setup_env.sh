#!/usr/bin/env bash
# Creates .venv (once), installs what plif_cuda needs, and builds the extension in place.
# Sourced by scripts/bench.sh and scripts/test.sh; quick to run again: pip runs only when
# TORCH_SPEC, requirements-dev.txt or the peer list changed since the last successful install,
# and the extension builds only when csrc/, setup.py, the build variables or the installed
# packages changed since the last successful build, or its library is gone (fingerprints in
# .venv/.plif-*-stamp). Environment: PYTHON (default python3), TORCH_SPEC (default
# torch==2.14.1), CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, PLIF_CPU_ONLY (see setup.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
# Peers and optional backends, installed without their dependency lists: SpikingJelly's would pull
# other torch, torchvision and torchaudio builds; cupy-cuda13x needs only numpy and cuda-pathfinder,
# which torch's CUDA wheel already brings. The CuPy backend's NVRTC build is tested without a GPU.
PEERS=(spikingjelly==2.0.0 "loguru>=0.7,<1" snntorch==1.0.0 cupy-cuda13x)
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
PIP_STAMP="$ROOT/.venv/.plif-pip-stamp"
BUILD_STAMP="$ROOT/.venv/.plif-build-stamp"

stamp_is() {  # stamp_is FILE FINGERPRINT: the last successful step recorded FINGERPRINT
  [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]
}

pip_fingerprint="$( { "$VENV_PY" --version; echo "$TORCH_SPEC"; printf '%s\n' "${PEERS[@]}";
                      cat requirements-dev.txt; } | sha256sum | cut -d' ' -f1)"
if stamp_is "$PIP_STAMP" "$pip_fingerprint"; then
  echo "[setup] $TORCH_SPEC and the development requirements: installed (unchanged since the last install)"
else
  rm -f "$PIP_STAMP"
  echo "[setup] installing $TORCH_SPEC and the development requirements"
  "$VENV_PY" -m pip install --quiet --upgrade pip setuptools wheel
  "$VENV_PY" -m pip install --quiet "$TORCH_SPEC" -r requirements-dev.txt
  "$VENV_PY" -m pip install --quiet --no-deps "${PEERS[@]}"
  echo "$pip_fingerprint" > "$PIP_STAMP"
fi

# Fashion-MNIST, the main example's data and a test's: Debian's package, when apt-get can install it.
# FASHION_MNIST_DIR: where the package puts the files (the tests point it elsewhere).
FASHION_MNIST_PACKAGE=dataset-fashion-mnist
FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -d "$FASHION_MNIST_DIR" ]; then
  echo "[setup] Fashion-MNIST: installed in $FASHION_MNIST_DIR"
elif command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's $FASHION_MNIST_PACKAGE (Fashion-MNIST, into $FASHION_MNIST_DIR)"
  # A fresh image has no package lists: update only when the install cannot find the package.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$FASHION_MNIST_PACKAGE" > /dev/null 2>&1 ||
    { apt-get update -q > /dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$FASHION_MNIST_PACKAGE" > /dev/null; } ||
    echo "[setup] warning: apt-get could not install $FASHION_MNIST_PACKAGE; the Fashion-MNIST example" \
         "and its tests need it" >&2
else
  echo "[setup] Fashion-MNIST not installed and apt-get cannot install it here (it needs root and apt-get):" \
       "run 'apt-get install $FASHION_MNIST_PACKAGE' as root for the Fashion-MNIST example and its tests" >&2
fi

# nvcc on PATH may be a wrapper script; point torch's cpp_extension at the toolkit root.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# The built library (its build information inside), by size and modification time: a build by
# other means (another pip install, a deleted .so) makes the stamp stale.
built_files() {
  local files=(plif_cuda/_C*.so)
  [ -f "${files[0]}" ] && stat -c '%n %s %Y' "${files[@]}"
}
source_fingerprint="$( { echo "$pip_fingerprint";
                         for name in PLIF_CPU_ONLY CUDA_HOME TORCH_CUDA_ARCH_LIST PLIF_PTXAS_VERBOSE; do
                           echo "$name=${!name:-}"; done;
                         find csrc setup.py -type f -print0 | sort -z | xargs -0 sha256sum;
                       } | sha256sum | cut -d' ' -f1)"
if built="$(built_files)" && stamp_is "$BUILD_STAMP" "$source_fingerprint $(echo "$built" | sha256sum)"; then
  echo "[setup] extension up to date (nothing it is built from changed since the last build)"
else
  rm -f "$BUILD_STAMP"
  echo "[setup] building the extension (CUDA_HOME=${CUDA_HOME:-none}, MAX_JOBS=$MAX_JOBS); log in .build.log"
  if ! "$VENV_PY" -m pip install --no-build-isolation --no-deps -v -e . > .build.log 2>&1; then
    tail -n 60 .build.log
    echo "[setup] the build failed; the whole log is in $ROOT/.build.log" >&2
    exit 1
  fi
  # pip -v indents what setup.py prints, and setup.py runs more than once.
  grep -m1 -E "^\s*plif_cuda: building" .build.log | sed -E 's/^\s*/[setup] /' || true
  built="$(built_files)" && echo "$source_fingerprint $(echo "$built" | sha256sum)" > "$BUILD_STAMP"
fi
"$VENV_PY" -c "import plif_cuda; print('[setup] plif_cuda ready; backends on cpu:', plif_cuda.available_backends('cpu'))"
