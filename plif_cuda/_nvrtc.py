"""NVRTC programs of the fused kernels: what the CuPy backend compiles at run time and what
``python -m plif_cuda doctor --nvrtc-arch`` compiles without a GPU. Both go through
``compile_variant`` below, so the doctor proves exactly the build the backend does.

The program is compiled here rather than by ``cupy.RawModule(code=...)`` because CuPy appends
``-ftz=true`` to every NVRTC compile, and flushing denormals would break bit-equality with the
nvcc-built extension (and with the reference). CuPy loads the resulting cubin and launches it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

# dtype of x -> (in_t, acc_t) template arguments of the kernels in csrc/plif_kernels.cuh.
VARIANTS = {
    torch.float32: ("float", "float"),
    torch.float64: ("double", "double"),
    torch.float16: ("__half", "float"),
    torch.bfloat16: ("__nv_bfloat16", "float"),
}

KERNEL_HEADER = "plif_kernels.cuh"
_PACKAGE_DIR = Path(__file__).resolve().parent


def kernel_source_dir() -> Path:
    """The folder holding plif_kernels.cuh and the headers it includes.

    An installed package carries a copy in plif_cuda/csrc (setup.py's build_py puts it there);
    a source checkout has them in the repository's csrc/.
    """
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / KERNEL_HEADER).is_file():
            return candidate
    raise FileNotFoundError(
        f"the kernel sources ({KERNEL_HEADER}) are neither in {_PACKAGE_DIR / 'csrc'} (installed package) "
        f"nor in {_PACKAGE_DIR.parent / 'csrc'} (source checkout); reinstall plif_cuda"
    )


def _has_half_headers(folder) -> bool:
    return folder is not None and (Path(folder) / "cuda_fp16.h").is_file() and (Path(folder) / "cuda_bf16.h").is_file()


def cuda_include_dir() -> Path:
    """A folder with cuda_fp16.h and cuda_bf16.h, which NVRTC does not carry built in.

    Looked for in $CUDA_HOME / $CUDA_PATH, then where cuda-pathfinder finds the CUDA runtime
    headers (the nvidia pip wheels that come with torch, conda, a toolkit), then the usual
    toolkit locations.
    """
    candidates = [Path(os.environ[var]) / "include" for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            candidates.append(Path(found))
    except (ImportError, RuntimeError):
        pass
    candidates.append(Path("/usr/local/cuda/include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    for candidate in candidates:
        if _has_half_headers(candidate):
            return candidate
    raise FileNotFoundError(
        "cuda_fp16.h / cuda_bf16.h not found (looked in " + ", ".join(str(c) for c in candidates) + "); "
        "set CUDA_HOME to a CUDA toolkit or pip install the CUDA runtime headers (nvidia-cuda-runtime)"
    )


def kernel_names(dtype: torch.dtype) -> dict[str, str]:
    """Name expressions of the kernels for inputs of ``dtype``, by what they launch: "forward",
    "backward" (from X and the checkpoints), and "finish_shares" (the fixed-order sum of a shared
    k's or v_init's per-block partials)."""
    if dtype not in VARIANTS:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {dtype}")
    in_t, acc_t = VARIANTS[dtype]
    return {
        "forward": f"plif::plif_forward_kernel<{in_t}, {acc_t}>",
        "backward": f"plif::plif_backward_kernel<{in_t}, {acc_t}>",
        "finish_shares": f"plif::plif_finish_shares_kernel<{acc_t}>",
    }


def program(dtype: torch.dtype) -> tuple[str, list[str]]:
    """Source text and name expressions of the kernels for inputs of ``dtype``."""
    return f'#include "{KERNEL_HEADER}"\n', list(kernel_names(dtype).values())


def compile_options(arch: str) -> list[str]:
    """NVRTC options for ``arch`` (``sm_XX`` gives a cubin, ``compute_XX`` PTX)."""
    return [
        # The nvcc build's floating-point semantics: no contraction into FMA (spikes are
        # discontinuous in H), IEEE division and square root, denormals kept.
        "--fmad=false",
        "--ftz=false",
        "--prec-div=true",
        "--prec-sqrt=true",
        "-std=c++17",
        # plif_params.h has an unannotated helper for the host launchers; NVRTC refuses host
        # functions unless they default to device ones.
        "-default-device",
        f"--gpu-architecture={arch}",
        f"-I{kernel_source_dir()}",
        f"-I{cuda_include_dir()}",
    ]


class NvrtcCompileError(RuntimeError):
    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n{log}" if log else message)
        self.log = log


@dataclasses.dataclass
class CompiledProgram:
    image: bytes  # cubin for sm_XX, PTX (NUL-terminated) for compute_XX
    lowered_names: dict[str, str]  # name expression -> mangled kernel name
    log: str


class _CupyNvrtc:
    """NVRTC through CuPy's binding: the one the backend uses, since CuPy is there."""

    name = "cupy"

    def __init__(self):
        from cupy.cuda import nvrtc

        self._nvrtc = nvrtc

    def version(self) -> tuple[int, int]:
        return tuple(self._nvrtc.getVersion())

    def supported_archs(self) -> list[int]:
        return list(self._nvrtc.getSupportedArchs())

    def compile(self, source: str, options: list[str], names: list[str], want_cubin: bool) -> CompiledProgram:
        nvrtc = self._nvrtc
        prog = nvrtc.createProgram(source, "plif_kernels.cu", (), ())
        try:
            for name in names:
                nvrtc.addNameExpression(prog, name)
            try:
                nvrtc.compileProgram(prog, options)
            except nvrtc.NVRTCError as error:
                raise NvrtcCompileError(f"NVRTC failed ({error})", nvrtc.getProgramLog(prog)) from None
            image = nvrtc.getCUBIN(prog) if want_cubin else nvrtc.getPTX(prog)
            lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
            return CompiledProgram(image, lowered, nvrtc.getProgramLog(prog))
        finally:
            nvrtc.destroyProgram(prog)


class _CudaBindingsNvrtc:
    """NVRTC through cuda-bindings (a dependency of torch's CUDA 13 wheels), for when CuPy is absent."""

    name = "cuda-bindings"

    def __init__(self):
        from cuda.bindings import nvrtc

        self._nvrtc = nvrtc

    def _check(self, result, what: str):
        error, *values = result
        if error != self._nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NvrtcCompileError(f"NVRTC {what} failed ({error.name})", "")
        return values[0] if len(values) == 1 else values

    def version(self) -> tuple[int, int]:
        return tuple(self._check(self._nvrtc.nvrtcVersion(), "version"))

    def supported_archs(self) -> list[int]:
        return list(self._check(self._nvrtc.nvrtcGetSupportedArchs(), "getSupportedArchs"))

    def _log(self, prog) -> str:
        size = self._check(self._nvrtc.nvrtcGetProgramLogSize(prog), "getProgramLogSize")
        buffer = _writable(size)
        self._check(self._nvrtc.nvrtcGetProgramLog(prog, buffer), "getProgramLog")
        return bytes(buffer).rstrip(b"\0").decode(errors="replace")

    def compile(self, source: str, options: list[str], names: list[str], want_cubin: bool) -> CompiledProgram:
        nvrtc = self._nvrtc
        prog = self._check(nvrtc.nvrtcCreateProgram(source.encode(), b"plif_kernels.cu", 0, [], []), "createProgram")
        try:
            for name in names:
                self._check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), "addNameExpression")
            encoded = [option.encode() for option in options]
            error = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)[0]
            if error != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise NvrtcCompileError(f"NVRTC failed ({error.name})", self._log(prog))
            if want_cubin:
                size = self._check(nvrtc.nvrtcGetCUBINSize(prog), "getCUBINSize")
                image = _writable(size)
                self._check(nvrtc.nvrtcGetCUBIN(prog, image), "getCUBIN")
            else:
                size = self._check(nvrtc.nvrtcGetPTXSize(prog), "getPTXSize")
                image = _writable(size)
                self._check(nvrtc.nvrtcGetPTX(prog, image), "getPTX")
            lowered = {
                name: self._check(nvrtc.nvrtcGetLoweredName(prog, name.encode()), "getLoweredName").decode()
                for name in names
            }
            return CompiledProgram(bytes(image), lowered, self._log(prog))
        finally:
            nvrtc.nvrtcDestroyProgram(prog)


def _writable(size: int) -> bytearray:
    # NVRTC writes into this buffer. It must be a fresh mutable one: `b" " * size` can return
    # CPython's shared one-byte object (size 1, e.g. an empty log), and writing into it changes
    # b" " for the whole process (seen: torch.load failing afterwards).
    return bytearray(size)


NVRTC_BINDINGS = {"cupy": _CupyNvrtc, "cuda-bindings": _CudaBindingsNvrtc}


def nvrtc_binding(name: str | None = None):
    """An NVRTC binding by name, or the first importable one (CuPy's, then cuda-bindings')."""
    if name is not None:
        if name not in NVRTC_BINDINGS:
            raise ValueError(f"nvrtc binding must be one of {sorted(NVRTC_BINDINGS)}, got {name!r}")
        return NVRTC_BINDINGS[name]()
    errors = []
    for binding in NVRTC_BINDINGS.values():
        try:
            return binding()
        except ImportError as error:
            errors.append(f"{binding.name}: {error}")
    raise ImportError("no NVRTC binding is importable (" + "; ".join(errors) + ")")


def runtime_arch(capability: tuple[int, int], supported: list[int]) -> str:
    """The NVRTC target for a device: its own cubin when NVRTC knows the architecture, else PTX
    for the newest architecture NVRTC knows that the device can run (the driver JIT-compiles it)."""
    cc = capability[0] * 10 + capability[1]
    if cc in supported:
        return f"sm_{cc}"
    older = [arch for arch in supported if arch <= cc]
    if not older:
        raise RuntimeError(f"NVRTC supports {supported}, none of which runs on a device of compute capability {cc}")
    return f"compute_{max(older)}"


def compile_variant(dtype: torch.dtype, arch: str, binding=None) -> CompiledProgram:
    """Compile the kernels for inputs of ``dtype`` for ``arch``."""
    binding = binding or nvrtc_binding()
    source, names = program(dtype)
    return binding.compile(source, compile_options(arch), names, want_cubin=arch.startswith("sm_"))
