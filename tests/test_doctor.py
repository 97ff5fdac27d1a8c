"""`available_backends` and `python -m plif_cuda doctor`: a backend is listed for a device only
where it can run, and the doctor says what was built and why something cannot run."""

from __future__ import annotations

import re

import pytest
import torch

import plif_cuda
from helpers import run_python
from plif_cuda import backends
from plif_cuda.__main__ import built_cuda_code, cuda_code_for

GPU_BACKENDS = ("cuda", "cupy", "torch")


def run_doctor(*args, **env):
    return run_python("-m", "plif_cuda", "doctor", *args, **env)


def test_no_backend_runs_on_a_gpu_torch_cannot_see(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plif_cuda.available_backends("cuda") == []
    assert plif_cuda.available_backends("cuda:1") == []
    for backend in GPU_BACKENDS:
        reason = backends.unavailable_reason(backend, torch.device("cuda"))
        assert reason, backend
    assert "no CUDA device" in backends.unavailable_reason("torch", torch.device("cuda"))
    # CPU and meta tensors (shapes, torch.compile's fake tensors) are unaffected.
    assert "torch" in plif_cuda.available_backends("cpu")
    assert backends.unavailable_reason("torch", torch.device("meta")) is None
    assert backends.select("auto", torch.empty(2, 3, device="meta")) in ("cpu", "torch")


def test_the_reference_runs_on_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "torch" in plif_cuda.available_backends("cuda")
    assert "cpu" not in plif_cuda.available_backends("cuda")


def test_available_backends_on_this_machine():
    available = plif_cuda.available_backends("cuda")
    if torch.cuda.is_available():
        assert "torch" in available
    else:
        assert available == [], "no GPU is visible, yet backends claim to run on one"
    assert plif_cuda.available_backends("cpu")[-1] == "torch"


def test_the_library_carries_its_build_information():
    """setup.py hands the build information to the compiler; the library reports it, and the
    doctor prints it."""
    from plif_cuda import _C

    assert _C.TORCH_VERSION == torch.__version__, "the library was built against another torch"
    assert (_C.CUDA_SKIPPED_BECAUSE is None) == _C.HAS_COMPILED_CUDA_KERNELS
    assert (_C.CUDA_ARCHS != "") == _C.HAS_COMPILED_CUDA_KERNELS
    out = run_doctor(CUDA_VISIBLE_DEVICES="").stdout
    assert f"built against torch {_C.TORCH_VERSION}" in out
    if _C.CUDA_SKIPPED_BECAUSE:
        assert f"CUDA kernels not built because {_C.CUDA_SKIPPED_BECAUSE}" in out


def test_doctor_without_a_visible_gpu_says_why_nothing_runs_on_cuda():
    result = run_doctor(CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "no CUDA device visible to torch" in out
    for backend in GPU_BACKENDS:
        line = re.search(rf"^\s+cuda\s+{backend}\s+(.*)$", out, re.MULTILINE)
        assert line and line[1].startswith("unavailable: "), f"cuda {backend}: {line and line[0]}"
    assert re.search(r"^\s+cuda\s+torch\s+unavailable: torch sees no CUDA device", out, re.MULTILINE)
    assert re.search(r"^\s+cpu\s+torch\s+available$", out, re.MULTILINE)
    extension = re.search(r"^extension\s+(.*)$", out, re.MULTILINE)[1]
    assert (
        extension.startswith("CPU kernels only (CUDA kernels not built because ")
        or re.match(r"CPU kernels, and CUDA kernels for sm_\d+", extension)
        or extension.startswith("not available")
    ), extension


def test_doctor_refuses_a_malformed_nvrtc_arch_and_names_the_accepted_forms():
    result = run_doctor("--nvrtc-arch", "90")
    assert result.returncode == 2
    assert "--nvrtc-arch" in result.stderr and "sm_XX" in result.stderr and "compute_XX" in result.stderr
    assert "'90'" in result.stderr
    assert "NVRTC compile" not in result.stdout


def test_built_cuda_code_reads_the_arch_list():
    assert built_cuda_code("8.0;8.6;8.9;9.0+PTX") == ([(8, 0), (8, 6), (8, 9), (9, 0)], [(9, 0)])
    assert built_cuda_code("7.5 8.0+PTX") == ([(7, 5), (8, 0)], [(8, 0)])


@pytest.mark.parametrize(
    "capability, expected",
    [
        ((9, 0), "sm_90 code"),
        ((8, 7), "sm_86 code"),  # a cubin runs on later minor versions of its major architecture
        ((8, 0), "sm_80 code"),
        ((10, 0), "compute_90 PTX"),  # newer GPUs compile the PTX
        ((7, 5), None),  # older than everything built
    ],
)
def test_cuda_code_for_a_gpu(capability, expected):
    code = cuda_code_for(capability, "8.0;8.6;8.9;9.0+PTX")
    if expected is None:
        assert code is None
    else:
        assert code.startswith(expected)


def test_without_ptx_a_newer_gpu_runs_nothing():
    assert cuda_code_for((10, 0), "8.0;9.0") is None
