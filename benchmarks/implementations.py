"""The implementations the harness compares, each behind one interface.

- ours: every backend of ``plif_cuda.plif_multistep`` (cpu, cuda, cupy: fused kernels;
  torch: the pure-PyTorch reference), called as the op alone.
- peers, each only when installed (otherwise reported as missing, never an error):
  ``compile``      the reference under ``torch.compile`` (dynamic shapes)
  ``spikingjelly`` SpikingJelly 2.x ``activation_based.neuron.ParametricLIFNode``, step_mode 'm',
                   on whatever path it picks for the device
  ``snntorch``     snnTorch ``Leaky(learn_beta=True)`` stepped over T (a simpler neuron:
                   no decay of the input, reset by subtraction; what snnTorch users run)

All of them get the same input, ``[T, C, N // C]`` with C = 64 channels, and a learnable tau
that starts at 2: one value per layer (``tau='layer'``) or one per channel (``tau='channel'``,
shape ``[C, 1]``).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

import plif_cuda
from plif_cuda import backends as plif_backends

CHANNELS = 64
FUSED_BACKENDS = ("cpu", "cuda", "cupy")
PEERS = ("compile", "spikingjelly", "snntorch")


@dataclass(frozen=True)
class Config:
    T: int
    N: int
    dtype: torch.dtype
    tau: str

    @property
    def step_shape(self) -> tuple[int, int]:
        if self.N % CHANNELS:
            raise ValueError(f"neuron counts must be multiples of {CHANNELS}, got {self.N}")
        return (CHANNELS, self.N // CHANNELS)

    @property
    def tau_shape(self) -> tuple[int, ...]:
        return () if self.tau == "layer" else (CHANNELS, 1)

    @property
    def tau_values(self) -> int:
        return 1 if self.tau == "layer" else CHANNELS


@dataclass
class Neuron:
    """One implementation instantiated for one configuration."""

    run: Callable[[torch.Tensor], torch.Tensor]  # x_seq -> spike_seq, differentiable
    params: list[torch.Tensor]  # the learnable tau tensors, gradient targets besides x_seq
    detail: str = ""


@dataclass
class Implementation:
    name: str
    kind: str  # "fused", "reference" or "peer"
    label: str
    missing: Callable[[torch.device], str | None]
    unsupported: Callable[[Config, torch.device], str | None]
    build: Callable[[Config, torch.device], Neuron]
    notes: str = ""
    setting: Callable[[], ContextManager] = contextlib.nullcontext  # held while it is measured

    @property
    def is_slow(self) -> bool:
        """Python time loops: their cost grows so fast that the default run caps their sizes."""
        return self.kind != "fused"


def _tau_parameter(config: Config, device: torch.device, value: float = 0.0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full(config.tau_shape, value, device=device))


def _supported_everywhere(config: Config, device: torch.device) -> str | None:
    return None


def _ours(backend: str) -> Implementation:
    def missing(device):
        return plif_backends.unavailable_reason(backend, device)

    def build(config, device):
        w = _tau_parameter(config, device)
        return Neuron(lambda x: plif_cuda.plif_multistep(x, w, backend=backend)[0], [w])

    kind = "reference" if backend == "torch" else "fused"
    label = "torch (reference)" if backend == "torch" else f"plif_cuda {backend}"
    return Implementation(backend, kind, label, missing, _supported_everywhere, build)


@contextlib.contextmanager
def _cpu_cache_off():
    previous = plif_cuda.ops.set_cpu_cache_limit(0)
    try:
        yield
    finally:
        plif_cuda.ops.set_cpu_cache_limit(previous)


def _ours_cpu_cache_off() -> Implementation:
    """The CPU op with its output cache off: every large output from torch's allocator."""
    cpu = _ours("cpu")
    return Implementation(
        "cpu-cache-off",
        "fused",
        "plif_cuda cpu, cache off",
        cpu.missing,
        cpu.unsupported,
        cpu.build,
        notes="as PLIF_CPU_CACHE_MB=0",
        setting=_cpu_cache_off,
    )


def _module_missing(module: str, hint: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # a peer that cannot import is missing, whatever the reason
        return f"{module} is not importable ({type(error).__name__}: {error}); {hint}"
    return None


def _compile_peer() -> Implementation:
    def missing(device):
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        return None

    def build(config, device):
        key = (config.T, config.dtype, config.tau, device.type)
        compiled = _compile_cache.get(key)
        if compiled is None:

            def reference_spikes(x, w):
                return plif_cuda.plif_multistep_ref(x, w)[0]

            compiled = torch.compile(reference_spikes, dynamic=True)
            _compile_cache[key] = compiled
        w = _tau_parameter(config, device)
        return Neuron(lambda x: compiled(x, w), [w], "inductor, dynamic=True")

    return Implementation(
        "compile",
        "peer",
        "torch.compile(reference)",
        missing,
        _supported_everywhere,
        build,
        notes="first call compiles (see first_call_s)",
    )


_compile_cache: dict = {}


def spikingjelly_path(device: torch.device) -> str:
    """Which implementation SpikingJelly's PLIF dispatch picked on ``device`` (best effort)."""
    if device.type == "cpu":
        return "CPU op: Python time loop"
    try:
        selection = importlib.import_module("spikingjelly._ops.plif")._selection
        chosen = {getattr(impl, "name", str(impl)) for impl in selection._selections.values()}
        return f"CUDA: {', '.join(sorted(chosen))}" if chosen else "CUDA: not yet selected"
    except Exception as error:
        return f"CUDA: path unknown ({type(error).__name__})"


def _spikingjelly_peer() -> Implementation:
    def missing(device):
        return _module_missing(
            "spikingjelly.activation_based.neuron",
            "pip install spikingjelly==2.0.0 (the harness needs only its neuron module)",
        )

    def unsupported(config, device):
        if config.tau != "layer":
            return "SpikingJelly's ParametricLIFNode has one tau per layer"
        return None

    def build(config, device):
        neuron = importlib.import_module("spikingjelly.activation_based.neuron")
        layer = neuron.ParametricLIFNode(init_tau=2.0, step_mode="m").to(device)

        def run(x):
            layer.reset()
            return layer(x)

        return Neuron(run, [layer.w], spikingjelly_path(device))

    return Implementation("spikingjelly", "peer", "SpikingJelly ParametricLIFNode", missing, unsupported, build)


def _snntorch_peer() -> Implementation:
    def missing(device):
        return _module_missing("snntorch", "pip install snntorch")

    def build(config, device):
        snntorch = importlib.import_module("snntorch")
        beta = torch.full(config.tau_shape, 0.5, device=device)  # decay 1 - 1/tau with tau = 2
        leaky = snntorch.Leaky(beta=beta, learn_beta=True).to(device)

        def run(x):
            mem = torch.zeros_like(x[0])
            spikes = []
            for x_t in x:
                spike, mem = leaky(x_t, mem)
                spikes.append(spike)
            return torch.stack(spikes)

        return Neuron(run, [leaky.beta], "Leaky stepped over T in Python")

    return Implementation(
        "snntorch",
        "peer",
        "snnTorch Leaky",
        missing,
        _supported_everywhere,
        build,
        notes="different neuron model: no input decay, subtractive reset",
    )


def implementations(device: torch.device, backends: list[str], peers: list[str]) -> list[Implementation]:
    """Ours first (the requested backends that fit ``device``), then the requested peers."""
    chosen = []
    for backend in backends:
        if backend in FUSED_BACKENDS or backend == "torch":
            if backend == "cpu" and device.type != "cpu":
                continue
            if backend in ("cuda", "cupy") and device.type != "cuda":
                continue
            chosen.append(_ours(backend))
            if backend == "cpu":
                chosen.append(_ours_cpu_cache_off())
        else:
            raise ValueError(f"--backends takes {FUSED_BACKENDS + ('torch',)}, got {backend!r}")
    makers = {"compile": _compile_peer, "spikingjelly": _spikingjelly_peer, "snntorch": _snntorch_peer}
    for peer in peers:
        if peer not in makers:
            raise ValueError(f"--peers takes {PEERS} or 'none', got {peer!r}")
        chosen.append(makers[peer]())
    return chosen
