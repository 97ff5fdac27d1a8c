"""What a run records about itself, and the three files it writes (JSON, Markdown, PNG)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

import plif_cuda

MALLOC_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)
# The build information plif_cuda._C carries.
BUILD_INFO = ("TORCH_VERSION", "CUDA_ARCHS", "CUDA_SKIPPED_BECAUSE")
PASS_LABELS = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache() -> tuple[int, int] | None:
    """(level, bytes) of the CPU's largest cache as the kernel reports it (a VM may report the host's)."""
    largest = None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            continue
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        if largest is None or size > largest[1]:
            largest = (level, size)
    return largest


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def machine_label(result: dict, device: str) -> str:
    """The processor a device's rows ran on and its last-level cache, for tables and plot titles:
    which sizes run from cache, and so the results, depend on that cache."""
    env = result["environment"]
    if device == "cuda" and env["gpu"]:
        l2 = env["gpu"].get("l2_cache_bytes")
        return env["gpu"]["name"] + (f" (L2 {_mib(l2)})" if l2 else "")
    level, size = env.get("last_level_cache_level"), env.get("last_level_cache_bytes")
    cache = (
        f"L{level} {_mib(size)}"
        if level and size
        else (f"last-level cache {_mib(size)}" if size else "last-level cache unknown")
    )
    return f"{env['cpu_model']} ({env['cpu_count']} cores, {cache})"


def _git_revision(root: Path) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(root: Path, malloc_tuned: bool) -> dict:
    llc_level, llc_bytes = last_level_cache() or (None, None)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "plif_cuda": plif_cuda.__version__,
        "plif_cuda_backends_cpu": plif_cuda.available_backends("cpu"),
        "git": _git_revision(root),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "last_level_cache_level": llc_level,
        "last_level_cache_bytes": llc_bytes,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "malloc_tuned": malloc_tuned,
        "malloc_environment": {name: os.environ.get(name) for name in MALLOC_VARIABLES},
        "gpu": None,
    }
    try:
        from plif_cuda import _C

        env["plif_cuda_build"] = {name: getattr(_C, name) for name in BUILD_INFO}
    except ImportError:
        env["plif_cuda_build"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "multiprocessors": props.multi_processor_count,
        }
        env["plif_cuda_backends_cuda"] = plif_cuda.available_backends("cuda")
    return env


def write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def write_json(path: Path, result: dict) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(result, indent=1, default=str) + "\n"))


def _size_label(n: int) -> str:
    exponent = n.bit_length() - 1
    return f"2^{exponent}" if n == 1 << exponent else str(n)


def _fmt_ms(row) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return {"missing": "missing", "unsupported": "n/a", "skipped": "skip"}.get(row["status"], row["status"])
    return f"{row['median_ms']:.3g}"


def _best_fused(rows_for_case):
    fused = [r for r in rows_for_case if r["kind"] == "fused" and r["status"] == "ok"]
    return min(fused, key=lambda r: r["median_ms"]) if fused else None


def may_run_from_cache(row: dict, result: dict) -> bool:
    """Whether the data of one call of the row's pass (its traffic) fits in the device's
    last-level cache. Then the pass may run from cache (the backward's inputs were just written by
    its untimed forward; rotated inputs stay partly cached) and beat the copy bandwidth, which is
    measured over copies larger than that cache; which sizes do depends on the machine."""
    llc = result["copy_bandwidth"].get(row["device"], {}).get("last_level_cache_bytes")
    return bool(llc) and (row["traffic_bytes"] <= llc or bool(row.get("rotation_fits_cache")))


def _best_kernel_only(rows_for_case):
    timed = [r for r in rows_for_case if r["status"] == "ok" and r.get("kernel_median_ms") is not None]
    return min(timed, key=lambda r: r["kernel_median_ms"]) if timed else None


def _kernel_cells(rows_for_case) -> list[str]:
    """Kernel-only ms and % of copy of the fastest fused backend by that figure (CUDA graph replays)."""
    best = _best_kernel_only(rows_for_case)
    if best is None:
        errors = [r["kernel_error"] for r in rows_for_case if r.get("kernel_error")]
        return ["failed" if errors else "", ""]
    return [f"{best['kernel_median_ms']:.3g}", f"{100 * best['kernel_copy_fraction']:.0f}%"]


def op_table(result: dict, impl_names: list[str], labels: dict) -> list[str]:
    """One line per (device, config, pass); a column per implementation (median ms per call), and
    where any row has one, the fused backends' kernel-only figure."""
    cases: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        key = (row["device"], row["suite"], row["T"], row["neurons"], row["dtype"], row["tau"], row["pass"])
        cases.setdefault(key, []).append(row)
    with_kernels = any("kernel_median_ms" in r or "kernel_error" in r for r in result["rows"])
    header = (
        ["device", "T", "neurons", "dtype", "tau", "pass"]
        + [f"{labels[n]} ms" for n in impl_names]
        + ["fused GB/s", "copy GB/s", "% of copy"]
        + (["kernel-only ms", "kernel-only % of copy"] if with_kernels else [])
        + ["x ref", "x SJ", "saved B/neuron-step"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, case_rows in cases.items():
        device, _, T, N, dtype, tau, pass_name = key
        by_name = {r["impl"]: r for r in case_rows}
        best = _best_fused(case_rows)
        cached = best is not None and may_run_from_cache(best, result)
        mark = "\u2020" if cached else ""
        size = _size_label(N) + mark
        cells = [device, str(T), size, dtype, tau, PASS_LABELS[pass_name]] + [
            _fmt_ms(by_name.get(n)) for n in impl_names
        ]
        kernel_cells = _kernel_cells(case_rows) if with_kernels else []
        if best is None:
            cells += ["", "", ""] + kernel_cells + ["", "", ""]
        else:
            cells += [
                f"{best['gbps']:.1f}",
                f"{best['copy_gbps']:.1f}",
                f"{100 * best['copy_fraction']:.0f}%{mark}",
                *kernel_cells,
                f"{best['speedup_vs_reference']:.1f}" if best.get("speedup_vs_reference") else "",
                f"{best['speedup_vs_spikingjelly']:.1f}" if best.get("speedup_vs_spikingjelly") else "",
                f"{best['saved_bytes_per_neuron_step']:.1f}"
                if best.get("saved_bytes_per_neuron_step") is not None
                else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def memory_table(rows: list[dict], impl_names: list[str], labels: dict) -> list[str]:
    """Bytes kept for backward per neuron-step (and GPU peak memory) per implementation."""
    seen = {}
    for row in rows:
        if row["status"] != "ok" or row["pass"] != "fwdbwd":
            continue
        key = (row["device"], row["T"], row["neurons"], row["dtype"], row["tau"])
        seen.setdefault(key, {})[row["impl"]] = row
    lines = [
        "| device | T | neurons | dtype | tau | " + " | ".join(labels[n] for n in impl_names) + " |",
        "|" + "---|" * (5 + len(impl_names)),
    ]
    for (device, T, N, dtype, tau), by_name in seen.items():
        cells = []
        for name in impl_names:
            row = by_name.get(name)
            if row is None or row.get("saved_bytes_per_neuron_step") is None:
                cells.append("")
                continue
            text = f"{row['saved_bytes_per_neuron_step']:.1f} B"
            if row.get("peak_bytes") is not None:
                text += f" / peak {row['peak_bytes'] / 2**20:.0f} MiB"
            cells.append(text)
        lines.append(f"| {device} | {T} | {_size_label(N)} | {dtype} | {tau} | " + " | ".join(cells) + " |")
    return lines


def cache_fit_lines(result: dict) -> list[str]:
    """Per CPU size: do one fwd+bwd call's [T, N] streams (minimum traffic) fit in the last-level cache?"""
    llc = result["copy_bandwidth"].get("cpu", {}).get("last_level_cache_bytes")
    sizes = {}
    for row in result["rows"]:
        if row["device"] == "cpu" and "call_fits_cache" in row:
            sizes[(row["T"], row["neurons"], row["dtype"])] = row["call_fits_cache"]
    if not llc or not sizes:
        return []
    cells = [
        f"T={T} {_size_label(N)} {dtype}: {'fits' if fits else 'does not fit'}"
        for (T, N, dtype), fits in sorted(sizes.items())
    ]
    return [
        "",
        f"CPU last-level cache {llc / 2**20:.0f} MiB (sysfs); one fwd+bwd call's [T, N] streams: "
        + "; ".join(cells)
        + ".",
    ]


def network_table(rows: list[dict]) -> list[str]:
    lines = [
        "| device | neuron layer | dtype | T | batch | training step ms (median) | IQR ms | x reference layer "
        "| neuron layers keep (B per neuron-step) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['device']} | {row['layer']} | {row.get('dtype', 'float32')} | {row['T']} | {row['batch']} |"
        if row["status"] == "ok":
            saved = row.get("neuron_saved_bytes_per_neuron_step")
            lines.append(
                f"{head} {row['median_ms']:.1f} | {row['iqr_ms']:.1f} | "
                f"{row.get('speedup_vs_reference_layer', float('nan')):.2f} | "
                f"{'' if saved is None else f'{saved:.2f}'} |"
            )
        else:
            lines.append(f"{head} {row['status']} | | | |")
    return lines


def markdown(result: dict, impl_names: list[str], labels: dict) -> str:
    env = result["environment"]
    gpu = machine_label(result, "cuda") if env["gpu"] else "none"
    malloc = ", ".join(f"{k}={v}" for k, v in env["malloc_environment"].items() if v is not None) or "glibc defaults"
    lines = [
        f"# plif_cuda benchmark ({result['started']})",
        "",
        f"- CPU: {machine_label(result, 'cpu')}, {env['torch_threads']} torch threads, "
        f"load average at start {', '.join(f'{x:.2f}' for x in env['load_average_at_start'] or [])}",
        f"- GPU: {gpu}",
        f"- torch {env['torch']}, plif_cuda {env['plif_cuda']} (commit {str(env['git']['commit'])[:10]}"
        f"{', dirty' if env['git']['dirty'] else ''})",
        f"- allocator: {malloc} ({'--malloc-tuned' if env['malloc_tuned'] else 'default'})",
        f"- run time {result['wall_s']:.0f} s; command `{result['command']}`",
    ]
    for device, copy in result["copy_bandwidth"].items():
        lines.append(
            f"- {device} copy bandwidth: {copy['gbps']:.1f} GB/s (median; best {copy['gbps_best']:.1f}) "
            f"over {copy['bytes_per_copy'] / 2**20:.0f} MiB copies"
        )
    lines += [
        "",
        "## The op alone (median ms per call; lower is better)",
        "",
        "Fused GB/s = traffic of the pass (benchmarks/traffic.py: the bytes the fused op's kernels move) / "
        "median time per call of the fastest fused backend; copy GB/s = the copy bandwidth measured right "
        "before and right after that backend's passes "
        "(the higher of the two: the bandwidth of this machine can move from minute to minute, and the copy "
        "line above is the run's start; a case whose two copies differ by more than 1.2x is timed again, up "
        "to three times); % of copy = fused GB/s over copy GB/s; x ref and x SJ = speedup of that "
        "backend over the PyTorch reference and over SpikingJelly. \u2020: one call's data fits in the "
        "last-level cache, so the pass may run from cache, faster than the copy bandwidth (measured over "
        "copies larger than that cache) allows: its % of copy can pass 100%, and which sizes do depends on "
        "the cache size of the machine. Kernel-only (CUDA): the calls over every rotated buffer captured "
        "once as a CUDA graph and replayed back to back, per call: the GPU's time without the host's part "
        "of a call (checks, autograd, launches), of the fused backend fastest by that figure. "
        "n/a: unsupported configuration; "
        "skip: left out of this run (see the JSON for why).",
        "",
    ]
    lines += op_table(result, impl_names, labels)
    lines += cache_fit_lines(result)
    lines += ["", "## Memory kept for backward (bytes per neuron-step, distinct storages; GPU: peak of fwd+bwd)", ""]
    lines += memory_table(result["rows"], impl_names, labels)
    if result["network"]:
        lines += ["", "## Training step of a small spiking convnet (2x conv-BN-PLIF-maxpool, SGD)", ""]
        lines += network_table(result["network"])
    missing = sorted({(r["impl"], r["reason"]) for r in result["rows"] if r["status"] == "missing"})
    if missing:
        lines += ["", "## Missing", ""] + [f"- {labels[name]}: {reason}" for name, reason in missing]
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict, impl_names: list[str], labels: dict) -> str | None:
    """Time vs size (main sweep, fwd+bwd) and fraction of copy bandwidth of the fused backends."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"matplotlib is not installed ({error}); no plot"
    devices = sorted({r["device"] for r in result["rows"]})
    fig, axes = plt.subplots(len(devices), 2, figsize=(12, 4.5 * len(devices)), squeeze=False)
    for axis_row, device in zip(axes, devices):
        main = [
            r
            for r in result["rows"]
            if r["device"] == device and r["suite"] in ("sizes", "grid") and r["status"] == "ok"
        ]
        T_main = min((r["T"] for r in main), key=lambda t: abs(t - 8), default=None)
        dtype_main = "fp32" if any(r["dtype"] == "fp32" for r in main) else next((r["dtype"] for r in main), None)
        picked = [r for r in main if r["T"] == T_main and r["dtype"] == dtype_main and r["tau"] == "layer"]
        for name in impl_names:
            points = sorted(
                (r["neurons"], r["median_ms"]) for r in picked if r["impl"] == name and r["pass"] == "fwdbwd"
            )
            if points:
                axis_row[0].plot(*zip(*points), marker="o", label=labels[name])
        axis_row[0].set(
            xscale="log",
            yscale="log",
            xlabel="neurons",
            ylabel="ms per fwd+bwd",
            title=f"{device}: op fwd+bwd, T={T_main}, {dtype_main}, per-layer tau",
        )
        axis_row[0].legend(fontsize=8)
        axis_row[0].grid(True, which="both", alpha=0.3)
        any_cached = False
        for name in impl_names:
            for pass_name, style in (("fwd", ":"), ("bwd", "--"), ("fwdbwd", "-")):
                points = sorted(
                    (r["neurons"], 100 * r["copy_fraction"], may_run_from_cache(r, result))
                    for r in picked
                    if r["impl"] == name and r["pass"] == pass_name and r["kind"] == "fused"
                )
                if not points:
                    continue
                sizes, percents, cached = zip(*points)
                (line,) = axis_row[1].plot(
                    sizes, percents, style, marker="o", label=f"{labels[name]} {PASS_LABELS[pass_name]}"
                )
                # Hollow markers: the inputs fit in the last-level cache, so the copy roofline,
                # measured beyond that cache, does not bound them.
                in_cache = [(n, p) for n, p, c in points if c]
                if in_cache:
                    any_cached = True
                    axis_row[1].plot(
                        *zip(*in_cache),
                        linestyle="none",
                        marker="o",
                        markersize=7,
                        markerfacecolor="white",
                        markeredgecolor=line.get_color(),
                    )
        axis_row[1].axhline(100, color="grey", linewidth=0.8)
        axis_row[1].set(
            xscale="log",
            xlabel="neurons",
            ylabel="% of copy bandwidth",
            ylim=(0, None),
            title=f"{device}: fused backends, fraction of the copy roofline",
        )
        if any_cached:
            copy = result["copy_bandwidth"].get(device, {})
            axis_row[1].annotate(
                "hollow: one call's data fits in the last-level cache,\nso it can beat the copy roofline "
                f"(copies of {_mib(copy.get('bytes_per_copy', 0))} exceed the cache)",
                xy=(0.02, 0.02),
                xycoords="axes fraction",
                fontsize=7,
            )
        axis_row[1].legend(fontsize=8)
        axis_row[1].grid(True, which="both", alpha=0.3)
    fig.suptitle(" / ".join(machine_label(result, device) for device in devices), fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return None
