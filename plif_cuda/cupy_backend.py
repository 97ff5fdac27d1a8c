"""CuPy backend: the CUDA kernels of csrc/ compiled at run time through NVRTC, no build step.

This is a launcher only. The ops are the extension's ``plif_cuda::multistep_forward_nvrtc`` (and
backward), the twins of ``multistep_forward`` with the same schema: their checks, outputs and
autograd are the compiled backend's, and for CUDA tensors they hand the kernel's arguments to
``plif_cuda_internal::nvrtc_launch_forward`` (and backward), which importing this module
implements; an extension built without a CUDA toolkit has them.
The kernels are compiled once per (dtype, architecture) by ``_nvrtc.compile_variant`` (the same
build ``python -m plif_cuda doctor --nvrtc-arch`` checks), loaded once per device by CuPy, and
launched on PyTorch's current stream of the tensors' device.
A call never synchronises with the host, copies nothing to the device besides the kernel
arguments, and leaves the process's current device as it found it.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from . import _nvrtc, ops

if ops.extension_available():
    from ._C import THREADS_PER_BLOCK, backward_shape, forward_shape


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


# ---- compiled kernels ----------------------------------------------------------------------------
_cache_lock = threading.Lock()
_images: dict[tuple[torch.dtype, str], _nvrtc.CompiledProgram] = {}
_kernels: dict[tuple[int, torch.dtype], dict] = {}


@functools.cache
def _binding():
    return _nvrtc.nvrtc_binding("cupy")


def _kernel_pair(device_index: int, dtype: torch.dtype):
    """{"forward": (function, resident blocks), "backward": ..., ...} (_nvrtc.kernel_names): CuPy
    functions for ``dtype`` on the device, compiled and loaded once. The caller has made the
    device current."""
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
            from cupy_backends.cuda.api import driver

            multiprocessors = torch.cuda.get_device_properties(device_index).multi_processor_count
            pair = {}
            for direction, name in _nvrtc.kernel_names(dtype).items():
                function = module.get_function(image.lowered_names[name])
                per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(function.ptr, THREADS_PER_BLOCK, 0)
                pair[direction] = (function, multiprocessors * per_sm)
            _kernels[key] = pair
    return pair


class _StreamHandle:
    """A torch stream's pointer under the CUDA stream protocol, which torch implements only from
    2.10 on: CuPy 14 takes external streams through that protocol alone (ExternalStream is
    deprecated there), older CuPy only as an ExternalStream."""

    def __init__(self, pointer: int):
        self.pointer = pointer

    def __cuda_stream__(self):
        return (0, self.pointer)


def _cupy_stream(torch_stream: torch.cuda.Stream):
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(torch_stream.cuda_stream))
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device_index)


def _launch(direction: str, dtype: torch.dtype, pointers, scalars) -> int:
    # The op's device guard has made the tensors' device current (and restores the previous one).
    device_index = torch.cuda.current_device()
    kernel, resident_blocks = _kernel_pair(device_index, dtype)[direction]
    acc = np.float64 if dtype == torch.float64 else np.float32
    addresses = tuple(0 if t is None else t.data_ptr() for t in pointers)
    # The launch shape of the nvcc launcher too (csrc/plif_launch.h). scalars: k_stride,
    # v_init_stride, T, N, x_step, ..., flags; the memory path the shape picks joins the flags.
    T, N, x_step, flags = (*scalars[2:5], scalars[-1])
    if direction == "forward":
        x, _, _, spikes, _, v_seq, h_seq = addresses
        grid, path_flag = forward_shape(T, N, x_step, dtype.itemsize, flags, resident_blocks, x, spikes, v_seq, h_seq)
    else:
        grad_spikes, _, grad_v_seq, _, x, _, _, grad_x = addresses[:8]
        grid, path_flag = backward_shape(
            N, x_step, dtype.itemsize, flags, resident_blocks, x, grad_spikes, grad_v_seq, grad_x
        )
    scalars = (*scalars[:-1], flags | path_flag)
    args = tuple(np.uint64(a) for a in addresses) + tuple(
        convert(value) for convert, value in zip(_scalar_types(acc), scalars, strict=True)
    )
    stream = _cupy_stream(torch.cuda.current_stream(device_index))
    kernel((grid,), (THREADS_PER_BLOCK,), args, stream=stream)
    return grid


def _scalar_types(acc) -> tuple:
    """C types of the kernels' scalar block (with_scalar_arguments in csrc/plif_params.h):
    k_stride, v_init_stride, T, N, x_step, v_threshold, v_reset, alpha, surrogate, flags."""
    return (np.int64,) * 5 + (acc,) * 3 + (np.int32,) * 2


# The NVRTC launcher ops of csrc/plif_ops.cpp: the calling op has checked the arguments, allocated the
# outputs and handled T = 0 and N = 0; these receive the kernel's arguments as the nvcc launcher
# passes them (tensors where it passes pointers, None for null) and launch.
def _launch_forward(x, k, v_init, spikes, v_last, v_seq, h_seq, *scalars):
    _launch("forward", x.dtype, (x, k, v_init, spikes, v_last, v_seq, h_seq), scalars)


def _launch_backward(*arguments):
    # The kernel's twelve pointers (grad_x, grad_k, grad_v_init and the two rows of per-block
    # partials last), then its scalar block.
    pointers, scalars = arguments[:12], arguments[12:]
    grad_x, grad_k, grad_v_init, k_partials, v_partials = pointers[7:]
    blocks = _launch("backward", grad_x.dtype, pointers, scalars)
    if k_partials is not None or v_partials is not None:
        # The fixed-order finish of a shared k's (v_init's) sums, as the nvcc launcher runs it.
        device_index = torch.cuda.current_device()
        finish, _ = _kernel_pair(device_index, grad_x.dtype)["finish_shares"]
        finish_arguments = tuple(
            np.uint64(0 if t is None else t.data_ptr()) for t in (k_partials, v_partials, grad_k, grad_v_init)
        )
        stream = _cupy_stream(torch.cuda.current_stream(device_index))
        finish((1,), (1,), (*finish_arguments, np.int64(blocks)), stream=stream)


if ops.extension_available():
    torch.library.impl("plif_cuda_internal::nvrtc_launch_forward", "CUDA", func=_launch_forward)
    torch.library.impl("plif_cuda_internal::nvrtc_launch_backward", "CUDA", func=_launch_backward)
