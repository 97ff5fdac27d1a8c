"""Timing primitives shared by every measurement of the harness.

Rules, so that numbers from different implementations can be compared:
- warm-up calls first (allocator, lazy initialisation, torch.compile, CUDA module load);
- every sample times exactly one call; on CUDA with events recorded on the current stream
  around that call, on CPU with perf_counter (the CPU ops are synchronous);
- inputs rotate over several buffers so that a call does not find its input in the cache
  left by the previous call (the caller decides how many, see ``rotation_count``);
- what a call needs but should not be timed (e.g. the forward graph for a backward) is
  prepared for every buffer of a round before any of them is timed, so it is cold too;
- the summary is the median with the inter-quartile range and the minimum.

On CUDA a second figure, kernel-only (``measure_kernels``): one round of calls over every buffer
captured once as a CUDA graph and replayed back to back between two events, so the host's part of
a call (argument checks, the autograd graph, launches) is left out and only the GPU's time stays.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        if len(self.samples_ms) < 4:
            return max(self.samples_ms) - min(self.samples_ms)
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4)
        return q3 - q1

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "iqr_ms": self.iqr_ms,
            "min_ms": self.min_ms,
            "samples": len(self.samples_ms),
            "samples_ms": self.samples_ms,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotation_count(bytes_per_buffer: int, rotate_bytes: int, max_buffers: int) -> int:
    """How many input buffers to cycle through: enough to cover ``rotate_bytes``, at least 2."""
    wanted = math.ceil(rotate_bytes / max(bytes_per_buffer, 1))
    return max(2, min(max_buffers, wanted))


class CacheFlusher:
    """Writes a scratch buffer larger than the last-level cache (optional, costs time)."""

    def __init__(self, device: torch.device, nbytes: int):
        self.scratch = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device)
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        self.scratch.fill_(float(self.calls % 7))


def measure(
    prepare,
    run,
    n_buffers: int,
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float,
    min_repeats: int = 3,
    flush=None,
) -> Timing:
    """Time ``run(state)`` where ``state = prepare(buffer_index)``.

    Samples are taken in rounds: a round prepares its buffers, then times one call per
    buffer, cycling through all ``n_buffers`` over the rounds. Sampling stops at ``repeats``
    samples, or, once there are ``min_repeats``, when ``budget_s`` seconds of wall time have
    been spent (slow implementations); rounds are sized from the warm-up's duration so that a
    slow implementation does not prepare buffers it will never time.
    """
    warm_begin = time.perf_counter()
    for i in range(warmup):
        run(prepare(i % n_buffers))
    synchronize(device)
    per_call_s = (time.perf_counter() - warm_begin) / warmup if warmup else 0.0
    round_size = n_buffers
    if per_call_s > 0 and math.isfinite(budget_s):
        round_size = max(1, min(n_buffers, max(min_repeats, math.ceil(budget_s / per_call_s))))
    samples: list[float] = []
    cursor = 0
    started = time.perf_counter()
    while len(samples) < repeats:
        indices = [(cursor + j) % n_buffers for j in range(min(round_size, repeats - len(samples)))]
        cursor += len(indices)
        states = [prepare(i) for i in indices]
        synchronize(device)
        if device.type == "cuda":
            pairs = []
            for state in states:
                if flush is not None:
                    flush()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                out = run(state)
                end.record()
                del out
                pairs.append((begin, end))
            torch.cuda.synchronize(device)
            samples.extend(begin.elapsed_time(end) for begin, end in pairs)
        else:
            for state in states:
                if flush is not None:
                    flush()
                begin = time.perf_counter()
                out = run(state)
                samples.append((time.perf_counter() - begin) * 1e3)
                del out  # freeing the outputs is not part of the call
        del states
        if len(samples) >= min_repeats and time.perf_counter() - started > budget_s:
            break
    return Timing(samples)


# Kernel-only timing: warm-up rounds on the capture stream before the capture (lazy
# initialisation must not happen inside it), and replays per sample enough to fill this many
# milliseconds of GPU time (the two events' own cost then vanishes), within a cap.
CAPTURE_WARMUP_ROUNDS = 2
KERNEL_SAMPLE_MS = 5.0
MAX_REPLAYS_PER_SAMPLE = 1000


@dataclass
class KernelTiming:
    """Per-call times from graph replays: each sample is one replay batch's time over its calls."""

    timing: Timing
    calls_per_replay: int
    replays_per_sample: int

    def as_dict(self) -> dict:
        return {
            "kernel_median_ms": self.timing.median_ms,
            "kernel_iqr_ms": self.timing.iqr_ms,
            "kernel_min_ms": self.timing.min_ms,
            "kernel_samples": len(self.timing.samples_ms),
            "kernel_calls_per_sample": self.calls_per_replay * self.replays_per_sample,
        }


def replay_samples(
    replay: Callable[[], None],
    time_replays: Callable[[Callable[[], None], int], float],
    calls_per_replay: int,
    samples: int,
) -> KernelTiming:
    """``samples`` per-call times of ``replay`` (which runs ``calls_per_replay`` calls), each from
    ``time_replays(replay, count)``, the milliseconds that ``count`` back-to-back replays take."""
    if calls_per_replay < 1 or samples < 1:
        raise ValueError(f"calls_per_replay and samples must be >= 1, got {calls_per_replay} and {samples}")
    one_ms = time_replays(replay, 1)
    count = MAX_REPLAYS_PER_SAMPLE if one_ms <= 0 else math.ceil(KERNEL_SAMPLE_MS / one_ms)
    count = max(1, min(MAX_REPLAYS_PER_SAMPLE, count))
    per_call = [time_replays(replay, count) / (count * calls_per_replay) for _ in range(samples)]
    return KernelTiming(Timing(per_call), calls_per_replay, count)


def event_timer(cuda, device) -> Callable[[Callable[[], None], int], float]:
    """``time_replays`` for ``replay_samples``: milliseconds between two CUDA events around
    ``count`` calls on the current stream."""

    def time_replays(replay, count):
        begin, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(count):
            replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)

    return time_replays


def measure_kernels(prepare, run, n_buffers: int, device, *, samples: int, cuda=torch.cuda) -> KernelTiming:
    """Kernel-only per-call time of ``run(prepare(i))``: the calls over every buffer (as many
    distinct inputs as ``measure`` rotates) captured as one CUDA graph, replayed back to back.

    ``prepare`` runs before the capture, on the capture stream: a backward's forward must run on
    the stream its backward is captured on (autograd runs each backward node on its forward's
    stream), and its graph must outlive the replays (``run`` has to keep it: retain_graph).
    ``cuda`` is torch.cuda; a test passes a stand-in to run this on a CPU.
    """
    capture_stream = cuda.Stream(device)
    capture_stream.wait_stream(cuda.current_stream(device))
    with cuda.stream(capture_stream):
        states = [prepare(i) for i in range(n_buffers)]

        def call_round():
            for state in states:
                run(state)  # outputs dropped: their memory returns to the graph's pool

        for _ in range(CAPTURE_WARMUP_ROUNDS):
            call_round()
    graph = cuda.CUDAGraph()
    with cuda.graph(graph, stream=capture_stream):
        call_round()
    cuda.current_stream(device).wait_stream(capture_stream)
    return replay_samples(graph.replay, event_timer(cuda, device), n_buffers, samples)


class CopyProbe:
    """Device copy bandwidth: ``dst.copy_(src)`` of ``nbytes``, counted as read + write, median.

    The buffers stay allocated so that the bandwidth can be measured again next to each case:
    on a shared machine it moves from minute to minute (see NOTES, "Fifth pass: the copy next to
    each case, the exp's chain, the surrogate a step ahead"), and a pass is judged against the
    bandwidth of its own minute."""

    def __init__(self, device: torch.device, nbytes: int):
        self.device = device
        numel = max(nbytes // 4, 1)
        self.src = torch.rand(numel, dtype=torch.float32, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)
        synchronize(device)

    def __call__(self, repeats: int = 7) -> dict:
        timing = measure(
            lambda i: None,
            lambda _: self.dst.copy_(self.src),
            1,
            self.device,
            warmup=1,
            repeats=repeats,
            budget_s=float("inf"),
            min_repeats=repeats,
        )
        traffic = 2 * self.src.numel() * 4
        return {
            "bytes_per_copy": self.src.numel() * 4,
            "traffic_bytes": traffic,
            "median_ms": timing.median_ms,
            "min_ms": timing.min_ms,
            "gbps": traffic / (timing.median_ms * 1e-3) / 1e9,
            "gbps_best": traffic / (timing.min_ms * 1e-3) / 1e9,
        }


def saved_tensor_bytes(forward) -> dict:
    """Bytes that autograd keeps for backward while ``forward()`` runs.

    Counted once per distinct storage (several saved views of one tensor, or one tensor
    saved by several nodes, count once). The input itself counts when it is saved: it is
    then kept alive until backward even if the caller drops it.
    """
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if tensor.device.type != "meta" and storage.nbytes() > 0:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = forward()
    del outputs
    return {"bytes": sum(storages.values()), "tensors": len(storages)}


def peak_memory_bytes(device: torch.device, call) -> int | None:
    """Peak CUDA memory allocated by ``call()`` above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return peak
