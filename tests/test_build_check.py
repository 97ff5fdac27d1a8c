"""The SASS reading of .ci/check_cuda_build.py (loads in flight per loop iteration), on
hand-written SASS in cuobjdump's format: the CUDA build itself is checked by .ci/run."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "check_cuda_build", Path(__file__).resolve().parent.parent / ".ci" / "check_cuda_build.py")
check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(check)

FORWARD = "_ZN4plif19plif_forward_kernelIffEEvPKT_"


def sass(*lines: str, name: str = FORWARD) -> str:
    body = "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))
    return f"\tarch = sm_90\n\t\tFunction : {name}\n{body}\n"


def figures(text: str) -> list[int]:
    (body,) = check.parse_sass(text)["sm_90"].values()
    return check.loads_in_flight_per_loop(body)


@pytest.mark.parametrize("opcode, size", [("LDG.E.128.CONSTANT", 16), ("LDG.E.64", 8), ("LDG.E", 4),
                                          ("LDG.E.U16.CONSTANT", 2), ("LDG.E.U8", 1), ("STG.E.128", 0),
                                          ("FADD", 0)])
def test_load_sizes(opcode, size):
    assert check.global_load_bytes(opcode) == size


def test_a_store_or_branch_ends_the_run_and_only_innermost_loops_count():
    text = sass(
        "LDG.E R2, desc[UR4][R2.64]",                 # 0x00: outer loop only
        "LDG.E.128 R4, desc[UR4][R8.64]",             # 0x10: inner loop from here
        "@P0 LDG.E.128 R12, desc[UR4][R10.64]",
        "STG.E desc[UR4][R6.64], R4",                 # ends the run of 32 B
        "LDG.E.64 R16, desc[UR4][R14.64]",
        "@P1 BRA 0x10",                               # 0x50: inner loop back edge
        "LDG.E.128 R4, desc[UR4][R8.64]",
        "BRA 0x0",                                    # 0x70: outer loop back edge
    )
    assert figures(text) == [32]


def test_a_kernel_needs_two_loops_with_64_bytes():
    chunk = ["LDG.E.128 R4, desc[UR4][R8.64]"] * 4 + ["STG.E desc[UR4][R6.64], R4"]
    one_path = sass(*chunk, "BRA 0x0")
    assert check.check_loads_in_flight(check.parse_sass(one_path))
    both_paths = sass(*chunk, "BRA 0x0", *chunk, "BRA 0x60")
    assert check.check_loads_in_flight(check.parse_sass(both_paths)) == []
