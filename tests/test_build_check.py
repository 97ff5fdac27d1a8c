"""The SASS reading of .ci/check_cuda_build.py (loads in flight per loop iteration, store widths
of the forward's vector path), on hand-written SASS in cuobjdump's format: the CUDA build itself is
checked by .ci/run. And the kernel headers under nvcc on their own (no GPU needed): each compiles
alone, and the forward kernels compiled from plif_kernels.cuh alone pass the store-width check."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO_ROOT, load_script
from plif_cuda import _nvrtc

check = load_script(".ci/check_cuda_build.py")

FORWARD = "_ZN4plif19plif_forward_kernelIffEEvPKT_"


def sass(*lines: str, name: str = FORWARD) -> str:
    body = "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))
    return f"\tarch = sm_90\n\t\tFunction : {name}\n{body}\n"


def figures(text: str) -> list[int]:
    (body,) = check.parse_sass(text)["sm_90"].values()
    return check.loads_in_flight_per_loop(body)


# opcode: (bytes it loads from global memory, bytes it stores there)
GLOBAL_ACCESS_BYTES = {
    "LDG.E.128.CONSTANT": (16, 0), "LDG.E.128": (16, 0), "LDG.E.64": (8, 0), "LDG.E": (4, 0),
    "LDG.E.U16.CONSTANT": (2, 0), "LDG.E.U8": (1, 0),
    "STG.E.128": (0, 16), "ST.E.128": (0, 16), "STG.E.64": (0, 8), "STG.E": (0, 4), "STG.E.U16": (0, 2),
    "STS.128": (0, 0), "FADD": (0, 0),
}  # fmt: skip


@pytest.mark.parametrize("opcode, sizes", GLOBAL_ACCESS_BYTES.items(), ids=GLOBAL_ACCESS_BYTES.keys())
def test_global_access_sizes(opcode, sizes):
    assert (check.global_load_bytes(opcode), check.global_store_bytes(opcode)) == sizes


def test_a_store_or_branch_ends_the_run_and_only_innermost_loops_count():
    text = sass(
        "LDG.E R2, desc[UR4][R2.64]",  # 0x00: outer loop only
        "LDG.E.128 R4, desc[UR4][R8.64]",  # 0x10: inner loop from here
        "@P0 LDG.E.128 R12, desc[UR4][R10.64]",
        "STG.E desc[UR4][R6.64], R4",  # ends the run of 32 B
        "LDG.E.64 R16, desc[UR4][R14.64]",
        "@P1 BRA 0x10",  # 0x50: inner loop back edge
        "LDG.E.128 R4, desc[UR4][R8.64]",
        "BRA 0x0",  # 0x70: outer loop back edge
    )
    assert figures(text) == [32]


def test_a_kernel_needs_two_loops_with_64_bytes():
    chunk = ["LDG.E.128 R4, desc[UR4][R8.64]"] * 4 + ["STG.E desc[UR4][R6.64], R4"]
    one_path = sass(*chunk, "BRA 0x0")
    assert check.check_loads_in_flight(check.parse_sass(one_path))
    both_paths = sass(*chunk, "BRA 0x0", *chunk, "BRA 0x60")
    assert check.check_loads_in_flight(check.parse_sass(both_paths)) == []


def forward_with_loops(*loops: list[str], name: str = FORWARD) -> str:
    """A kernel whose innermost loops have the given bodies, each closed by a branch back to its start."""
    lines: list[str] = []
    for body in loops:
        start = 16 * len(lines)
        lines += [*body, f"@P0 BRA 0x{start:x}"]
    return sass(*lines, name=name)


VECTOR_LOADS = ["LDG.E.128.CONSTANT R4, desc[UR4][R2.64]"] * 4
SCALAR_LOOP = ["LDG.E.CONSTANT R4, desc[UR4][R2.64]"] * 16 + ["STG.E desc[UR4][R6.64], R4"] * 3


def test_the_vector_path_must_store_whole_words():
    # The H row split into one store per lane (as before issue 22's fix), spikes and V whole.
    split = VECTOR_LOADS + [
        "STG.E.128 desc[UR4][R8.64], R12",
        "STG.E desc[UR4][R10.64], R16",
        "STG.E desc[UR4][R10.64+0x4], R17",
        "STG.E desc[UR4][R10.64+0x8], R18",
        "STG.E desc[UR4][R10.64+0xc], R19",
        "STG.E.128 desc[UR4][R14.64], R20",
    ]
    whole = VECTOR_LOADS + [
        "STG.E.128 desc[UR4][R8.64], R12",
        "@P1 STG.E.128 desc[UR4][R10.64], R16",
        "STG.E.128 desc[UR4][R14.64], R20",
    ]
    assert check.vector_loop_store_widths(
        check.parse_sass(forward_with_loops(SCALAR_LOOP, split))["sm_90"]["forward float32"]
    ) == [{16: 2, 4: 4}]
    (problem,) = check.check_vector_stores(check.parse_sass(forward_with_loops(SCALAR_LOOP, split)))
    assert "forward float32" in problem and "4 stores narrower than 16 B beside 2" in problem
    # The scalar path's narrow stores are its own: only the loop of 16-byte loads is held to whole words.
    assert check.check_vector_stores(check.parse_sass(forward_with_loops(SCALAR_LOOP, whole))) == []


def test_a_forward_without_a_vector_loop_fails_and_the_backward_is_not_held_to_it():
    mixed = ["LDG.E.128.CONSTANT R4, desc[UR4][R2.64]", "LDG.E R8, desc[UR4][R2.64]", "STG.E.128 desc[UR4][R8.64], R12"]
    (problem,) = check.check_vector_stores(check.parse_sass(forward_with_loops(SCALAR_LOOP, mixed)))
    assert "no innermost loop loads 16-byte words only" in problem
    backward = "_ZN4plif20plif_backward_kernelIffEEvPKT_"
    narrow = VECTOR_LOADS + ["STG.E desc[UR4][R10.64], R16"]
    assert check.check_vector_stores(check.parse_sass(forward_with_loops(narrow, name=backward))) == []


BACKWARD = "_ZN4plif20plif_backward_kernelIffEEvPKT_"


def test_a_backward_chunk_loop_must_load_before_it_stores():
    """Check 7: a chunk's loads all in flight before its first store (one round trip for T <= 8);
    a load after a store in the loop (a second trip) fails, in the backward only."""
    one_trip = SCALAR_LOOP + ["STS [R1], R4", "STG.E desc[UR4][R6.64], R5"]
    two_trips = ["LDG.E R4, desc[UR4][R2.64]", "STG.E desc[UR4][R6.64], R4", "LDG.E R5, desc[UR4][R2.64]"]
    assert check.check_backward_round_trips(check.parse_sass(forward_with_loops(one_trip, name=BACKWARD))) == []
    (problem,) = check.check_backward_round_trips(check.parse_sass(forward_with_loops(two_trips, name=BACKWARD)))
    assert "backward float32" in problem and "1 of 1 chunk loops issue a load after their first store" in problem
    assert check.check_backward_round_trips(check.parse_sass(forward_with_loops(two_trips))) == []


# ---- the kernel headers under nvcc, without the extension's build ---------------------------------
def _nvcc() -> str | None:
    candidates = [Path(os.environ[var]) / "bin" / "nvcc" for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    return next((str(path) for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME); CI has it")
# The device code's floating-point flags of setup.py's build (no contraction into FMA).
DEVICE_FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-arch=sm_90"]


def nvcc_compile(tmp_path: Path, source: str, *flags: str) -> subprocess.CompletedProcess:
    unit = tmp_path / "unit.cu"
    unit.write_text(source)
    return subprocess.run(
        [NVCC, *DEVICE_FLAGS, f"-I{REPO_ROOT / 'csrc'}", *flags, str(unit)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


BN_BACKWARD = (
    "_ZN4plif2bn18bn_backward_kernelILi1ELi2EffEEvPKT1_NS0_8GeometryEPKT2_S8_bS8_xNS_7OptionsIS6_EES4_S8_bS8_S8_"
    "PS6_SB_PS2_"
)
BN_SUMS = "_ZN4plif2bn22bn_channel_sums_kernelEPKdiNS0_8GeometryEPd"


def test_the_batchnorm_kernels_are_held_to_no_stack_frame(tmp_path):
    assert check.bn_kernel_label(BN_BACKWARD) == "bn_backward_kernel<ILi1ELi2EffE>"
    assert check.bn_kernel_label(BN_SUMS) == "bn_channel_sums_kernel"
    assert check.bn_kernel_label(FORWARD) is None and check.kernel_label(BN_BACKWARD) is None
    usage = f"\tarch = sm_90\n Function {BN_BACKWARD}:\n  REG:64 STACK:64 SHARED:0 LOCAL:0 TEXTURE:0\n"
    assert check.parse_resource_usage(usage, check.bn_kernel_label) == {
        "sm_90": {"bn_backward_kernel<ILi1ELi2EffE>": {"REG": 64, "STACK": 64, "LOCAL": 0}}
    }

    def report(name: str, stack: int) -> str:
        return (
            f"ptxas info    : Compiling entry function '{name}' for 'sm_90'\n"
            f"ptxas info    : Function properties for {name}\n"
            f"    {stack} bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        )

    log = tmp_path / "build.log"
    log.write_text(report(BN_BACKWARD, 64) + report(BN_SUMS, 0))
    assert check.check_ptxas_log(log) == [
        "ptxas: bn_backward_kernel<ILi1ELi2EffE> (sm_90): 64 bytes stack, 0 bytes spill stores, 0 bytes spill loads"
    ]
    log.write_text(report(BN_BACKWARD, 0) + report(BN_SUMS, 0))
    assert check.check_ptxas_log(log) == []


@needs_nvcc
@pytest.mark.parametrize("header", ["plif_kernels.cuh", "plif_math.h", "plif_params.h", "plif_launch.h"])
def test_each_kernel_header_compiles_alone_under_nvcc(tmp_path, header):
    done = nvcc_compile(tmp_path, f'#include "{header}"\n', "-c", "-o", "unit.o")
    assert done.returncode == 0, done.stderr


def kernel_references(directions: tuple[str, ...] | None = None) -> str:
    """A translation unit of plif_kernels.cuh alone that instantiates the kernels NVRTC compiles,
    by the same names (those of ``directions`` only, if given), by taking their addresses."""
    names = [
        name
        for dtype in _nvrtc.VARIANTS
        for direction, name in _nvrtc.kernel_names(dtype).items()
        if directions is None or direction in directions
    ]
    return (
        f'#include "{_nvrtc.KERNEL_HEADER}"\nvoid* plif_kernels[] = {{'
        + ", ".join(f"(void*)&{name}" for name in names)
        + "};\n"
    )


@needs_nvcc
def test_every_kernel_instantiates_from_the_header_alone(tmp_path):
    # To PTX only: the compiler's checks of every template, without ptxas's minutes.
    done = nvcc_compile(tmp_path, kernel_references(), "--ptx", "-o", "unit.ptx")
    assert done.returncode == 0, done.stderr
    entries = (tmp_path / "unit.ptx").read_text().count(".entry ")
    # One entry per distinct kernel: the finishing sum is one per compute type, shared by dtypes.
    assert entries == len({name for dtype in _nvrtc.VARIANTS for name in _nvrtc.kernel_names(dtype).values()})


@needs_nvcc
def test_the_forward_vector_path_stores_whole_words_in_real_sass(tmp_path):
    try:
        cuobjdump = check.find_cuobjdump()
    except check.CheckFailed as error:
        pytest.fail(str(error))
    done = nvcc_compile(tmp_path, kernel_references(("forward",)), "-c", "-o", "unit.o")
    assert done.returncode == 0, done.stderr
    sass = check.parse_sass(check.run_cuobjdump(cuobjdump, "-sass", str(tmp_path / "unit.o")))
    assert {label for label in sass["sm_90"] if label.startswith("forward")} == {
        f"forward {dtype}" for dtype in ("float32", "float64", "float16", "bfloat16")
    }
    assert check.check_vector_stores(sass) == []
