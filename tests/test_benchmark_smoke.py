"""The benchmark harness runs end to end in a tiny configuration and writes its three files.

No timing is asserted: this checks the plumbing (rows for every backend and pass, the byte
model, the saved-tensor count, missing peers reported as missing, the files of a run cut short,
the kernel-only timing's capture and replay logic under a stand-in for torch.cuda), not
performance.
"""

import json
import math
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from helpers import REPO_ROOT, command_line, load_script, run_python


def benchmark_command(**options) -> list[str]:
    """benchmarks/run.py and its arguments."""
    return [str(REPO_ROOT / "benchmarks" / "run.py"), *command_line(**options)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    completed = run_python(
        *benchmark_command(quick=True, devices="cpu", peers="spikingjelly,snntorch", out=out, name="smoke")
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return out, json.loads((out / "smoke.json").read_text()), completed.stdout


def test_writes_json_markdown_and_png(quick_run):
    out, result, _ = quick_run
    assert result["complete"] is True
    assert (out / "smoke.md").read_text().startswith("# plif_cuda benchmark")
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))
    env = result["environment"]
    for key in (
        "torch",
        "cpu_model",
        "torch_threads",
        "gpu",
        "malloc_environment",
        "malloc_tuned",
        "last_level_cache_bytes",
        "last_level_cache_level",
    ):
        assert key in env
    markdown = (out / "smoke.md").read_text()
    assert env["cpu_model"] in markdown
    if env["last_level_cache_bytes"]:
        # The CPU's last-level cache is named, and the tiny case (one call: well under 1 MiB) is
        # marked as possibly running from it.
        assert f"L{env['last_level_cache_level']} {env['last_level_cache_bytes'] / 2**20:.0f} MiB" in markdown
        assert "| 2^12\u2020 |" in markdown
    assert result["copy_bandwidth"]["cpu"]["gbps"] > 0


def test_every_pass_of_the_fused_backend_and_the_reference_is_measured(quick_run):
    _, result, _ = quick_run
    import plif_cuda

    expected = {"torch"} | ({"cpu"} if "cpu" in plif_cuda.available_backends("cpu") else set())
    for impl in expected:
        rows = {r["pass"]: r for r in result["rows"] if r["impl"] == impl}
        assert set(rows) == {"fwd", "bwd", "fwdbwd"}
        for row in rows.values():
            assert row["status"] == "ok", row
            assert row["samples"] >= 1 and row["median_ms"] > 0
            assert row["T"] == 4 and row["neurons"] == 4096 and row["dtype"] == "fp32"
    fwdbwd = next(r for r in result["rows"] if r["impl"] == "torch" and r["pass"] == "fwdbwd")
    # forward: x in, spikes out (4 B each per neuron-step; no checkpoint row at T=4), v_last out,
    # k and v_init in; backward on the CPU: grad_spikes and x in, grad_x out, k and v_init in,
    # their gradients out.
    assert fwdbwd["traffic_bytes"] == 4 * 4096 * 8 + 4096 * 4 + 8 + 4 * 4096 * 12 + 16
    # CPU rows have no kernel-only figure (nothing to separate from the host's work).
    assert not any("kernel_median_ms" in r for r in result["rows"])


def test_fused_backend_saves_only_h(quick_run):
    _, result, _ = quick_run
    fused = [r for r in result["rows"] if r["impl"] == "cpu" and r["status"] == "ok"]
    if not fused:
        pytest.fail("the compiled extension is not built: python setup.py build_ext --inplace")
    # H in float32, one value per neuron-step, plus the one-value k and v_init.
    assert fused[0]["saved_bytes_per_neuron_step"] == pytest.approx(4.0, abs=0.01)


def test_peers_are_measured_or_reported_missing(quick_run):
    _, result, stdout = quick_run
    for peer in ("spikingjelly", "snntorch"):
        rows = [r for r in result["rows"] if r["impl"] == peer]
        assert rows, f"no rows for {peer}"
        assert {r["status"] for r in rows} <= {"ok", "missing"}
        if rows[0]["status"] == "missing":
            assert rows[0]["reason"]
    assert "Training step" in stdout
    assert {r["layer"] for r in result["network"]} >= {"plif_cuda (auto)", "plif_cuda backend='torch'"}


def test_fused_passes_are_rated_against_the_copies_timed_next_to_them(quick_run):
    """The copy bandwidth moves between minutes on a shared machine: each fused backend's passes
    carry the copies timed right before and after them, and their fraction uses the higher one
    (the table's "copy GB/s" column shows it)."""
    out, result, _ = quick_run
    fused = [r for r in result["rows"] if r["kind"] == "fused" and r["status"] == "ok"]
    if not fused:
        pytest.fail("the compiled extension is not built: python setup.py build_ext --inplace")
    for row in fused:
        adjacent = max(row["copy_gbps_before"], row["copy_gbps_after"])
        assert row["copy_gbps"] == adjacent > 0
        assert row["copy_fraction"] == pytest.approx(row["gbps"] / adjacent)
        assert 1 <= row["copy_attempts"] <= 3
    # Peers keep the run's first copy; they are not rated in the table.
    reference = next(r for r in result["rows"] if r["impl"] == "torch" and r["status"] == "ok")
    assert "copy_gbps_before" not in reference
    assert reference["copy_gbps"] == result["copy_bandwidth"]["cpu"]["gbps"]
    assert "| copy GB/s |" in (out / "smoke.md").read_text()


def _load_harness(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # where run.py, run as a script, finds its modules
    return load_script("benchmarks/run.py")


@pytest.mark.parametrize(
    "copies, attempts",
    [((42.0, 75.0, 74.0, 76.0), 2), ((45.0, 46.0), 1), ((42.0, 75.0, 75.0, 41.0, 44.0, 76.0), 3)],
    ids=("changed-then-steady", "steady", "never-steady"),
)
def test_a_case_whose_copies_disagree_is_timed_again(copies, attempts, monkeypatch):
    """A case during which the machine changed state (its copies 42 and 75 GB/s) is timed again,
    at most COPY_ATTEMPTS times; the last attempt's passes are rated against their own copies."""
    run = _load_harness(monkeypatch)
    pending = iter(copies)
    measured = []

    def measure_into(rows):
        measured.append(len(measured))
        rows.append({"pass": "fwdbwd", "status": "ok", "gbps": 30.0 + len(measured)})

    case_rows: list[dict] = []
    run.time_between_copies(measure_into, lambda: next(pending), lambda message: None, case_rows)
    assert len(measured) == attempts and next(pending, None) is None
    (row,) = case_rows
    before, after = copies[2 * attempts - 2], copies[2 * attempts - 1]
    assert row["copy_attempts"] == attempts and row["gbps"] == 30.0 + attempts
    assert (row["copy_gbps_before"], row["copy_gbps_after"]) == (before, after)
    assert row["copy_fraction"] == pytest.approx(row["gbps"] / max(before, after))


def test_a_run_cut_short_leaves_valid_files_with_the_cases_it_finished(tmp_path):
    """The JSON is rewritten after every case: killed right after its first case, the run leaves a
    valid file with that case's rows, marked incomplete."""
    process = subprocess.Popen(
        [sys.executable, *benchmark_command(quick=True, devices="cpu", peers="none", out=tmp_path, name="cut")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = tmp_path / "cut.json"
    deadline = time.monotonic() + 300
    try:
        while not path.exists():
            assert process.poll() is None, f"the run ended without writing {path.name}: {process.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no case finished in 300 s"
            time.sleep(0.02)
        first = json.loads(path.read_text())
        running_after_first_case = process.poll() is None
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert running_after_first_case
    assert first["complete"] is False
    (impl,) = {r["impl"] for r in first["rows"]}
    assert {(r["pass"], r["status"]) for r in first["rows"]} == {("fwd", "ok"), ("bwd", "ok"), ("fwdbwd", "ok")}
    assert first["copy_bandwidth"]["cpu"]["gbps"] > 0
    killed = json.loads(path.read_text())
    assert killed["complete"] is False and len(killed["rows"]) >= len(first["rows"])
    assert (tmp_path / "cut.md").read_text().startswith("# plif_cuda benchmark")
    assert not (tmp_path / "cut.png").exists()


def test_dry_run_plans_cuda_cases_without_a_gpu(tmp_path, monkeypatch):
    """--dry-run goes as far as the first call on the device: the plan with each pass's bytes, the
    implementations' availability and the (empty, incomplete) result files; a missing peer that
    was asked for fails it."""
    command = benchmark_command(
        dry_run=True,
        devices="cuda",
        backends="cuda",
        T=8,
        neurons="2^16,2^24",
        dtypes="fp32,bf16",
        tau="layer",
        no_network=True,
        kernel_only="on",
        out=tmp_path,
        name="dry",
    )
    done = run_python(*command, "--peers", "none", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import torch

    import traffic

    bf16_bytes = traffic.pass_traffic("fwd", 8, 1 << 24, torch.bfloat16).total
    assert f"grid: T=8 N={1 << 24} bf16 tau per layer: fwd {bf16_bytes / 1e6:.1f} MB" in done.stdout
    assert "cuda: plif_cuda cuda: " in done.stdout
    result = json.loads((tmp_path / "dry.json").read_text())
    assert result["complete"] is False and result["rows"] == [] and result["arguments"]["dry_run"] is True
    assert (tmp_path / "dry.md").exists()
    shadow = tmp_path / "shadow" / "snntorch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('shadowed by the test')\n")
    missing_peer = run_python(*command, "--peers", "snntorch", timeout=300, PYTHONPATH=str(shadow.parent))
    assert missing_peer.returncode == 1, missing_peer.stdout[-3000:] + missing_peer.stderr[-3000:]
    assert "requested peers are missing" in missing_peer.stderr and "shadowed by the test" in missing_peer.stderr


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


class _FakeEvent:
    def __init__(self, cuda):
        self.cuda, self.at = cuda, None

    def record(self):
        self.at = self.cuda.clock_ms

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.at - self.at


class _FakeGraph:
    def __init__(self, cuda):
        self.cuda, self.captured = cuda, False

    def replay(self):
        assert self.captured and not self.cuda.capturing
        self.cuda.clock_ms += self.cuda.replay_ms
        self.cuda.log.append(("replay",))


class _FakeCuda:
    """Stands in for torch.cuda: tracks the current stream and the capture; a replay of a
    captured graph advances a clock that the events read by ``replay_ms``."""

    def __init__(self, replay_ms):
        self.replay_ms, self.clock_ms, self.capturing, self.log = replay_ms, 0.0, False, []
        self.default = _FakeStream("default", self.log)
        self.current = self.default

    def Stream(self, device):
        return _FakeStream("side", self.log)

    def current_stream(self, device):
        return self.current

    @contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def CUDAGraph(self):
        return _FakeGraph(self)

    @contextmanager
    def graph(self, graph, stream):
        with self.stream(stream):
            self.capturing = True
            yield
            self.capturing = False
        graph.captured = True

    def Event(self, enable_timing):
        assert enable_timing
        return _FakeEvent(self)


def _cpu_neuron_and_buffers(run_module, buffers):
    import torch

    import implementations as impls

    config = impls.Config(9, 2 * impls.CHANNELS, torch.float32, "layer")
    neuron = impls._ours("cpu").build(config, torch.device("cpu"))
    return neuron, run_module.Buffers(config, torch.device("cpu"), buffers)


@pytest.mark.parametrize("pass_name", ("fwd", "bwd", "fwdbwd"))
def test_kernel_only_timing_captures_one_round_and_times_replays_alone(pass_name, monkeypatch):
    """measure_kernels under a stand-in for torch.cuda, around the harness's own passes of the CPU
    op: every forward a backward needs runs on the capture stream before the capture, warm-up
    rounds run there too, one round is captured, and the figure is replay time per call, with no
    Python call during the replays. The backward pass runs again on one prepared forward: it keeps
    the autograd graph (retain_graph)."""
    run = _load_harness(monkeypatch)
    import timing

    buffers = 3
    neuron, rotated = _cpu_neuron_and_buffers(run, buffers)
    cuda = _FakeCuda(replay_ms=0.3)
    prepare, run_pass = run.pass_functions(pass_name, neuron, rotated, retain_graph=True)
    calls = []

    def logged_prepare(i):
        calls.append(("prepare", cuda.current.name, cuda.capturing))
        return prepare(i)

    def logged_run(state):
        calls.append(("run", cuda.current.name, cuda.capturing))
        return run_pass(state)

    result = timing.measure_kernels(logged_prepare, logged_run, buffers, "cuda", samples=4, cuda=cuda)
    rounds = timing.CAPTURE_WARMUP_ROUNDS
    assert calls == (
        [("prepare", "side", False)] * buffers
        + [("run", "side", False)] * buffers * rounds
        + [("run", "side", True)] * buffers
    )
    assert cuda.log[0] == ("wait", "side", "default") and cuda.log[-1] == ("replay",)
    assert ("wait", "default", "side") in cuda.log
    replays = math.ceil(timing.KERNEL_SAMPLE_MS / 0.3)
    assert result.replays_per_sample == replays
    assert cuda.log.count(("replay",)) == 1 + 4 * replays
    assert result.timing.samples_ms == pytest.approx([0.3 / buffers] * 4)
    fields = result.as_dict()
    assert fields["kernel_calls_per_sample"] == replays * buffers and fields["kernel_samples"] == 4


def test_a_second_backward_without_retain_graph_fails(monkeypatch):
    """Why the kernel-only passes keep the graph: replaying a backward needs its forward's graph."""
    run = _load_harness(monkeypatch)
    neuron, rotated = _cpu_neuron_and_buffers(run, 1)
    prepare, run_pass = run.pass_functions("bwd", neuron, rotated)
    state = prepare(0)
    run_pass(state)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        run_pass(state)


def test_replays_per_sample_fill_the_sample_time_within_the_cap(monkeypatch):
    _load_harness(monkeypatch)  # puts benchmarks/ on the path
    import timing

    for one_replay_ms, expected in (
        (0.001, timing.MAX_REPLAYS_PER_SAMPLE),
        (0.0, timing.MAX_REPLAYS_PER_SAMPLE),
        (2.0, math.ceil(timing.KERNEL_SAMPLE_MS / 2.0)),
        (50.0, 1),
    ):
        counts = []

        def time_replays(replay, count):
            counts.append(count)
            return one_replay_ms * count

        result = timing.replay_samples(lambda: None, time_replays, calls_per_replay=2, samples=3)
        assert counts == [1] + [expected] * 3 and result.replays_per_sample == expected
        assert result.timing.median_ms == pytest.approx(one_replay_ms / 2)
    with pytest.raises(ValueError, match="calls_per_replay"):
        timing.replay_samples(lambda: None, lambda replay, count: 1.0, calls_per_replay=0, samples=3)


def test_kernel_only_fields_rate_the_figure_and_keep_a_failed_capture(monkeypatch):
    """The harness's CUDA-only step with measure_kernels stood in for: GB/s and % of copy from the
    kernel-only median, a failing capture recorded in the row, and nothing on CPU, for peers or
    with --kernel-only off."""
    run = _load_harness(monkeypatch)
    import argparse

    import torch

    import timing

    fused, peer = argparse.Namespace(kind="fused"), argparse.Namespace(kind="peer")
    on, off = argparse.Namespace(kernel_only="on", repeats=3), argparse.Namespace(kernel_only="off", repeats=3)
    cuda = torch.device("cuda")
    monkeypatch.setattr(run, "pass_functions", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(
        run,
        "measure_kernels",
        lambda prepare, run_pass, n, device, samples: timing.KernelTiming(
            timing.Timing([0.5, 0.25, 1.0][:samples]), calls_per_replay=n, replays_per_sample=10
        ),
    )
    fields = run.kernel_only_fields(on, fused, None, [0, 1], cuda, "fwd", 2 * 10**9, 1000.0)
    assert fields["kernel_median_ms"] == 0.5 and fields["kernel_calls_per_sample"] == 20
    assert fields["kernel_gbps"] == pytest.approx(4000.0) and fields["kernel_copy_fraction"] == pytest.approx(4.0)
    for args, impl, device in ((off, fused, cuda), (on, peer, cuda), (on, fused, torch.device("cpu"))):
        assert run.kernel_only_fields(args, impl, None, [0], device, "fwd", 1, 1.0) == {}

    def failing(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(run, "measure_kernels", failing)
    assert run.kernel_only_fields(on, fused, None, [0], cuda, "bwd", 1, 1.0) == {
        "kernel_error": "RuntimeError: operation not permitted when stream is capturing"
    }


def test_the_table_shows_the_fastest_kernel_only_figure(monkeypatch):
    _load_harness(monkeypatch)
    import report

    base = {
        "device": "cuda",
        "suite": "grid",
        "T": 8,
        "neurons": 1 << 20,
        "dtype": "fp32",
        "tau": "layer",
        "pass": "fwd",
        "status": "ok",
        "kind": "fused",
        "traffic_bytes": 1,
        "gbps": 100.0,
        "copy_gbps": 1000.0,
        "copy_fraction": 0.1,
        "saved_bytes_per_neuron_step": 4.0,
    }
    rows = [
        {
            **base,
            "impl": "cuda",
            "label": "plif_cuda cuda",
            "median_ms": 0.09,
            "kernel_median_ms": 0.03,
            "kernel_copy_fraction": 0.8,
        },
        {**base, "impl": "cupy", "label": "plif_cuda cupy", "median_ms": 0.08, "kernel_error": "RuntimeError: x"},
    ]
    result = {"rows": rows, "copy_bandwidth": {"cuda": {}}}
    header, _, line = report.op_table(result, ["cuda", "cupy"], {"cuda": "cuda", "cupy": "cupy"})
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    assert cells["kernel-only ms"] == "0.03" and cells["kernel-only % of copy"] == "80%"
    assert cells["cuda ms"] == "0.09" and cells["% of copy"] == "10%"
    failed, _, failed_line = report.op_table({**result, "rows": [rows[1]]}, ["cupy"], {"cupy": "cupy"})
    assert dict(zip(failed.split("|"), failed_line.split("|")))[" kernel-only ms "].strip() == "failed"
