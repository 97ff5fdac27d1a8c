"""pytest's hooks and fixtures for the plif_cuda suite (the ``backend`` and ``device`` fixtures:
the one backend parametrisation), and the environment set before anything is imported; what the
tests share is in tests/helpers.py."""

from __future__ import annotations

import os
import sys

import pytest

# tests/test_spikingjelly_compat.py re-runs its SpikingJelly-free tests in a subprocess with this set: importing
# SpikingJelly then fails as it does where it is not installed.
if os.environ.get("PLIF_TEST_WITHOUT_SPIKINGJELLY") == "1":
    sys.modules["spikingjelly"] = None

# torch.compile's on-disk cache keys graphs by their code, not by the fake kernels of the custom
# ops in them: a graph compiled against an older plif_cuda would be reused with its old output
# shapes. The suite compiles into a cache of its own run (docs/autograd.md).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="plif_tests_inductor_")

import torch  # noqa: E402

from helpers import BACKEND_DEVICE, BACKENDS  # noqa: E402
from plif_cuda import backends as plif_backends  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu_emulation: the CUDA kernels compiled for the CPU and run under an emulated launch "
        "(tests/test_gpu_emulation.py)",
    )


@pytest.fixture(autouse=True)
def _fresh_backend_warnings():
    """The one-time fallback warnings are remembered per process; forget them between tests so
    that a test that expects one sees it."""
    plif_backends._warned.clear()
    yield
    plif_backends._warned.clear()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every fused backend (helpers.BACKENDS) for a test that takes ``backend``; a test's own
    ``parametrize("backend", ...)`` replaces the list."""
    return request.param


@pytest.fixture
def device(backend):
    """The device the test's backend runs on."""
    return torch.device(BACKEND_DEVICE[backend])
