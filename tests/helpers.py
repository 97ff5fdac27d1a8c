"""What the tests share: scripts and fresh interpreters, SpikingJelly when installed, the dtypes,
surrogates and the neuron's option combinations, tolerances, backends, awkward inputs, losses.

Imported by the test files (`from helpers import ...`); tests/conftest.py holds only pytest's hooks
and fixtures (the backend parametrisation) and the environment set before anything is imported.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from plif_cuda import _nvrtc
from plif_cuda import backends as plif_backends
from plif_cuda.surrogate import resolve_surrogate

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- processes and scripts ----------------------------------------------------------------------
def run_python(*args: str, cwd: Path = REPO_ROOT, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` in a new interpreter (from the repository root unless ``cwd``), ``env`` added
    to the environment; its output captured as text."""
    environment = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def printed_by_fresh_interpreter(code: str, **env: str) -> str:
    """What ``python -c code`` prints in a new interpreter: for what a process reads once
    (environment variables at import, the CPU op's output cache) or must not share with the test
    process."""
    done = run_python("-c", code, timeout=300, **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (``examples/train.py``, ``.ci/check_cuda_build.py``, ...)
    imported as a module from its file."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"plif_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command_line(**options) -> list[str]:
    """A script's arguments: ``--name value`` per option (underscores become dashes), ``--name``
    alone for an option set to True."""
    arguments = []
    for name, value in options.items():
        arguments.append("--" + name.replace("_", "-"))
        if value is not True:
            arguments.append(str(value))
    return arguments


def train_tiny_network(dataset: str, out_dir: Path, **options) -> dict:
    """examples/train.py for one epoch of a tiny network on one thread, with no progress bar;
    ``options`` (``data_dir``, ``epochs``, ...) add to or override its arguments. Returns the last
    metrics row."""
    tiny = dict(epochs=1, T=3, width=4, fc_width=8, threads=1, no_progress=True)
    arguments = command_line(dataset=dataset, out_dir=out_dir, **{**tiny, **options})
    return load_script("examples/train.py").main(arguments)


# ---- SpikingJelly -------------------------------------------------------------------------------
# SpikingJelly's modules, or None where it is not installed (or hidden: conftest.py).
try:
    from spikingjelly.activation_based import base as sj_base
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly.activation_based import surrogate as sj_surrogate
except ImportError:
    sj_base = sj_neuron = sj_surrogate = None
HAVE_SPIKINGJELLY = sj_base is not None
needs_spikingjelly = pytest.mark.skipif(not HAVE_SPIKINGJELLY, reason="SpikingJelly is not installed")


def assert_passes_without_spikingjelly(test_file: str) -> None:
    """Runs ``test_file``'s SpikingJelly-free tests in a new pytest process where SpikingJelly cannot
    be imported (conftest.py reads PLIF_TEST_WITHOUT_SPIKINGJELLY): all must run, and pass. It runs
    from the repository root, so that it imports this checkout's plif_cuda."""
    selection = "not test_sj_ and not test_without_spikingjelly and not cuda and not cupy"
    result = run_python(
        *("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(test_file), "-k", selection),
        PLIF_TEST_WITHOUT_SPIKINGJELLY="1",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


# ---- dtypes, surrogates, options ----------------------------------------------------------------
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SURROGATES = ("sigmoid", "atan", "piecewise_quadratic", "piecewise_exp", "soft_sign", "super_spike", "erf")
SMOOTH_SURROGATES = tuple(s for s in SURROGATES if s != "super_spike")
# The neuron's option combinations as keyword arguments, written once: every reset (hard to 0, hard
# to -0.3 under a threshold of 0.7, soft) with and without decay_input and detach_reset.
RESETS = {"hard0": dict(v_reset=0.0), "hard-0.3": dict(v_reset=-0.3, v_threshold=0.7), "soft": dict(v_reset=None)}
NEURON_OPTIONS = [
    pytest.param(
        {**reset, "decay_input": decay_input, "detach_reset": detach_reset},
        id=f"{name}-{'decay' if decay_input else 'nodecay'}-{'detach' if detach_reset else 'attached'}",
    )
    for name, reset in RESETS.items()
    for decay_input in (True, False)
    for detach_reset in (False, True)
]
# One combination by its id ("soft-nodecay-detach"), for tests that need a particular one.
NEURON_OPTION = {param.id: param.values[0] for param in NEURON_OPTIONS}
# (surrogate, spiking) pairs: every surrogate spiking, and smooth where it has a primitive.
SURROGATE_CASES = [
    pytest.param(name, spiking, id=f"{name}-{'spiking' if spiking else 'smooth'}")
    for name in SURROGATES
    for spiking in (True, False)
    if spiking or name in SMOOTH_SURROGATES
]


def op_options(
    v_threshold=1.0, v_reset=0.0, decay_input=True, detach_reset=False, surrogate="sigmoid", alpha=None, spiking=True
) -> dict:
    """The ops' neuron options for plif_multistep's keyword arguments, as plif_cuda.functional
    passes them (floats, the surrogate's name, its alpha; None is its default)."""
    name, alpha = resolve_surrogate(surrogate, alpha)
    return dict(
        v_threshold=float(v_threshold),
        v_reset=None if v_reset is None else float(v_reset),
        decay_input=decay_input,
        detach_reset=detach_reset,
        surrogate=name,
        alpha=alpha,
        spiking=spiking,
    )


# (rtol, atol) per dtype: half results differ from the reference's on the same half input by the
# outputs' final rounding, about one unit in the last place (2^-10 fp16, 2^-7 bf16).
MEMBRANE_TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Gradients sum the reverse-time recursion in another order than autograd's and recover dH/dk from
# H and V[t-1] (X is not kept): a little cancellation in float32.
GRAD_TOLERANCE = {
    torch.float64: (1e-10, 1e-11),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_membrane_close(actual, expected, dtype=None):
    rtol, atol = MEMBRANE_TOLERANCE[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def assert_grad_close(actual, expected, dtype, summed_terms: int = 1):
    """Compare gradients; ``summed_terms`` is how many per-neuron-step terms one entry sums
    (the w gradient of a 0-dim w sums over every neuron and step), which scales the
    absolute tolerance by the square root of that count (random rounding errors add up so)."""
    rtol, atol = GRAD_TOLERANCE[dtype]
    atol = atol * max(1.0, summed_terms**0.5)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


# ---- backends -----------------------------------------------------------------------------------
def _cuda_skip_reason(backend: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return plif_backends.unavailable_reason(backend, torch.device("cuda"))


BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda", "cupy": "cuda"}

# The fused backends under test, each with the device it runs on. "cpu" never skips.
BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(
            _cuda_skip_reason("cuda") is not None, reason=f"cuda backend: {_cuda_skip_reason('cuda')}"
        ),
    ),
    pytest.param(
        "cupy",
        id="cupy",
        marks=pytest.mark.skipif(
            _cuda_skip_reason("cupy") is not None, reason=f"cupy backend: {_cuda_skip_reason('cupy')}"
        ),
    ),
]
# The two launchers of the op for CUDA tensors.
GPU_BACKENDS = BACKENDS[1:]


# ---- inputs -------------------------------------------------------------------------------------
# Odd neuron counts per step, each below one CPU block (1024 neurons): the tail path of the walk.
AWKWARD_STEP_SHAPES = [(1,), (5, 7), (3, 67), (2, 3, 11)]
TIME_STEPS = (1, 3, 17)


def make_seq(shape, dtype=torch.float32, device="cpu", layout="contiguous", seed=0, scale=1.5, shift=0.4):
    """Random input current ``[T, *S]``, drawn in float64 and rounded to ``dtype``.

    layout:
      "contiguous"     plain row-major
      "sliced"         a strided view: every other element of a larger tensor along the last
                       dim and a slice of the time dim (not a permutation of a dense tensor)
      "transposed"     the last two step dims swapped (dense but permuted)
      "channels_last"     [T, C, H, W] laid out channels-last (T in the batch position)
      "channels_last_3d"  [T, C, D, H, W] laid out channels-last-3d
      "seq_channels_last" [T, N, C, H, W] viewed from a channels-last [T*N, C, H, W] tensor, as a
                          conv layer applied to the flattened sequence produces it
    """
    generator = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        data = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif layout == "sliced":
        big = torch.randn((shape[0] + 2, *shape[1:-1], 2 * shape[-1] + 1), generator=generator, dtype=torch.float64)
        data = big[1:-1, ..., 1::2]
    elif layout == "transposed":
        swapped = (*shape[:-2], shape[-1], shape[-2])
        data = torch.randn(swapped, generator=generator, dtype=torch.float64).transpose(-1, -2)
    elif layout == "channels_last":
        data = torch.randn(shape, generator=generator, dtype=torch.float64)
        data = data.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        data = torch.randn(shape, generator=generator, dtype=torch.float64)
        data = data.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "seq_channels_last":
        t, n, c, h, w = shape
        data = torch.randn((t * n, c, h, w), generator=generator, dtype=torch.float64)
        data = data.contiguous(memory_format=torch.channels_last).view(t, n, c, h, w)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    # Same strides as ``data`` (empty_like would densify a sliced view), kept through the
    # affine map and the dtype cast by writing in place.
    out = torch.empty_strided(data.shape, data.stride(), dtype=dtype, device=device)
    out.copy_(data * scale + shift)
    assert tuple(out.shape) == tuple(shape)
    return out


def distance_to_threshold(x_seq, w, v_init, v_reset, decay_input=True, v_threshold=1.0):
    """Smallest |H - V_th| over every neuron and step, recomputed in float64 with the spec's
    formulas: inputs with a margin cannot flip a spike through rounding differences."""
    x_seq = x_seq.detach().double()
    k = torch.sigmoid(w.detach().double()) if isinstance(w, torch.Tensor) else torch.sigmoid(torch.tensor(float(w)))
    v_r = 0.0 if v_reset is None else v_reset
    v = (
        v_init.detach().double()
        if isinstance(v_init, torch.Tensor)
        else torch.tensor(v_r if v_init is None else v_init)
    )
    margin = float("inf")
    for x in x_seq:
        h = v + k * (x - (v - v_r)) if decay_input else v - k * (v - v_r) + x
        margin = min(margin, (h - v_threshold).abs().min().item())
        s = (h >= v_threshold).double()
        v = h - s * v_threshold if v_reset is None else s * v_r + (1 - s) * h
    return margin


def random_weights_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device=t.device, dtype=t.dtype)


def outputs_loss(spike_seq, v_last, v_seq, seed=1234):
    """A scalar that depends on every output with random weights, so that every gradient path
    (through the spikes, the last membrane and the stored sequence) is exercised."""
    loss = (spike_seq * random_weights_like(spike_seq, seed)).sum()
    loss = loss + (v_last * random_weights_like(v_last, seed + 1)).sum()
    if v_seq is not None:
        loss = loss + (v_seq * random_weights_like(v_seq, seed + 2)).sum()
    return loss


def strided_leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with ``t``'s values and exactly its strides (a sliced view stays sliced)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    leaf.copy_(t.detach())
    return leaf.requires_grad_()


def run_with_grads(fn, x_seq, w, v_init, x_view=None, **kwargs):
    """Call ``fn(x, w, v_init, **kwargs)`` on fresh leaves; return outputs and gradients.

    ``x_view`` maps the leaf to the tensor passed as ``x_seq`` (e.g. an expand), for inputs whose
    layout a leaf cannot have."""
    x_leaf = strided_leaf(x_seq)
    w_leaf = w.detach().clone().requires_grad_() if isinstance(w, torch.Tensor) else w
    v_leaf = v_init.detach().clone().requires_grad_() if isinstance(v_init, torch.Tensor) else v_init
    spike_seq, v_last, v_seq = fn(x_leaf if x_view is None else x_view(x_leaf), w_leaf, v_leaf, **kwargs)
    outputs_loss(spike_seq, v_last, v_seq).backward()
    grads = {"x": x_leaf.grad}
    if isinstance(w_leaf, torch.Tensor):
        grads["w"] = w_leaf.grad
    if isinstance(v_leaf, torch.Tensor):
        grads["v_init"] = v_leaf.grad
    return (spike_seq, v_last, v_seq), grads


def _half_header_dir() -> Path | None:
    """A CUDA include folder whose half headers compile on the host: cuda_fp16.h needs the
    toolkit's crt/host_defines.h, which the CUDA runtime wheels lack."""
    candidates = [Path(os.environ[var]) / "include" for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    candidates.append(Path("/usr/local/cuda/include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    try:
        candidates.append(_nvrtc.cuda_include_dir())
    except FileNotFoundError:
        pass
    for folder in candidates:
        if (folder / "cuda_fp16.h").is_file() and (folder / "crt" / "host_defines.h").is_file():
            return folder
    return None


def build_emulation_library(tmp_path_factory, source: Path) -> ctypes.CDLL:
    """An emulated launch (``source``, under tests/gpu_emulation) built with the kernels of csrc/ by
    the host compiler into a shared library, named by the sources' digest. Skips where there is no
    compiler or no CUDA half headers (fails instead under PLIF_REQUIRE_GPU_EMULATION=1)."""
    include = _half_header_dir()
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    missing = None if include else "no CUDA toolkit include folder with cuda_fp16.h and crt/host_defines.h"
    if compiler is None:
        missing = "no host C++ compiler (g++ or $CXX)"
    if missing:
        if os.environ.get("PLIF_REQUIRE_GPU_EMULATION") == "1":
            pytest.fail(f"the GPU emulation cannot be built: {missing}")
        pytest.skip(f"the GPU emulation cannot be built: {missing}")
    sources = sorted((REPO_ROOT / "csrc").glob("*.h")) + sorted((REPO_ROOT / "csrc").glob("*.cuh"))
    sources += sorted(source.parent.glob("*.h")) + [source]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    library = tmp_path_factory.mktemp(source.stem) / f"{source.stem}_{digest}.so"
    command = [compiler, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", f"-I{REPO_ROOT / 'csrc'}"]
    command += [f"-I{include}", str(source), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"
    return ctypes.CDLL(str(library))
