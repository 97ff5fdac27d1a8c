"""benchmarks/gpu_check.sh without a GPU: its dry run (every phase up to its first GPU call, on
the extension built in place) must pass, return what the device tool brings back (at most 8
files, no folders) and run the phases in the order that makes a cut run useful; a run cut by
its budget must still leave its summary and archive."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import REPO_ROOT

PHASES = ["build-check", "smoke", "kernels", "benchmark", "bn", "anchors", "gpu-tests", "memcheck", "initcheck"]
DEVICE_RETURNS_FILES = 8


def dry_run(out: Path, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    environment.pop("OUT", None)
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )


def summary(out: Path) -> dict[str, str]:
    rows = [line.split(None, 1) for line in (out / "summary.txt").read_text().splitlines()]
    return {name: rest.rsplit(None, 1)[0].strip() for name, rest in rows}


@pytest.fixture(scope="module")
def full_dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    return dry_run(out), out


def test_every_phase_passes_up_to_its_first_gpu_call(full_dry_run):
    done, out = full_dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = summary(out)
    assert [name for name in verdicts if name in PHASES] == PHASES, "phases missing or out of order"
    assert all(verdicts[name] == "passed" for name in PHASES), verdicts
    assert verdicts["total"] == "passed"


def test_what_comes_back_fits_the_device_tool(full_dry_run):
    _, out = full_dry_run
    entries = list(out.iterdir())
    assert all(entry.is_file() for entry in entries), "the device returns files two levels down at most"
    assert len(entries) <= DEVICE_RETURNS_FILES, sorted(entry.name for entry in entries)
    assert {"summary.txt", "environment.txt", "results.tar.gz", "kernels.json", "benchmark.json"} <= {
        entry.name for entry in entries
    }
    with tarfile.open(out / "results.tar.gz") as archive:
        logged = {Path(name).name for name in archive.getnames()}
    assert {f"{phase}.log" for phase in PHASES} <= logged


def test_the_gpu_tests_phase_runs_the_cuda_tests_but_not_the_nvrtc_builds(full_dry_run):
    """tests/test_cupy.py builds every NVRTC variant on the CPU (minutes): CI runs it, not the GPU phase."""
    _, out = full_dry_run
    with tarfile.open(out / "results.tar.gz") as archive:
        collected = archive.extractfile("./gpu-tests.log").read().decode()
    assert "tests/test_cuda.py::" in collected
    assert "test_cupy.py" not in collected


def test_a_spent_budget_skips_the_rest_and_still_packs(tmp_path):
    done = dry_run(tmp_path, GPU_CHECK_BUDGET_S="3")
    assert done.returncode == 1
    verdicts = summary(tmp_path)
    assert all(verdicts[name] == "SKIPPED (budget spent)" for name in PHASES), verdicts
    assert verdicts["total"] == "FAILED"
    assert (tmp_path / "results.tar.gz").stat().st_size > 0


@pytest.mark.parametrize(
    "script, arguments",
    [("gpu_smoke.py", []), ("gpu_sanitizer_launches.py", []), ("anchors.py", []), ("bn_plif.py", ["--device", "cuda"])],
)
def test_each_gpu_script_finds_the_package_of_its_tree_by_itself(script, arguments, tmp_path):
    """compute-sanitizer starts them as plain scripts: no PYTHONPATH, another working directory."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--dry-run", *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "everything before the first GPU call ran" in done.stdout
