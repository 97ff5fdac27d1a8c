"""The fused ops as torch.library ops: fake kernels and autograd, shared by every backend.

The compiled extension (``plif_cuda._C``) defines ``plif_cuda::multistep_forward`` and
``plif_cuda::multistep_backward`` with CPU and, when built with CUDA, CUDA kernels. The
CuPy backend (``plif_cuda.cupy_backend``) defines twins with the same schema under other
names and registers them through ``register_op_pair``, so that torch.compile, autograd and
opcheck treat every backend alike.

Op contract (arranged by ``plif_cuda.functional``): ``x`` is a contiguous ``[T, *S]``
tensor; ``k`` and ``v_init`` are contiguous, in the compute dtype (float64 for float64
inputs, float32 otherwise), and hold one value or one value per neuron of ``S``.
"""
from __future__ import annotations

import torch

from .reference import compute_dtype

_EXTENSION_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as error:
    _EXTENSION_ERROR = f"the compiled extension plif_cuda._C could not be imported ({error})"


def extension_available() -> bool:
    return _EXTENSION_ERROR is None


def extension_error() -> str | None:
    return _EXTENSION_ERROR


# Looked up once: backend selection runs inside torch.compile'd code, which should not trace
# into the dispatcher's registry.
_EXTENSION_HAS_CUDA = _EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "plif_cuda::multistep_forward", "CUDA"
)


def extension_has_cuda() -> bool:
    return _EXTENSION_HAS_CUDA


def _fake_forward(x, k, v_init, v_threshold, v_reset, soft_reset, decay_input, detach_reset, surrogate, alpha,
                  spiking, store_v_seq, save_h):
    acc = compute_dtype(x.dtype)
    spikes = x.new_empty(x.shape)
    v_last = x.new_empty(x.shape[1:])
    v_seq = x.new_empty(x.shape) if store_v_seq else x.new_empty((0,))
    h_seq = x.new_empty(x.shape, dtype=acc) if save_h else x.new_empty((0,), dtype=acc)
    return spikes, v_last, v_seq, h_seq


def _fake_backward(grad_spikes, grad_v_last, grad_v_seq, h_seq, k, v_init, x_dtype, v_threshold, v_reset,
                   soft_reset, decay_input, detach_reset, surrogate, alpha, spiking):
    neurons = h_seq.shape[1:].numel()
    return (
        h_seq.new_empty(h_seq.shape, dtype=x_dtype),
        h_seq.new_empty((neurons,)),
        h_seq.new_empty((neurons,)),
    )


def _setup_context(ctx, inputs, output):
    x, k, v_init, *options, store_v_seq, save_h = inputs
    if not save_h:
        raise RuntimeError(
            "plif_cuda: the forward ran with save_h=False, so it cannot be differentiated; "
            "call it through plif_cuda.plif_multistep"
        )
    # Outputs nobody differentiates (h_seq always, often v_seq) then arrive as None instead of
    # freshly zero-filled [T, ...] tensors.
    ctx.set_materialize_grads(False)
    ctx.options = tuple(options)
    ctx.x_dtype = x.dtype
    ctx.store_v_seq = store_v_seq
    ctx.save_for_backward(output[3], k, v_init)


def _reduce_to(grad_per_neuron: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # torch.sum has a fixed reduction order: the result is bitwise reproducible.
    if like.numel() == 1:
        return grad_per_neuron.sum().reshape(like.shape)
    return grad_per_neuron.reshape(like.shape)


def _make_backward(backward_op):
    def backward(ctx, grad_spikes, grad_v_last, grad_v_seq, grad_h_seq):
        h_seq, k, v_init = ctx.saved_tensors
        grad_x, grad_k, grad_v_init = backward_op(
            None if grad_spikes is None else grad_spikes.contiguous(),
            None if grad_v_last is None else grad_v_last.contiguous(),
            grad_v_seq.contiguous() if ctx.store_v_seq and grad_v_seq is not None else None,
            h_seq,
            k,
            v_init,
            ctx.x_dtype,
            *ctx.options,
        )
        return (grad_x, _reduce_to(grad_k, k), _reduce_to(grad_v_init, v_init)) + (None,) * 10

    return backward


def register_op_pair(forward_name: str, backward_name: str) -> None:
    """Give a forward/backward op pair its fake kernels and autograd formula."""
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(backward_name)(_fake_backward)
    backward_op = getattr(getattr(torch.ops, backward_name.split("::")[0]), backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, _make_backward(backward_op), setup_context=_setup_context)


def cpu_cache_bytes() -> int:
    """Bytes of released CPU output buffers the op keeps for reuse (0 without the extension)."""
    return torch.ops.plif_cuda.cpu_cache_bytes() if extension_available() else 0


def empty_cpu_cache() -> None:
    """Return the CPU op's cached output buffers to the system (see PLIF_CPU_CACHE_MB)."""
    if extension_available():
        torch.ops.plif_cuda.empty_cpu_cache()


def set_cpu_cache_limit(nbytes: int) -> int:
    """Cap the bytes the CPU op's buffer cache keeps (negative: no cap beyond the op's own peak;
    0: off, later outputs come from torch's allocator) and return the previous cap (-1: none)."""
    return torch.ops.plif_cuda.set_cpu_cache_limit(nbytes) if extension_available() else 0


if extension_available():
    register_op_pair("plif_cuda::multistep_forward", "plif_cuda::multistep_backward")
