#!/usr/bin/env python3
"""Check the compiled CUDA kernels of plif_cuda's extension; exit 0 only when every check passes.

Run after `python setup.py build_ext --inplace` (or on an installed library):

    python .ci/check_cuda_build.py [--library PATH] [--arch 80 --arch 90] [--ptxas-log build.log]

Asserts, reading the library with `cuobjdump` (no GPU needed):
  1. the library holds a cubin (SASS) for every required architecture (default sm_80 and sm_90);
  2. each of those cubins holds the forward and backward kernel for all four dtype pairs;
  3. every plif kernel in every cubin uses zero local memory and a zero-byte stack frame, so
     no register spills to local memory;
  4. every plif kernel in every cubin keeps at least 64 bytes of loads in flight per thread in
     its chunk loops (two innermost loops or more: the vector and scalar paths, the backward's
     chunks with and without grad_v_seq), read from the SASS (`cuobjdump -sass`): the bytes of
     global loads one thread issues in a straight run, with no store, branch or barrier between
     them, inside a loop (the kernels load several time steps before running the recurrence
     over them; one load per step, waiting for it before the next, cannot fill the memory system);
  7. in every backward kernel, every innermost loop that loads issues all its global loads before
     its first global store (a chunk's X and incoming gradients are in flight together, so a
     neuron with T <= the chunk makes one round trip to memory before its first store);
  6. every forward kernel's vector path stores whole 16-byte words: each forward kernel has an
     innermost loop whose global loads are all 16-byte words (the vector path's chunk loop), and
     no global store in such a loop is narrower (the spikes, H and V rows of a step each leave
     as 16-byte stores, not one store per neuron);
  5. every plif kernel keeps at least half a multiprocessor's threads resident: its registers
     per thread (`cuobjdump -res-usage`) leave room for that many 256-thread blocks, except the
     kernels listed in OCCUPANCY_EXCEPTIONS with the occupancy they keep instead and why.
With --ptxas-log (a build log made with PLIF_PTXAS_VERBOSE=1) it also asserts that ptxas
reported "0 bytes spill stores, 0 bytes spill loads" for every plif kernel it compiled.
The fused BatchNorm + PLIF kernels (bn_*_kernel, csrc/plif_bn_kernels.cuh) are held to check 3
and the ptxas report alone (no local memory, no stack frame, no spills), and every cubin must
hold some.

cuobjdump is looked up in $CUOBJDUMP, $CUDA_HOME/bin, PATH, then in triton's wheel (which
ships one: a minimal CUDA toolkit may lack it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNELS = ("plif_forward_kernel", "plif_backward_kernel")
# The fused BatchNorm + PLIF kernels' mangled names begin plif::bn::<length><name>.
_BN_NAMESPACE = "_ZN4plif2bn"
MIN_LOAD_BYTES_IN_FLIGHT = 64
# Kernels built for fewer bytes ahead: (kernel label -> (bytes, why)). None since the half types'
# backward has its lanes path (two neurons per thread: 64 B per chunk of 8 steps, 96 with
# grad_v_seq; its one-neuron fallback for odd N or misaligned tensors keeps 32-52 B).
LOAD_BYTES_EXCEPTIONS: dict[str, tuple[int, str]] = {}
THREADS_PER_BLOCK = 256  # plif::kThreadsPerBlock (csrc/plif_launch.h)
# Per multiprocessor: 64K 32-bit registers on every architecture here, allocated per warp in
# units of 256, and at most this many resident threads.
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256
MAX_THREADS_PER_SM = {
    "sm_70": 2048,
    "sm_75": 1024,
    "sm_80": 2048,
    "sm_86": 1536,
    "sm_87": 2048,
    "sm_89": 1536,
    "sm_90": 2048,
    "sm_100": 2048,
    "sm_120": 1536,
}
# Kernels that keep fewer than half the threads resident: (architecture or "*", kernel label) ->
# (the resident threads per multiprocessor they must keep at least, why). Their launch bounds are
# in csrc/plif_kernels.cuh (Geometry::kBackwardMinBlocks).
_BACKWARD_CHUNK = (
    512,
    "a checkpoint chunk keeps the loads of its 8 steps (X and gradients) in flight at once: at most "
    "128 registers (91-113; the half types' two lanes take the most), 2 blocks (at 80 ptxas spills); 512 "
    "threads x 64 B = 32 KB in flight per multiprocessor",
)
OCCUPANCY_EXCEPTIONS = {
    ("*", "backward float32"): _BACKWARD_CHUNK,
    ("*", "backward float16"): _BACKWARD_CHUNK,
    ("*", "backward bfloat16"): _BACKWARD_CHUNK,
    ("*", "backward float64"): (
        256,
        "the chunk's loads are 32-48 registers of doubles and its surrogates are double "
        "precision: 1 block (136 registers; at 128 the division's slow path takes a stack frame "
        "on sm_80-89), 256 threads x 128 B = 32 KB in flight per multiprocessor",
    ),
}
# The (in_t, acc_t) pairs as they appear in the mangled kernel names.
DTYPE_PAIRS = {"Iff": "float32", "Idd": "float64", "I6__halff": "float16", "I13__nv_bfloat16f": "bfloat16"}


class CheckFailed(Exception):
    pass


def find_cuobjdump() -> str:
    candidates = [os.environ.get("CUOBJDUMP")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin is not None:
        candidates.append(str(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CheckFailed(
        "cuobjdump not found: set CUOBJDUMP, or CUDA_HOME to a toolkit that has bin/cuobjdump, "
        "or install triton (its wheel ships one)"
    )


def find_library(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CheckFailed(f"--library {explicit}: no such file")
        return path
    found = sorted((REPO / "plif_cuda").glob("_C*.so"))
    if len(found) != 1:
        raise CheckFailed(f"expected one plif_cuda/_C*.so in {REPO}, found {[str(p) for p in found]}; pass --library")
    return found[0]


def run_cuobjdump(cuobjdump: str, *args: str) -> str:
    result = subprocess.run([cuobjdump, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckFailed(f"{cuobjdump} {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def kernel_label(mangled: str) -> str | None:
    """'forward float16' for a plif kernel's mangled name, None for any other function."""
    for kernel in KERNELS:
        marker = f"{len(kernel)}{kernel}"
        if marker in mangled:
            rest = mangled.split(marker, 1)[1]
            dtype = next((name for code, name in DTYPE_PAIRS.items() if rest.startswith(code)), "unknown dtype")
            return f"{kernel.split('_')[1]} {dtype}"
    return None


def bn_kernel_label(mangled: str) -> str | None:
    """'bn_backward_kernel<ILi1ELi2EffE>' (the mangled template arguments) for a fused BatchNorm +
    PLIF kernel's mangled name, None for any other function."""
    length = re.match(r"\d+", mangled.removeprefix(_BN_NAMESPACE)) if mangled.startswith(_BN_NAMESPACE) else None
    if length is None:
        return None
    start = len(_BN_NAMESPACE) + length.end()
    name = mangled[start : start + int(length.group())]
    if not (name.startswith("bn_") and name.endswith("_kernel")):
        return None
    arguments = mangled[start + len(name) :]
    # A template's arguments, I...E, then E closing the name and v, the return type.
    return f"{name}<{arguments[: arguments.index('EEv') + 1]}>" if arguments.startswith("I") else name


def parse_resource_usage(text: str, label_of=kernel_label) -> dict[str, dict[str, dict[str, int]]]:
    """{arch: {kernel label: {"REG": .., "STACK": .., "LOCAL": ..}}} from `cuobjdump -res-usage`, for the
    functions `label_of` names."""
    usage: dict[str, dict[str, dict[str, int]]] = {}
    arch = None
    label = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
            usage.setdefault(arch, {})
        elif line.startswith("Function "):
            label = label_of(line.split(None, 1)[1].rstrip(":"))
        elif label is not None and line.startswith("REG:"):
            if arch is None:
                raise CheckFailed("cuobjdump -res-usage printed a function before any 'arch =' line")
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            usage[arch][label] = {key: int(fields[key]) for key in ("REG", "STACK", "LOCAL")}
            label = None
    return usage


_SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
# Instructions that end a run of loads in flight: stores and atomics (a load may not pass them
# unless the compiler knows the pointers do not alias), branches and barriers.
_RUN_ENDS = {
    "STG",
    "ST",
    "STS",
    "RED",
    "ATOM",
    "ATOMG",
    "BRA",
    "BRX",
    "JMP",
    "JMX",
    "EXIT",
    "RET",
    "CALL",
    "BSYNC",
    "BSSY",
    "WARPSYNC",
    "BAR",
}


# Width suffixes of global access opcodes (LDG.E.128, STG.E.U16, ...); no suffix: 4 bytes.
_ACCESS_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# The word of a vector access (csrc/plif_kernels.cuh: AccessWord).
VECTOR_WORD_BYTES = 16
# Kernels with a vector path, by label kind (the backward has none: Geometry in plif_kernels.cuh).
VECTOR_PATH_KERNELS = ("forward",)


def _global_access_bytes(opcode: str, kinds: tuple[str, ...]) -> int:
    parts = opcode.split(".")
    if parts[0] not in kinds:
        return 0
    return next((_ACCESS_BYTES[part] for part in parts[1:] if part in _ACCESS_BYTES), 4)


def global_load_bytes(opcode: str) -> int:
    """Bytes one thread loads with a global (or generic) load opcode such as LDG.E.128; 0 for others."""
    return _global_access_bytes(opcode, ("LDG", "LD"))


def global_store_bytes(opcode: str) -> int:
    """Bytes one thread stores with a global (or generic) store opcode such as STG.E.128; 0 for others."""
    return _global_access_bytes(opcode, ("STG", "ST"))


def parse_sass(text: str) -> dict[str, dict[str, list[tuple[int, str, str]]]]:
    """{arch: {kernel label: [(address, opcode, operands), ...]}} from `cuobjdump -sass`."""
    functions: dict[str, dict[str, list[tuple[int, str, str]]]] = {}
    arch = None
    body = None
    for line in text.splitlines():
        arch_line = re.search(r"arch = (sm_\d+a?)", line)
        if arch_line:
            arch = arch_line.group(1)
            body = None
            continue
        function = re.match(r"\s*Function : (\S+)", line)
        if function:
            label = kernel_label(function.group(1))
            body = functions.setdefault(arch or "unknown", {}).setdefault(label, []) if label else None
            continue
        instruction = _SASS_INSTRUCTION.search(line)
        if instruction and body is not None:
            body.append((int(instruction.group(1), 16), instruction.group(2), instruction.group(3)))
    return functions


def innermost_loops(body: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last address) of every innermost loop: a branch back to an earlier address, with
    no other such branch inside."""
    loops = []
    for address, opcode, operands in body:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.split(".")[0] == "BRA" and target and int(target.group(1), 16) <= address:
            loops.append((int(target.group(1), 16), address))
    return [
        (start, end)
        for start, end in loops
        if not any(start <= s and e <= end and (s, e) != (start, end) for s, e in loops)
    ]


def loads_in_flight_per_loop(body: list[tuple[int, str, str]]) -> list[int]:
    """For every innermost loop, the most bytes of global loads one thread issues in it before a
    store, branch or barrier: what one iteration keeps in flight."""
    figures = []
    for start, end in innermost_loops(body):
        best = run = 0
        for address, opcode, _ in body:
            if start <= address <= end:
                loaded = global_load_bytes(opcode)
                if loaded:
                    run += loaded
                    best = max(best, run)
                elif opcode.split(".")[0] in _RUN_ENDS:
                    run = 0
        figures.append(best)
    return figures


def kernels_in_order(sass: dict[str, dict[str, list[tuple[int, str, str]]]]) -> list[tuple[str, str, list]]:
    """(arch, kernel label, SASS body) of every kernel, by arch, then label."""
    return [(arch, label, body) for arch in sorted(sass) for label, body in sorted(sass[arch].items())]


def check_loads_in_flight(sass: dict[str, dict[str, list[tuple[int, str, str]]]]) -> list[str]:
    problems = []
    for arch, label, body in kernels_in_order(sass):
        figures = loads_in_flight_per_loop(body)
        most = max(figures, default=0)
        wanted, why = LOAD_BYTES_EXCEPTIONS.get(label, (MIN_LOAD_BYTES_IN_FLIGHT, None))
        deep = sum(1 for figure in figures if figure >= wanted)
        # Every kernel has two chunk loops or more (see the module docstring).
        verdict = "ok" if deep >= 2 else "TOO FEW"
        note = f" (exception: {why})" if why else ""
        print(
            f"  {arch}  {label:<18} loads in flight per iteration of an innermost loop: up to {most} B; "
            f"{deep} of {len(figures)} such loops >= {wanted} B  {verdict}{note}"
        )
        if verdict != "ok":
            problems.append(
                f"{arch}: {label}: {deep} innermost loops keep {wanted} bytes of "
                f"loads in flight per iteration (at most {most} B); every chunk loop needs "
                f"them"
            )
    return problems


def vector_loop_store_widths(body: list[tuple[int, str, str]]) -> list[dict[int, int]]:
    """For every innermost loop whose global loads are all 16-byte words (a vector path's chunk
    loop), its global stores as {bytes per store: count}."""
    widths = []
    for start, end in innermost_loops(body):
        inside = [opcode for address, opcode, _ in body if start <= address <= end]
        loads = [global_load_bytes(opcode) for opcode in inside if global_load_bytes(opcode)]
        if not loads or any(size != VECTOR_WORD_BYTES for size in loads):
            continue
        stores: dict[int, int] = {}
        for opcode in inside:
            size = global_store_bytes(opcode)
            if size:
                stores[size] = stores.get(size, 0) + 1
        widths.append(stores)
    return widths


def check_vector_stores(sass: dict[str, dict[str, list[tuple[int, str, str]]]]) -> list[str]:
    problems = []
    for arch, label, body in kernels_in_order(sass):
        if label.split()[0] not in VECTOR_PATH_KERNELS:
            continue
        loops = vector_loop_store_widths(body)
        whole = sum(count for stores in loops for size, count in stores.items() if size >= VECTOR_WORD_BYTES)
        narrow = sum(count for stores in loops for size, count in stores.items() if size < VECTOR_WORD_BYTES)
        problem = None
        if not loops:
            problem = f"no innermost loop loads {VECTOR_WORD_BYTES}-byte words only (the vector path's chunk loop)"
        elif narrow:
            problem = (
                f"its vector-path loop has {narrow} stores narrower than {VECTOR_WORD_BYTES} B beside "
                f"{whole} of {VECTOR_WORD_BYTES} B; every row of a step should leave as "
                f"{VECTOR_WORD_BYTES}-byte words"
            )
        print(
            f"  {arch}  {label:<18} stores in its vector-path loop: {whole} x {VECTOR_WORD_BYTES} B, "
            f"{narrow} narrower  {'FAIL' if problem else 'ok'}"
        )
        if problem:
            problems.append(f"{arch}: {label}: {problem}")
    return problems


def check_backward_round_trips(sass: dict[str, dict[str, list[tuple[int, str, str]]]]) -> list[str]:
    """Check 7: in a backward kernel, each innermost loop's global loads all come before its first
    global store."""
    problems = []
    for arch, label, body in kernels_in_order(sass):
        if label.split()[0] != "backward":
            continue
        late = loops = 0
        for start, end in innermost_loops(body):
            inside = [opcode for address, opcode, _ in body if start <= address <= end]
            loads = [i for i, opcode in enumerate(inside) if global_load_bytes(opcode)]
            stores = [i for i, opcode in enumerate(inside) if global_store_bytes(opcode)]
            if loads:
                loops += 1
                late += bool(stores) and loads[-1] > stores[0]
        verdict = "ok" if loops and not late else "FAIL"
        print(f"  {arch}  {label:<18} loops with loads: {loops}; loads after the loop's first store: {late}  {verdict}")
        if verdict != "ok":
            problems.append(f"{arch}: {label}: {late} of {loops} chunk loops issue a load after their first store")
    return problems


def resident_threads(registers: int, arch: str) -> int:
    """Threads of 256-thread blocks a multiprocessor of `arch` keeps resident at `registers` per thread."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps = REGISTERS_PER_SM // per_warp if per_warp else REGISTERS_PER_SM
    blocks = warps // (THREADS_PER_BLOCK // 32)
    return min(blocks * THREADS_PER_BLOCK, MAX_THREADS_PER_SM.get(arch, 2048) // THREADS_PER_BLOCK * THREADS_PER_BLOCK)


def check_occupancy(usage: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    problems = []
    for arch in sorted(usage):
        wanted = MAX_THREADS_PER_SM.get(arch, 2048) // 2
        for label, res in sorted(usage[arch].items()):
            threads = resident_threads(res["REG"], arch)
            exception = OCCUPANCY_EXCEPTIONS.get((arch, label)) or OCCUPANCY_EXCEPTIONS.get(("*", label))
            floor = min(wanted, exception[0]) if exception else wanted
            verdict = "ok" if threads >= floor else "TOO FEW"
            note = f" (exception: {exception[1]})" if exception and threads < wanted else ""
            print(
                f"  {arch}  {label:<18} REG:{res['REG']:<3} -> {threads} resident threads per SM "
                f"(half: {wanted})  {verdict}{note}"
            )
            if verdict != "ok":
                problems.append(
                    f"{arch}: {label}: {res['REG']} registers per thread keep {threads} threads resident "
                    f"per multiprocessor, fewer than {floor}"
                )
    return problems


def check_ptxas_log(path: Path) -> list[str]:
    """Problems in a ptxas -v report: any plif or bn kernel with spills or a stack frame."""
    problems = []
    current = None
    seen = 0
    for line in path.read_text(errors="replace").splitlines():
        entry = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if entry:
            label = kernel_label(entry.group(1)) or bn_kernel_label(entry.group(1))
            current = f"{label} ({entry.group(2)})" if label else None
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame and current is not None:
            seen += 1
            stack, stores, loads = (int(v) for v in frame.groups())
            if stack or stores or loads:
                problems.append(
                    f"ptxas: {current}: {stack} bytes stack, {stores} bytes spill stores, {loads} bytes spill loads"
                )
            current = None
    if seen == 0:
        problems.append(f"ptxas log {path} has no report for any plif kernel (was it built with PLIF_PTXAS_VERBOSE=1?)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", help="the extension library (default: the one in plif_cuda/)")
    parser.add_argument(
        "--arch", action="append", help="required SASS architecture, e.g. 80 (repeatable; default 80 and 90)"
    )
    parser.add_argument("--ptxas-log", type=Path, help="build log made with PLIF_PTXAS_VERBOSE=1")
    args = parser.parse_args()
    required = [f"sm_{a.removeprefix('sm_')}" for a in (args.arch or ["80", "90"])]

    try:
        library = find_library(args.library)
        cuobjdump = find_cuobjdump()
        print(f"library:   {library}\ncuobjdump: {cuobjdump}")
        elf_list = run_cuobjdump(cuobjdump, "--list-elf", str(library))
        archs_present = sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", elf_list)))
        ptx_present = sorted(
            set(re.findall(r"\.(sm_\d+a?)\.ptx", run_cuobjdump(cuobjdump, "--list-ptx", str(library))))
        )
        print(f"cubins:    {', '.join(archs_present) or 'none'}\nPTX:       {', '.join(ptx_present) or 'none'}")
        resources = run_cuobjdump(cuobjdump, "-res-usage", str(library))
        usage = parse_resource_usage(resources)
        bn_usage = parse_resource_usage(resources, bn_kernel_label)
        sass = parse_sass(run_cuobjdump(cuobjdump, "-sass", str(library)))
    except CheckFailed as error:
        print(f"FAIL: {error}", file=sys.stderr)
        return 1

    problems = [f"no {arch} cubin in the library" for arch in required if arch not in archs_present]
    expected = {f"{kernel.split('_')[1]} {dtype}" for kernel in KERNELS for dtype in DTYPE_PAIRS.values()}
    for arch in sorted(usage):
        kernels = usage[arch]
        missing = expected - kernels.keys()
        if missing:
            problems.append(f"{arch}: kernels missing: {', '.join(sorted(missing))}")
        if not bn_usage.get(arch):
            problems.append(f"{arch}: no fused BatchNorm + PLIF kernel (bn_*_kernel)")
        for label, res in sorted(kernels.items()) + sorted(bn_usage.get(arch, {}).items()):
            verdict = "ok" if res["LOCAL"] == 0 and res["STACK"] == 0 else "SPILLS"
            print(
                f"  {arch}  {label:<18} REG:{res['REG']:<3} STACK:{res['STACK']:<4} LOCAL:{res['LOCAL']:<4} {verdict}"
            )
            if verdict != "ok":
                problems.append(f"{arch}: {label} uses local memory (STACK:{res['STACK']} LOCAL:{res['LOCAL']})")
    for arch in required:
        if arch in archs_present and not usage.get(arch):
            problems.append(f"{arch}: cubin present but cuobjdump -res-usage lists no plif kernel in it")
    problems.extend(check_occupancy(usage))
    problems.extend(check_loads_in_flight(sass))
    problems.extend(check_vector_stores(sass))
    problems.extend(check_backward_round_trips(sass))
    for arch in required:
        if arch in archs_present and not sass.get(arch):
            problems.append(f"{arch}: cuobjdump -sass shows no plif kernel")
    if args.ptxas_log is not None:
        if not args.ptxas_log.is_file():
            problems.append(f"--ptxas-log {args.ptxas_log}: no such file")
        else:
            problems.extend(check_ptxas_log(args.ptxas_log))

    if problems:
        print("FAIL: the CUDA build check found problems:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(
        f"OK: {', '.join(required)} cubins present; no plif or bn kernel spills or uses local memory; every plif "
        f"kernel keeps >= {MIN_LOAD_BYTES_IN_FLIGHT} bytes of loads in flight per loop iteration and half a "
        f"multiprocessor's threads resident (or its listed exception's); the forward's vector path stores "
        f"{VECTOR_WORD_BYTES}-byte words only"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
