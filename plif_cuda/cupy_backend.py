"""CuPy backend: the CUDA kernels of csrc/ compiled at run time through NVRTC, no build step.

``plif_cuda::multistep_forward_cupy`` and ``plif_cuda::multistep_backward_cupy`` have the schema
of the compiled extension's ops and share their fake kernels and autograd formula
(``ops.register_op_pair``). The kernels are compiled once per (dtype, architecture) by
``_nvrtc.compile_variant`` (the same build ``python -m plif_cuda doctor --nvrtc-arch`` checks),
loaded once per device by CuPy, and launched on PyTorch's current stream of the tensors' device.
A call never synchronises with the host, copies nothing to the device besides the kernel
arguments, and leaves the process's current device as it found it.
"""
from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from . import _nvrtc, ops
from .reference import compute_dtype
from .surrogate import SURROGATE_IDS

# The schemas of csrc/plif_ops.cpp under other names (tests/test_cupy.py checks they agree).
FORWARD_OP = "plif_cuda::multistep_forward_cupy"
BACKWARD_OP = "plif_cuda::multistep_backward_cupy"
_FORWARD_SCHEMA = (
    "multistep_forward_cupy(Tensor x, Tensor k, Tensor v_init, float v_threshold, float v_reset, "
    "bool soft_reset, bool decay_input, bool detach_reset, int surrogate, float alpha, bool spiking, "
    "bool store_v_seq, bool save_h) -> (Tensor spikes, Tensor v_last, Tensor v_seq, Tensor h_seq)"
)
_BACKWARD_SCHEMA = (
    "multistep_backward_cupy(Tensor? grad_spikes, Tensor? grad_v_last, Tensor? grad_v_seq, Tensor h_seq, "
    "Tensor k, Tensor v_init, ScalarType x_dtype, float v_threshold, float v_reset, bool soft_reset, "
    "bool decay_input, bool detach_reset, int surrogate, float alpha, bool spiking) "
    "-> (Tensor grad_x, Tensor grad_k, Tensor grad_v_init)"
)

# enum OptionFlags of csrc/plif_params.h.
_FLAG_SOFT_RESET = 1
_FLAG_DECAY_INPUT = 2
_FLAG_DETACH_RESET = 4
_FLAG_SPIKING = 8

# As the extension's launcher (csrc/plif_cuda.cu, plif::launch_blocks): one thread per neuron, the
# grid capped at the blocks of that kernel the device keeps resident; the kernels' grid-stride
# loops take the rest and pick their memory path from the grid they get.
_THREADS_PER_BLOCK = 256


@functools.cache
def unavailable_reason() -> str | None:
    """None when the CuPy backend can run, else a sentence saying why not."""
    try:
        import cupy  # noqa: F401
    except (ImportError, OSError) as error:
        return f"cupy is not installed or does not load ({error}); pip install 'plif_cuda[cupy]'"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        _nvrtc.kernel_source_dir()
        _nvrtc.cuda_include_dir()
    except FileNotFoundError as error:
        return str(error)
    return None


def forward_op():
    return torch.ops.plif_cuda.multistep_forward_cupy


# ---- argument checks: those of csrc/plif_ops.cpp, with the same messages ---------------------
def _fail(message: str):
    raise RuntimeError(message)


def _check_dtype(x_dtype: torch.dtype) -> None:
    if x_dtype not in _nvrtc.VARIANTS:
        _fail(f"x must be float16, bfloat16, float32 or float64, got {x_dtype}")


def _check_per_neuron(t: torch.Tensor, name: str, device: torch.device, x_dtype: torch.dtype, neurons: int) -> None:
    if t.device != device:
        _fail(f"{name} is on {t.device} but x is on {device}")
    acc = compute_dtype(x_dtype)
    if t.dtype != acc:
        _fail(f"{name} must have dtype {acc} for x of dtype {x_dtype}, got {t.dtype}")
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")
    if t.numel() not in (1, neurons):
        _fail(f"{name} must hold 1 or {neurons} values (one per neuron), got {t.numel()}")


def _check_seq(t: torch.Tensor, name: str, device: torch.device, shape, dtype: torch.dtype) -> None:
    if t.device != device:
        _fail(f"{name} is on {t.device} but expected {device}")
    if t.shape != shape:
        _fail(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        _fail(f"{name} must have dtype {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        _fail(f"{name} must be contiguous")


def _check_options(surrogate: int, spiking: bool) -> None:
    if not SURROGATE_IDS["sigmoid"] <= surrogate <= SURROGATE_IDS["erf"]:
        _fail(f"surrogate id out of range: {surrogate}")
    if not spiking and surrogate == SURROGATE_IDS["super_spike"]:
        _fail("super_spike has no primitive: spiking=False is unavailable")


def check_forward_args(x, k, v_init, surrogate, spiking) -> tuple[int, int]:
    """Check the forward op's arguments; return (T, N)."""
    if x.dim() < 1:
        _fail("x must have a time dimension")
    if not x.is_contiguous():
        _fail("x must be contiguous")
    _check_dtype(x.dtype)
    steps, neurons = x.shape[0], x.shape[1:].numel()
    _check_per_neuron(k, "k", x.device, x.dtype, neurons)
    _check_per_neuron(v_init, "v_init", x.device, x.dtype, neurons)
    _check_options(surrogate, spiking)
    return steps, neurons


def check_backward_args(grad_spikes, grad_v_last, grad_v_seq, h_seq, k, v_init, x_dtype, surrogate,
                        spiking) -> tuple[int, int]:
    """Check the backward op's arguments; return (T, N)."""
    _check_dtype(x_dtype)
    if h_seq.dim() < 1:
        _fail("h_seq must have a time dimension")
    if h_seq.dtype != compute_dtype(x_dtype):
        _fail(f"h_seq must have dtype {compute_dtype(x_dtype)}")
    if not h_seq.is_contiguous():
        _fail("h_seq must be contiguous")
    steps, neurons = h_seq.shape[0], h_seq.shape[1:].numel()
    _check_per_neuron(k, "k", h_seq.device, x_dtype, neurons)
    _check_per_neuron(v_init, "v_init", h_seq.device, x_dtype, neurons)
    for grad, name in ((grad_spikes, "grad_spikes"), (grad_v_seq, "grad_v_seq")):
        if grad is not None:
            _check_seq(grad, name, h_seq.device, h_seq.shape, x_dtype)
    if grad_v_last is not None and not (
        grad_v_last.numel() == neurons and grad_v_last.is_contiguous() and grad_v_last.dtype == h_seq.dtype
        and grad_v_last.device == h_seq.device
    ):
        _fail(f"grad_v_last must be a contiguous {h_seq.dtype} tensor of {neurons} values on {h_seq.device}")
    _check_options(surrogate, spiking)
    return steps, neurons


# ---- compiled kernels ----------------------------------------------------------------------------
_cache_lock = threading.Lock()
_images: dict[tuple[torch.dtype, str], _nvrtc.CompiledProgram] = {}
_kernels: dict[tuple[int, torch.dtype], dict] = {}


@functools.cache
def _binding():
    return _nvrtc.nvrtc_binding("cupy")


def _kernel_pair(device_index: int, dtype: torch.dtype):
    """{"forward": (function, resident blocks), "backward": ...}: CuPy functions for ``dtype`` on
    the device, compiled and loaded once. The caller has made the device current."""
    key = (device_index, dtype)
    pair = _kernels.get(key)
    if pair is not None:
        return pair
    with _cache_lock:
        pair = _kernels.get(key)
        if pair is None:
            import cupy

            arch = _nvrtc.runtime_arch(torch.cuda.get_device_capability(device_index), _binding().supported_archs())
            image = _images.get((dtype, arch))
            if image is None:
                image = _images[(dtype, arch)] = _nvrtc.compile_variant(dtype, arch, _binding())
            module = cupy.cuda.function.Module()
            module.load(bytes(image.image))
            forward_name, backward_name = _nvrtc.program(dtype)[1]
            from cupy_backends.cuda.api import driver

            multiprocessors = torch.cuda.get_device_properties(device_index).multi_processor_count
            pair = {}
            for direction, name in (("forward", forward_name), ("backward", backward_name)):
                function = module.get_function(image.lowered_names[name])
                per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(function.ptr, _THREADS_PER_BLOCK, 0)
                pair[direction] = (function, multiprocessors * max(1, per_sm))
            _kernels[key] = pair
    return pair


def _cupy_stream(torch_stream: torch.cuda.Stream):
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(torch_stream)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device_index)


def _launch(direction: str, device: torch.device, dtype: torch.dtype, neurons: int, args: tuple) -> None:
    # torch's guard restores the previous device without creating a context on it.
    with torch.cuda.device(device.index):
        kernel, resident_blocks = _kernel_pair(device.index, dtype)[direction]
        grid = max(1, min(-(-neurons // _THREADS_PER_BLOCK), resident_blocks))
        stream = _cupy_stream(torch.cuda.current_stream(device))
        kernel((grid,), (_THREADS_PER_BLOCK,), args, stream=stream)


def _pointer(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(t.data_ptr() if t is not None and t.numel() > 0 else 0)


def _scalar_args(x_dtype, neurons_k: int, neurons_v: int, steps: int, neurons: int, v_threshold, v_reset,
                 soft_reset, decay_input, detach_reset, surrogate, alpha, spiking) -> tuple:
    acc = np.float64 if x_dtype == torch.float64 else np.float32
    flags = ((_FLAG_SOFT_RESET if soft_reset else 0) | (_FLAG_DECAY_INPUT if decay_input else 0)
             | (_FLAG_DETACH_RESET if detach_reset else 0) | (_FLAG_SPIKING if spiking else 0))
    return (
        np.int64(0 if neurons_k == 1 else 1),
        np.int64(0 if neurons_v == 1 else 1),
        np.int64(steps),
        np.int64(neurons),
        acc(v_threshold),
        acc(0.0 if soft_reset else v_reset),
        acc(alpha),
        np.int32(surrogate),
        np.int32(flags),
    )


def _multistep_forward(x, k, v_init, v_threshold, v_reset, soft_reset, decay_input, detach_reset, surrogate,
                       alpha, spiking, store_v_seq, save_h):
    steps, neurons = check_forward_args(x, k, v_init, surrogate, spiking)
    acc = compute_dtype(x.dtype)
    spikes = torch.empty_like(x)
    v_last = x.new_empty(x.shape[1:], dtype=acc)
    v_seq = torch.empty_like(x) if store_v_seq else x.new_empty((0,))
    h_seq = x.new_empty(x.shape, dtype=acc) if save_h else x.new_empty((0,), dtype=acc)
    if neurons == 0:
        return spikes, v_last, v_seq, h_seq
    if steps == 0:
        v_last.copy_(v_init.reshape(-1).expand(neurons).view(v_last.shape))
        return spikes, v_last, v_seq, h_seq
    args = (
        _pointer(x), _pointer(k), _pointer(v_init), _pointer(spikes), _pointer(v_last), _pointer(v_seq),
        _pointer(h_seq),
    ) + _scalar_args(x.dtype, k.numel(), v_init.numel(), steps, neurons, v_threshold, v_reset, soft_reset,
                     decay_input, detach_reset, surrogate, alpha, spiking)
    _launch("forward", x.device, x.dtype, neurons, args)
    return spikes, v_last, v_seq, h_seq


def _multistep_backward(grad_spikes, grad_v_last, grad_v_seq, h_seq, k, v_init, x_dtype, v_threshold, v_reset,
                        soft_reset, decay_input, detach_reset, surrogate, alpha, spiking):
    steps, neurons = check_backward_args(grad_spikes, grad_v_last, grad_v_seq, h_seq, k, v_init, x_dtype,
                                         surrogate, spiking)
    grad_x = h_seq.new_empty(h_seq.shape, dtype=x_dtype)
    grad_k = h_seq.new_empty((neurons,))
    grad_v_init = h_seq.new_empty((neurons,))
    if neurons == 0:
        return grad_x, grad_k, grad_v_init
    if steps == 0:
        grad_k.zero_()
        if grad_v_last is not None:
            grad_v_init.copy_(grad_v_last.reshape(neurons))
        else:
            grad_v_init.zero_()
        return grad_x, grad_k, grad_v_init
    args = (
        _pointer(grad_spikes), _pointer(grad_v_last), _pointer(grad_v_seq), _pointer(h_seq), _pointer(k),
        _pointer(v_init), _pointer(grad_x), _pointer(grad_k), _pointer(grad_v_init),
    ) + _scalar_args(x_dtype, k.numel(), v_init.numel(), steps, neurons, v_threshold, v_reset, soft_reset,
                     decay_input, detach_reset, surrogate, alpha, spiking)
    _launch("backward", h_seq.device, x_dtype, neurons, args)
    return grad_x, grad_k, grad_v_init


_library = torch.library.Library("plif_cuda", "FRAGMENT")
_library.define(_FORWARD_SCHEMA)
_library.define(_BACKWARD_SCHEMA)
_library.impl("multistep_forward_cupy", _multistep_forward, "CUDA")
_library.impl("multistep_backward_cupy", _multistep_backward, "CUDA")
ops.register_op_pair(FORWARD_OP, BACKWARD_OP)
