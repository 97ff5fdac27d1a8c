"""Build plif_cuda's extension with torch's cpp_extension and ninja.

The CPU kernels are always built. The CUDA kernels are built whenever nvcc and a CUDA build
of torch are present, whether or not this machine has a GPU.

Environment:
    CUDA_HOME               toolkit root (default: torch's guess; set it when nvcc on PATH is a wrapper)
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;8.6;8.9;9.0+PTX")
    MAX_JOBS                parallel compile jobs
    PLIF_CPU_ONLY=1         skip the CUDA kernels even where they could be built
    PLIF_PTXAS_VERBOSE=1    print ptxas register/spill report for every kernel
"""

import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# Installed into plif_cuda/csrc/ for the CuPy backend's run-time compile.
KERNEL_SOURCES = ("*.h", "*.cuh")


def find_cuda_home():
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if (Path(env) / "bin" / "nvcc").exists() else None
    for candidate in ("/usr/local/cuda",):
        if (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def cuda_build_reason(torch):
    """None when the CUDA kernels can be built, else why not."""
    if os.environ.get("PLIF_CPU_ONLY") == "1":
        return "PLIF_CPU_ONLY=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if find_cuda_home() is None:
        env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        if env:
            return f"no nvcc at {Path(env) / 'bin' / 'nvcc'} (CUDA_HOME/CUDA_PATH must be the CUDA toolkit root)"
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
    return None


def extensions():
    import torch
    from torch.utils import cpp_extension

    # Every C++ file of csrc/: the CPU kernels come in parts that the compiler runs in parallel.
    sources = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").glob("*.cpp"))
    # No contraction of a*b+c into FMA: spikes must equal the reference's bit for bit.
    # -fno-trapping-math changes no result (it lets the vectoriser if-convert selects around
    # float-to-int conversions); -ffast-math is never used, it would reorder the arithmetic.
    # -g0: no debug information (Python's default flags ask for it), a fifth of the compile time.
    cxx = ["-O3", "-g0", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
    link = ["-fopenmp"]
    kwargs = dict(
        name="plif_cuda._C",
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=link,
        py_limited_api=False,
    )
    reason = cuda_build_reason(torch)
    archs = ""
    if reason is None:
        cuda_home = find_cuda_home()
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        # --threads=0: one nvcc thread per architecture (the kernels take ~20 s of ptxas each).
        nvcc = ["-O3", "--fmad=false", "-lineinfo", "--threads=0"]
        if os.environ.get("PLIF_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        ext = cpp_extension.CUDAExtension(
            sources=sources + ["csrc/plif_cuda.cu", "csrc/plif_bn_cuda.cu"],
            extra_compile_args={"cxx": cxx + ["-DPLIF_WITH_CUDA"], "nvcc": nvcc + ["-DPLIF_WITH_CUDA"]},
            **kwargs,
        )
        print(f"plif_cuda: building CPU and CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})", file=sys.stderr)
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
        print(f"plif_cuda: building the CPU kernels only ({reason})", file=sys.stderr)
    ext.include_dirs.append(str(write_build_info(torch.__version__, archs, reason)))
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def write_build_info(torch_version: str, archs: str, reason: str | None) -> Path:
    """The build information as a header in the build folder (csrc/plif_ops.cpp makes it attributes
    of plif_cuda._C); rewritten only when it changes, so that an unchanged build stays built."""
    folder = ROOT / "build" / "generated"
    header = folder / "plif_build_info.h"
    # json.dumps of a str is a valid C string literal.
    text = (
        "// Written by setup.py: what plif_cuda._C reports as its build information.\n"
        f"#define PLIF_TORCH_VERSION {json.dumps(torch_version)}\n"
        f"#define PLIF_CUDA_ARCHS {json.dumps(archs)}\n"
        f"#define PLIF_CUDA_SKIPPED_BECAUSE {json.dumps(reason or '')}\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    if not header.is_file() or header.read_text() != text:
        header.write_text(text)
    return folder


class build_py_with_kernel_sources(build_py):
    """Ship the kernel sources inside the package (plif_cuda/csrc/): the CuPy backend compiles
    them at run time with NVRTC."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "plif_cuda" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for pattern in KERNEL_SOURCES:
            for header in sorted((ROOT / "csrc").glob(pattern)):
                self.copy_file(str(header), str(target / header.name))


ext_modules, cmdclass = extensions()
cmdclass["build_py"] = build_py_with_kernel_sources

# The package's metadata, version and dependencies are in pyproject.toml; this file builds the extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
