"""``python -m plif_cuda doctor [--nvrtc-arch sm_XX]``: what a user needs to see when a backend is missing.

It prints the versions that matter, which backends can run on CPU and CUDA tensors (and why
the others cannot), the architectures the compiled extension was built for, and with
``--nvrtc-arch`` it compiles every kernel variant of the CuPy backend through NVRTC for that
architecture (no GPU needed) and exits non-zero when one fails.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time

import torch

from . import _nvrtc, backends, ops


def _print_versions() -> None:
    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU-only build'})")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            print(f"device      cuda:{index} {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        print("device      no CUDA device visible to torch")
    try:
        import cupy

        print(f"cupy        {cupy.__version__}")
    except (ImportError, OSError) as error:
        print(f"cupy        not usable ({error})")
    try:
        binding = _nvrtc.nvrtc_binding()
        major, minor = binding.version()
        print(f"nvrtc       {major}.{minor} through {binding.name}; architectures {binding.supported_archs()}")
    except (ImportError, OSError, RuntimeError) as error:
        print(f"nvrtc       not usable ({error})")
    for label, locate in (("kernel src", _nvrtc.kernel_source_dir), ("cuda incl.", _nvrtc.cuda_include_dir)):
        try:
            print(f"{label:<11} {locate()}")
        except FileNotFoundError as error:
            print(f"{label:<11} missing: {error}")


def built_cuda_code(arch_list: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(cubin architectures, PTX architectures) of a TORCH_CUDA_ARCH_LIST such as "8.0;8.6;9.0+PTX"."""
    cubins, ptx = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)[af]?(\+PTX)?", entry)
        if match:
            arch = (int(match[1]), int(match[2]))
            cubins.append(arch)
            if match[3]:
                ptx.append(arch)
    return cubins, ptx


def cuda_code_for(capability: tuple[int, int], arch_list: str) -> str | None:
    """Which of the built code a GPU of ``capability`` runs, or None when none of it runs there.
    A cubin runs on its own major architecture at the same or a higher minor version; PTX is
    compiled by the driver for any later architecture."""
    cubins, ptx = built_cuda_code(arch_list)
    same_major = [arch for arch in cubins if arch[0] == capability[0] and arch[1] <= capability[1]]
    if same_major:
        major, minor = max(same_major)
        return f"sm_{major}{minor} code"
    older_ptx = [arch for arch in ptx if arch <= capability]
    if older_ptx:
        major, minor = max(older_ptx)
        return f"compute_{major}{minor} PTX, compiled by the driver when first loaded"
    return None


def _arch_names(arch_list: str) -> str:
    cubins, ptx = built_cuda_code(arch_list)
    names = ", ".join(f"sm_{major}{minor}" for major, minor in cubins)
    return names + "".join(f" + compute_{major}{minor} PTX" for major, minor in ptx)


def _print_extension() -> None:
    if not ops.extension_available():
        print(f"extension   not available: {ops.extension_error()}")
        return
    from . import _C

    if _C.CUDA_SKIPPED_BECAUSE:
        print(f"extension   CPU kernels only (CUDA kernels not built because {_C.CUDA_SKIPPED_BECAUSE})")
    else:
        print(
            f"extension   CPU kernels, and CUDA kernels for {_arch_names(_C.CUDA_ARCHS)} "
            f"(TORCH_CUDA_ARCH_LIST={_C.CUDA_ARCHS})"
        )
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            capability = torch.cuda.get_device_capability(index)
            code = cuda_code_for(capability, _C.CUDA_ARCHS)
            print(
                f"            cuda:{index} (sm_{capability[0]}{capability[1]}) runs "
                + (
                    code
                    or f"none of them: rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}, "
                    "or use the cupy backend"
                )
            )
    print(f"            built against torch {_C.TORCH_VERSION}")


def _print_backends() -> None:
    for device in (torch.device("cpu"), torch.device("cuda")):
        for backend in backends.BACKENDS[1:]:
            reason = backends.unavailable_reason(backend, device)
            print(f"  {device.type:<5} {backend:<6} {'available' if reason is None else 'unavailable: ' + reason}")


def _compile_all(arch: str, binding_name: str | None) -> bool:
    try:
        binding = _nvrtc.nvrtc_binding(binding_name)
    except ImportError as error:
        print(f"FAILED: {error}")
        return False
    ok = True
    for dtype in _nvrtc.VARIANTS:
        source, names = _nvrtc.program(dtype)
        start = time.perf_counter()
        try:
            compiled = _nvrtc.compile_variant(dtype, arch, binding)
        except (_nvrtc.NvrtcCompileError, FileNotFoundError) as error:
            ok = False
            print(f"  FAILED {str(dtype):<15} {', '.join(names)}\n{error}")
            continue
        seconds = time.perf_counter() - start
        print(f"  ok     {str(dtype):<15} {len(compiled.image):>7} bytes in {seconds:.1f} s: {', '.join(names)}")
        if compiled.log.strip():
            print(compiled.log)
    return ok


def doctor(nvrtc_arch: str | None, nvrtc_binding: str | None) -> int:
    print("== versions")
    _print_versions()
    print("== compiled extension")
    _print_extension()
    print("== backends")
    _print_backends()
    if nvrtc_arch is None:
        return 0
    print(f"== NVRTC compile of every CuPy kernel variant for {nvrtc_arch}")
    try:
        print("options     " + " ".join(_nvrtc.compile_options(nvrtc_arch)))
    except FileNotFoundError as error:
        print(f"FAILED: {error}")
        return 1
    if _compile_all(nvrtc_arch, nvrtc_binding):
        print("all variants compiled")
        return 0
    print("NVRTC compile FAILED")
    return 1


def nvrtc_arch(text: str) -> str:
    """An NVRTC target as the doctor accepts it (argparse type)."""
    if not re.fullmatch(r"(sm|compute)_\d+[af]?", text):
        raise argparse.ArgumentTypeError(
            f"expected sm_XX (a cubin, e.g. sm_90) or compute_XX (PTX, e.g. compute_90), got {text!r}"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plif_cuda")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor_parser = commands.add_parser("doctor", help="versions, available backends and why not, NVRTC check")
    doctor_parser.add_argument(
        "--nvrtc-arch",
        metavar="sm_XX",
        type=nvrtc_arch,
        help="compile every kernel variant of the CuPy backend through NVRTC for this architecture, "
        "sm_XX (a cubin) or compute_XX (PTX), e.g. sm_90 (no GPU needed)",
    )
    doctor_parser.add_argument(
        "--nvrtc-binding",
        choices=sorted(_nvrtc.NVRTC_BINDINGS),
        help="which Python binding of NVRTC to use (default: cupy's when installed, else cuda-bindings')",
    )
    args = parser.parse_args(argv)
    return doctor(args.nvrtc_arch, args.nvrtc_binding)


if __name__ == "__main__":
    sys.exit(main())
