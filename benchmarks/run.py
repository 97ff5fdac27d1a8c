"""plif_cuda benchmark harness: the fused op against the reference and the peers, in one process.

    python benchmarks/run.py                 # default run: 40 s to 3 min on 2 CPU cores, GPU rows with a GPU
    python benchmarks/run.py --full          # the big sweep (every T, size, dtype and tau mode; long)
    python benchmarks/run.py --T 8 --neurons 2^20 --dtypes fp32 --passes fwdbwd --peers none
    python benchmarks/run.py --malloc-tuned  # same, re-executed with glibc's mmap/trim thresholds raised

Writes <out>/<name>.json (every measurement, its configuration and the environment),
<out>/<name>.md (the tables) and <out>/<name>.png (the plot); prints progress and the table.
The JSON and the tables are rewritten after every case ("complete": false until the end), so a
run cut short leaves valid files with the cases it finished.
On CUDA every fused backend's pass is timed twice: per call (events around one Python call, the
host's work included) and kernel-only (the calls captured as a CUDA graph and replayed; off with
--kernel-only off).
<out> is benchmarks/runs/ (not tracked by git) unless --out says otherwise; the results the
README shows are updated only on purpose, with --out benchmarks/results.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the plif_cuda of this checkout (built in place), not an installed one

import torch  # noqa: E402

import implementations as impls  # noqa: E402
import network  # noqa: E402
import report  # noqa: E402
import traffic  # noqa: E402
from timing import (  # noqa: E402
    CacheFlusher,
    CopyProbe,
    measure,
    measure_kernels,
    peak_memory_bytes,
    rotation_count,
    saved_tensor_bytes,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# glibc reads these at start-up only, hence the re-execution. 32 MiB is glibc's largest mmap
# threshold on 64-bit; the trim threshold keeps freed heap memory mapped for reuse.
MALLOC_TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
REEXEC_MARKER = "PLIF_BENCH_MALLOC_REEXEC"


def hide_cuda_home_notice() -> None:
    """torch.compile's inductor imports torch.utils.cpp_extension, which on a machine without a GPU
    logs "No CUDA runtime is found, using CUDA_HOME=...": a note for building CUDA extensions,
    which this run never does, printed in the middle of the measurements."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not record.getMessage().startswith("No CUDA runtime is found")
    )


def parse_size(text: str) -> int:
    text = text.strip()
    try:
        value = 2 ** int(text[2:]) if text.startswith("2^") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a neuron count is an integer or 2^k, got {text!r}") from None
    if value < impls.CHANNELS or value % impls.CHANNELS:
        raise argparse.ArgumentTypeError(f"neuron counts must be positive multiples of {impls.CHANNELS}, got {text!r}")
    return value


def comma_list(kind, choices=None):
    def parse(text: str):
        values = [kind(part) for part in text.split(",") if part.strip()]
        if choices is not None:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {', '.join(map(str, bad))}")
        return values

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_argument_group(
        "what to measure (giving any of --T/--neurons/--dtypes/--tau replaces the "
        "default suites by their cartesian product)"
    )
    grid.add_argument("--full", action="store_true", help="the big sweep: every T x size x dtype x tau mode")
    grid.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run (one small size, T=4, 2 repeats, small net): "
        "checks that everything works, measures nothing useful",
    )
    grid.add_argument("--T", type=comma_list(positive_int), help="time steps, e.g. 4,8,16,32")
    grid.add_argument("--neurons", type=comma_list(parse_size), help="neurons per time step, e.g. 2^14,2^20")
    grid.add_argument("--dtypes", type=comma_list(str, tuple(DTYPES)), help="fp32,bf16,fp16,fp64")
    grid.add_argument(
        "--tau", type=comma_list(str, ("layer", "channel")), help="layer (one tau), channel (one per channel)"
    )
    grid.add_argument(
        "--passes",
        type=comma_list(str, traffic.PASSES),
        default=list(traffic.PASSES),
        help="fwd (training forward), bwd (backward alone), fwdbwd (both); default all three",
    )
    grid.add_argument(
        "--devices", type=comma_list(str, ("cpu", "cuda")), help="default: cpu, and cuda when a GPU is there"
    )
    grid.add_argument(
        "--backends",
        type=comma_list(str, ("cpu", "cuda", "cupy", "torch")),
        default=["cpu", "cuda", "cupy", "torch"],
        help="our backends (torch = the reference)",
    )
    grid.add_argument(
        "--peers",
        type=comma_list(str, impls.PEERS + ("none",)),
        default=list(impls.PEERS),
        help="compile, spikingjelly, snntorch, or none",
    )
    grid.add_argument("--no-network", action="store_true", help="skip the convnet training-step figure")
    grid.add_argument(
        "--slow-max-neurons",
        type=parse_size,
        help="largest size for the Python-loop implementations (reference, peers); "
        "default 2^20 on CPU in the default run, no limit otherwise",
    )
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=int, default=1, help="warm-up calls after the first call (default 1)")
    timing.add_argument("--repeats", type=positive_int, default=10, help="timed calls per measurement (default 10)")
    timing.add_argument(
        "--min-repeats",
        type=positive_int,
        default=3,
        help="fewest timed calls when --case-seconds runs out (default 3)",
    )
    timing.add_argument(
        "--case-seconds",
        type=float,
        default=0.6,
        help="stop adding samples to a measurement after this long (default 0.6 s)",
    )
    timing.add_argument(
        "--rotate-mb",
        type=float,
        help="MiB of distinct inputs to cycle through (default: the last-level cache size, 256 at least)",
    )
    timing.add_argument("--max-buffers", type=positive_int, default=16, help="most input buffers rotated (default 16)")
    timing.add_argument(
        "--flush-cache",
        action="store_true",
        help="write a scratch buffer larger than the last-level cache before every timed call",
    )
    timing.add_argument(
        "--copy-mb", type=float, help="MiB per copy for the bandwidth roofline (default: the LLC, 512 at least)"
    )
    timing.add_argument(
        "--kernel-only",
        choices=("on", "off"),
        default="on",
        help="on CUDA, also time each fused backend's pass as CUDA graph replays, without the "
        "host's part of a call (default on; CPU rows have no such figure)",
    )
    timing.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    timing.add_argument(
        "--malloc-tuned",
        action="store_true",
        help="re-execute with " + " ".join(f"{k}={v}" for k, v in MALLOC_TUNED_ENV.items()),
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        default=HERE / "runs",
        help="output folder (default benchmarks/runs, not tracked by git; the committed results "
        "the README shows are in benchmarks/results)",
    )
    output.add_argument("--name", help="file stem (default bench-<devices>-<malloc-default|malloc-tuned>)")
    output.add_argument(
        "--dry-run",
        action="store_true",
        help="everything up to the first call on a device: parse, plan the cases, check which "
        "implementations are available, write the (empty) result files; with --devices cuda "
        "it runs without a GPU",
    )
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full contradict each other")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def reexec_with_tuned_malloc() -> None:
    """glibc reads MALLOC_* at start-up: set them and start this script again, once."""
    if os.environ.get(REEXEC_MARKER) == "1":
        return
    if all(os.environ.get(k) == v for k, v in MALLOC_TUNED_ENV.items()):
        return
    env = dict(os.environ, **MALLOC_TUNED_ENV, **{REEXEC_MARKER: "1"})
    print("re-executing with " + " ".join(f"{k}={v}" for k, v in MALLOC_TUNED_ENV.items()), flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def plan(args, device: torch.device) -> list[tuple[str, impls.Config]]:
    """(suite, config) pairs to measure on ``device``."""
    on_gpu = device.type == "cuda"
    half_dtypes = ["bf16", "fp16"] if on_gpu else ["bf16"]
    if args.quick:
        return [("grid", impls.Config(4, 2**12, torch.float32, "layer"))]
    if any(v is not None for v in (args.T, args.neurons, args.dtypes, args.tau)) or args.full:
        Ts = args.T or [4, 8, 16, 32]
        if args.neurons:
            sizes = args.neurons
        elif on_gpu:
            sizes = [2**e for e in range(14, 27)] if args.full else [2**e for e in (16, 20, 24)]
        else:
            sizes = [2**e for e in range(14, 23, 2)] if args.full else [2**e for e in (14, 17, 20)]
        dtypes = args.dtypes or (["fp32"] + half_dtypes if args.full else ["fp32"])
        taus = args.tau or (["layer", "channel"] if args.full else ["layer"])
        return [("grid", impls.Config(T, N, DTYPES[d], tau)) for d in dtypes for tau in taus for T in Ts for N in sizes]
    main_T, steps_N = 8, (2**22 if on_gpu else 2**18)
    variant_N = 2**22 if on_gpu else 2**18
    sizes = [2**e for e in (range(16, 27, 2) if on_gpu else range(14, 23, 2))]
    suites = [("sizes", impls.Config(main_T, N, torch.float32, "layer")) for N in sizes]
    suites += [("steps", impls.Config(T, steps_N, torch.float32, "layer")) for T in (4, 16, 32)]
    suites += [("variants", impls.Config(main_T, variant_N, DTYPES[d], "layer")) for d in half_dtypes]
    suites += [("variants", impls.Config(main_T, variant_N, DTYPES[d], "channel")) for d in ["fp32"] + half_dtypes]
    return suites


def skip_reason(args, impl: impls.Implementation, suite: str, config: impls.Config, device: torch.device) -> str | None:
    """Why the run leaves a case out (default run only, to fit its time budget); None to measure it."""
    default_run = suite in ("sizes", "steps", "variants")
    limit = args.slow_max_neurons
    if limit is None and default_run and device.type == "cpu":
        limit = 2**20
    if impl.is_slow and limit is not None and config.N > limit:
        return f"Python-loop implementation above {limit} neurons (--slow-max-neurons; --full has no limit)"
    if impl.name == "compile" and default_run and suite != "sizes":
        return "torch.compile compiles again for every T/dtype/tau: only the main size sweep in the default run"
    return None


class Progress:
    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", flush=True)


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


class Buffers:
    """Rotated inputs and output gradients for one configuration, shared by every implementation."""

    def __init__(self, config: impls.Config, device: torch.device, count: int, seed: int = 0):
        # Drawn on the device itself: a GPU fills gigabytes in milliseconds, where the CPU takes seconds.
        generator = torch.Generator(device=device).manual_seed(seed)
        shape = (config.T, *config.step_shape)
        # Inputs around the threshold so that a realistic share of neurons fire.
        self.x = [
            (torch.randn(shape, generator=generator, device=device) * 0.8 + 1.2).to(config.dtype).requires_grad_()
            for _ in range(count)
        ]
        self.grad = [torch.randn(shape, generator=generator, device=device).to(config.dtype) for _ in range(count)]

    def __len__(self):
        return len(self.x)


def pass_functions(pass_name: str, neuron: impls.Neuron, buffers: Buffers, retain_graph: bool = False):
    """(prepare, run) for ``timing.measure``; gradients via autograd.grad so nothing accumulates.
    ``retain_graph``: the backward pass may run again on one prepared forward (graph replays)."""

    def gradients(out, i):
        return torch.autograd.grad(out, [buffers.x[i], *neuron.params], buffers.grad[i], retain_graph=retain_graph)

    if pass_name == "fwd":
        return (lambda i: i), (lambda i: neuron.run(buffers.x[i]))
    if pass_name == "bwd":
        return (lambda i: (neuron.run(buffers.x[i]), i)), (lambda state: gradients(*state))
    return (lambda i: i), (lambda i: gradients(neuron.run(buffers.x[i]), i))


def op_k_values(config: impls.Config) -> int:
    """Values of k the fused op is given: one per layer, or a per-channel tau expanded to every neuron."""
    return 1 if config.tau_values == 1 else config.N


def traffic_bytes(pass_name: str, config: impls.Config, device: torch.device) -> int:
    return traffic.pass_traffic(
        pass_name, config.T, config.N, config.dtype, k_values=op_k_values(config), device=device.type
    ).total


def kernel_only_fields(args, impl, neuron, buffers, device, pass_name: str, nbytes: int, copy_gbps: float) -> dict:
    """The kernel-only figure of a fused backend's pass on CUDA (empty elsewhere); a capture that
    fails is recorded in the row, not raised: the per-call figure stands without it."""
    if args.kernel_only == "off" or device.type != "cuda" or impl.kind != "fused":
        return {}
    try:
        kernels = measure_kernels(
            *pass_functions(pass_name, neuron, buffers, retain_graph=True), len(buffers), device, samples=args.repeats
        )
    except Exception as error:  # e.g. a launcher that cannot be captured
        return {"kernel_error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    fields = kernels.as_dict()
    fields["kernel_gbps"] = nbytes / (fields["kernel_median_ms"] * 1e-3) / 1e9
    fields["kernel_copy_fraction"] = fields["kernel_gbps"] / copy_gbps
    return fields


def measure_case(args, impl, neuron, config, buffers, device, flush, progress, base_row, rows: list[dict]) -> None:
    """Time every pass of one implementation on one configuration; append one row per pass to ``rows``."""
    begin = time.perf_counter()
    first_prepare, first_run = pass_functions("fwdbwd", neuron, buffers)
    first_run(first_prepare(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_call_s = time.perf_counter() - begin
    saved = saved_tensor_bytes(lambda: neuron.run(buffers.x[0]))
    saved_per_step = saved["bytes"] / (config.T * config.N)
    detail = neuron.detail or ""
    if impl.name == "spikingjelly":
        detail = impls.spikingjelly_path(device)
    for pass_name in args.passes:
        prepare, run = pass_functions(pass_name, neuron, buffers)
        timing = measure(
            prepare,
            run,
            len(buffers),
            device,
            warmup=args.warmup,
            repeats=args.repeats,
            budget_s=args.case_seconds,
            min_repeats=min(args.min_repeats, args.repeats),
            flush=flush,
        )
        peak = None
        if device.type == "cuda":
            state = prepare(0)
            peak = peak_memory_bytes(device, lambda: run(state))
            del state
        nbytes = traffic_bytes(pass_name, config, device)
        gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
        kernels = kernel_only_fields(args, impl, neuron, buffers, device, pass_name, nbytes, base_row["copy_gbps"])
        row = {
            **base_row,
            "pass": pass_name,
            "status": "ok",
            "detail": detail,
            **timing.as_dict(),
            "first_call_s": first_call_s,
            "traffic_bytes": nbytes,
            "gbps": gbps,
            "copy_fraction": gbps / base_row["copy_gbps"],
            **kernels,
            "saved_bytes": saved["bytes"],
            "saved_tensors": saved["tensors"],
            "saved_bytes_per_neuron_step": saved_per_step,
            "peak_bytes": peak,
        }
        rows.append(row)
        kernel_note = ""
        if "kernel_median_ms" in kernels:
            kernel_note = f"; kernel-only {kernels['kernel_median_ms']:.3f} ms {kernels['kernel_gbps']:6.1f} GB/s"
        elif "kernel_error" in kernels:
            kernel_note = f"; kernel-only failed: {kernels['kernel_error']}"
        progress(
            f"  {impl.label:32s} {report.PASS_LABELS[pass_name]:8s} {timing.median_ms:9.3f} ms "
            f"(IQR {timing.iqr_ms:.3f}, n={len(timing.samples_ms)})  {gbps:6.1f} GB/s{kernel_note}"
        )


# Copies timed right before and right after each fused backend's passes.
COPY_REPEATS_PER_CASE = 5
# Copies further apart than this factor mean the machine changed state during the case, so the
# case is timed again (see NOTES, "Sixth pass: the backward's operations per neuron-step").
COPY_AGREEMENT = 1.2
COPY_ATTEMPTS = 3


def time_between_copies(measure_into, copy_gbps, progress, case_rows: list[dict]) -> None:
    """Fill ``case_rows`` by ``measure_into(case_rows)`` between two copies (``copy_gbps()``), again
    while the two disagree, and rate the last attempt's passes against them. Each row records how
    many attempts it took."""
    for attempt in range(1, COPY_ATTEMPTS + 1):
        case_rows.clear()
        before = copy_gbps()
        measure_into(case_rows)
        after = copy_gbps()
        if max(before, after) <= COPY_AGREEMENT * min(before, after) or attempt == COPY_ATTEMPTS:
            judge_by_adjacent_copies(case_rows, before, after, progress)
            for row in case_rows:
                row["copy_attempts"] = attempt
            return
        progress(
            f"  {'':32s} copy {before:.1f} GB/s before, {after:.1f} after: the machine changed state "
            "during the case; timing it again"
        )


def judge_by_adjacent_copies(case_rows: list[dict], before_gbps: float, after_gbps: float, progress) -> None:
    """Rate a fused backend's passes against the copy bandwidth measured next to them: the higher
    of the two measurements (a pass is never rated against a slower minute than its own)."""
    adjacent = max(before_gbps, after_gbps)
    for row in case_rows:
        if row.get("status") == "ok":
            row.update(
                copy_gbps_before=before_gbps,
                copy_gbps_after=after_gbps,
                copy_gbps=adjacent,
                copy_fraction=row["gbps"] / adjacent,
            )
            if "kernel_gbps" in row:
                row["kernel_copy_fraction"] = row["kernel_gbps"] / adjacent
    fractions = ", ".join(
        f"{report.PASS_LABELS[r['pass']]} {100 * r['copy_fraction']:.0f}%" for r in case_rows if r.get("status") == "ok"
    )
    progress(f"  {'':32s} copy {before_gbps:.1f} GB/s before, {after_gbps:.1f} after: {fractions}")


def plan_only(args, device: torch.device, progress) -> list[str]:
    """The dry run's part of run_device: what would be measured on ``device``, with no call on it.
    Returns the requested peers that are missing (ours may lack only the device)."""
    chosen = impls.implementations(device, args.backends, [p for p in args.peers if p != "none"])
    missing_peers = []
    for impl in chosen:
        reason = impl.missing(device)
        progress(f"{device}: {impl.label}: {'missing: ' + reason if reason else 'available'}")
        if reason and impl.kind == "peer":
            missing_peers.append(f"{device}: {impl.label}: {reason}")
    for index, (suite, config) in enumerate(plan(args, device), 1):
        passes = ", ".join(f"{p} {traffic_bytes(p, config, device) / 1e6:.1f} MB" for p in args.passes)
        progress(
            f"{device} [{index}] {suite}: T={config.T} N={config.N} {dtype_name(config.dtype)} "
            f"tau per {config.tau}: {passes}"
        )
    return missing_peers


class RunRecord:
    """The run's results so far, rewritten to <out>/<stem>.json and .md after every case (each
    file written whole to a temporary and renamed over the old one), so that a run cut short, by a
    timeout or a crash, leaves valid files holding every case it finished."""

    def __init__(self, out: Path, stem: str, header: dict, began: float):
        self.json_path, self.markdown_path = out / f"{stem}.json", out / f"{stem}.md"
        self.header = header
        self.rows: list[dict] = []
        self.copies: dict[str, dict] = {}
        self.network: list[dict] = []
        self.began = began

    def implementations(self) -> tuple[list[str], dict]:
        return list(dict.fromkeys(r["impl"] for r in self.rows)), {r["impl"]: r["label"] for r in self.rows}

    def result(self, complete: bool) -> dict:
        add_speedups(self.rows)
        return {
            **self.header,
            "complete": complete,
            "copy_bandwidth": self.copies,
            "rows": self.rows,
            "network": self.network,
            "wall_s": time.perf_counter() - self.began,
        }

    def save(self, complete: bool = False) -> dict:
        result = self.result(complete)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        report.write_json(self.json_path, result)
        markdown = report.markdown(result, *self.implementations())
        report.write_atomic(self.markdown_path, lambda p: p.write_text(markdown))
        return result


def run_device(args, device: torch.device, progress, record: RunRecord) -> None:
    llc = (report.last_level_cache() or (None, None))[1] if device.type == "cpu" else None
    if device.type == "cuda":
        llc = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    default_rotate = max(llc or 0, 256 << 20)
    rotate_bytes = int(args.rotate_mb * 2**20) if args.rotate_mb else default_rotate
    copy_bytes = int(args.copy_mb * 2**20) if args.copy_mb else max(llc or 0, 512 << 20)
    if args.quick:
        copy_bytes = min(copy_bytes, 64 << 20)
    progress(f"{device}: measuring copy bandwidth ({copy_bytes / 2**20:.0f} MiB copies)")
    copy_probe = CopyProbe(device, copy_bytes)
    copy = copy_probe()
    copy["last_level_cache_bytes"] = llc
    record.copies[device.type] = copy
    progress(f"{device}: copy bandwidth {copy['gbps']:.1f} GB/s (median), best {copy['gbps_best']:.1f}")
    flush = CacheFlusher(device, 2 * llc) if args.flush_cache and llc else None

    chosen = impls.implementations(device, args.backends, [p for p in args.peers if p != "none"])
    missing = {impl.name: impl.missing(device) for impl in chosen}
    for impl in chosen:
        if missing[impl.name]:
            progress(f"{device}: {impl.label} missing: {missing[impl.name]}")
    cases = plan(args, device)
    for index, (suite, config) in enumerate(cases, 1):
        per_call = traffic_bytes("fwdbwd", config, device)
        count = rotation_count(per_call, rotate_bytes, args.max_buffers)
        progress(
            f"{device} [{index}/{len(cases)}] {suite}: T={config.T} N={config.N} {dtype_name(config.dtype)} "
            f"tau per {config.tau}; {count} rotated buffers"
        )
        buffers = Buffers(config, device, count)
        base = {
            "device": device.type,
            "suite": suite,
            "T": config.T,
            "neurons": config.N,
            "dtype": dtype_name(config.dtype),
            "tau": config.tau,
            "input_shape": [config.T, *config.step_shape],
            "rotation_buffers": count,
            "rotated_bytes": count * per_call,
            "rotation_fits_cache": bool(llc) and count * per_call < llc and flush is None,
            "call_fits_cache": bool(llc) and per_call <= llc,  # one call's [T, N] streams
            "cache_flushed": flush is not None,
            "copy_gbps": copy["gbps"],
        }
        for impl in chosen:
            row = {**base, "impl": impl.name, "label": impl.label, "kind": impl.kind, "notes": impl.notes}
            reason = missing[impl.name]
            status = "missing"
            if reason is None:
                reason, status = impl.unsupported(config, device), "unsupported"
            if reason is None:
                reason, status = skip_reason(args, impl, suite, config, device), "skipped"
            if reason is not None:
                record.rows += [{**row, "pass": p, "status": status, "reason": reason} for p in args.passes]
                if status != "missing":
                    progress(f"  {impl.label:32s} {status}: {reason}")
                continue
            case_rows: list[dict] = []
            try:
                with impl.setting():
                    neuron = impl.build(config, device)
                    measure_into = functools.partial(
                        measure_case, args, impl, neuron, config, buffers, device, flush, progress, row
                    )
                    if impl.kind == "fused":
                        time_between_copies(
                            measure_into, lambda: copy_probe(COPY_REPEATS_PER_CASE)["gbps"], progress, case_rows
                        )
                    else:
                        measure_into(case_rows)
            except Exception as error:  # one failing case must not lose the rest of the run
                status = "error" if impl.kind != "peer" else "unsupported"
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                measured = {r["pass"] for r in case_rows}
                case_rows += [
                    {**row, "pass": p, "status": status, "reason": reason} for p in args.passes if p not in measured
                ]
                progress(f"  {impl.label:32s} {status}: {reason}")
            finally:
                record.rows += case_rows
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            record.save()
        del buffers

    if not args.no_network:
        batch = 2 if args.quick else (64 if device.type == "cuda" else 16)
        progress(f"{device}: training step of a small spiking convnet (batch {batch})")
        record.network += network.training_step_rows(
            device,
            T=4 if args.quick else 8,
            batch=batch,
            warmup=1,
            repeats=2 if args.quick else args.repeats,
            budget_s=max(args.case_seconds, 2.0),
            with_spikingjelly="spikingjelly" in args.peers,
            progress=progress,
        )
        record.save()


def add_speedups(rows: list[dict]) -> None:
    def key(row):
        return (row["device"], row["suite"], row["T"], row["neurons"], row["dtype"], row["tau"], row["pass"])

    baselines = {}
    for row in rows:
        if row["status"] == "ok" and row["impl"] in ("torch", "spikingjelly"):
            baselines[(row["impl"], key(row))] = row["median_ms"]
    for row in rows:
        if row["status"] != "ok":
            continue
        for name, field in (("torch", "speedup_vs_reference"), ("spikingjelly", "speedup_vs_spikingjelly")):
            base = baselines.get((name, key(row)))
            row[field] = base / row["median_ms"] if base else None


def output_stem(args, devices: list[str]) -> str:
    return args.name or f"bench-{'+'.join(devices)}-{'malloc-tuned' if args.malloc_tuned else 'malloc-default'}"


def main(argv=None) -> int:
    args = arguments(argv)
    hide_cuda_home_notice()
    if args.malloc_tuned:
        reexec_with_tuned_malloc()
    if args.quick:
        args.repeats, args.min_repeats, args.warmup = min(args.repeats, 2), 1, min(args.warmup, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = Progress()
    started = datetime.now(timezone.utc)
    wall_begin = time.perf_counter()
    devices = args.devices or default_devices()
    if "cuda" in devices and not torch.cuda.is_available() and not args.dry_run:
        print("--devices cuda: no CUDA device is available to torch", file=sys.stderr)
        return 2
    env = report.environment(ROOT, malloc_tuned=args.malloc_tuned)
    progress(
        f"torch {env['torch']}, {env['cpu_model']}, {env['torch_threads']} threads, "
        f"GPU {env['gpu']['name'] if env['gpu'] else 'none'}; allocator "
        f"{'tuned' if args.malloc_tuned else 'default'}"
    )
    header = {
        "schema": 1,
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "traffic_model": traffic.__doc__,
    }
    stem = output_stem(args, devices)
    record = RunRecord(args.out, stem, header, began=wall_begin)
    if args.dry_run:
        missing_peers = [line for name in devices for line in plan_only(args, torch.device(name), progress)]
        record.save()
        print(f"dry run: wrote {args.out / stem}.json, .md (no measurement)")
        if missing_peers:
            print("dry run: requested peers are missing:\n" + "\n".join(missing_peers), file=sys.stderr)
            return 1
        return 0
    for name in devices:
        run_device(args, torch.device(name), progress, record)
    env["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = record.save(complete=True)
    rows, network_rows = record.rows, record.network
    impl_names, labels = record.implementations()
    markdown = report.markdown(result, impl_names, labels)
    plot_problem = report.plot(args.out / f"{stem}.png", result, impl_names, labels)
    print()
    print(markdown)
    if plot_problem:
        print(plot_problem)
    print(f"wrote {args.out / stem}.json, .md" + ("" if plot_problem else ", .png") + f" in {result['wall_s']:.0f} s")
    errors = [r for r in rows if r["status"] == "error"] + [r for r in network_rows if r["status"] == "error"]
    if errors:
        print(
            f"{len(errors)} measurement(s) of our own implementations failed; see 'reason' in the JSON", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
