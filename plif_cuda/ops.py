"""The fused ops' autograd formula, shared by every backend.

The compiled extension (``plif_cuda._C``) defines the ops, their argument checks and their
output shapes (Meta kernels, which torch.compile and fake tensors use), for CPU and CUDA
tensors: ``plif_cuda::multistep_forward`` and ``multistep_backward`` launch CUDA tensors' kernels
as nvcc built them into the extension, ``multistep_forward_nvrtc`` and
``multistep_backward_nvrtc`` the same kernels compiled at run time (``plif_cuda.cupy_backend``);
CPU tensors run the CPU kernel through either. So every backend is one op, and torch.compile,
autograd and opcheck treat them alike.

The forward takes the tensors ``x``, ``k``, ``v_init`` and, keyword-only, the neuron's
parameters and options (``v_threshold``, ``v_reset`` with None for a soft reset,
``decay_input``, ``detach_reset``, ``surrogate`` by name, ``alpha``, ``spiking``),
``store_v_seq`` and ``needs_backward``. With ``needs_backward`` the op decides what to keep for
the backward: every H (``h_seq`` has x's shape), or H's checkpoint rows (fewer rows than x has
steps), from which the backward recomputes H with x.

Op contract (arranged by ``plif_cuda.functional``): ``x`` is a ``[T, *S]`` tensor whose
steps ``x[t]`` are each contiguous, any distance apart (stride 0: one step broadcast over
time), read where they are; ``k`` and ``v_init`` are contiguous, in the compute dtype
(float64 for float64 inputs, float32 otherwise), and hold one value or one value per neuron
of ``S``. ``v_last``
(and so its gradient) is in the compute dtype as well: it is the state a layer carries into its
next call, which must not be rounded to a half dtype between calls. ``spikes``, ``v_seq`` and
``grad_x`` have ``x``'s dtype. The backward's ``grad_k`` and ``grad_v_init`` hold as many
values as ``k`` and ``v_init`` (none where ``needs_grad_k`` / ``needs_grad_v_init`` is False: then
the GPU kernels spend nothing on them): where one value serves every neuron, its gradient is the sum of
the neurons' shares, added in an order fixed by the shape (the CPU kernel sums per block of
neurons and adds the blocks in order), so its bits do not depend on the number of threads.
"""

from __future__ import annotations

import functools

import torch

from .reference import membrane_before_reset
from .surrogate import heaviside_with_surrogate, surrogate_derivative, surrogate_primitive

_EXTENSION_ERROR: str | None = None
try:
    from . import _C
except ImportError as error:
    _EXTENSION_ERROR = f"the compiled extension plif_cuda._C could not be imported ({error})"


def extension_available() -> bool:
    return _EXTENSION_ERROR is None


def extension_error() -> str | None:
    return _EXTENSION_ERROR


def extension_has_cuda() -> bool:
    """Whether the extension carries CUDA kernels compiled by nvcc (the NVRTC launcher needs none)."""
    return extension_available() and _C.HAS_COMPILED_CUDA_KERNELS


def save_mode(x: torch.Tensor, needs_grad: bool) -> int:
    """What the forward op keeps for a backward of ``x`` (``_C.SAVE_*``): the op's own rule."""
    return torch.ops.plif_cuda_internal.save_mode_for(x.dtype, needs_grad)


def checkpoint_rows(steps: int) -> int:
    """Rows of H a forward of ``steps`` steps keeps in checkpoint mode."""
    return _C.checkpoint_rows(steps)


def _setup_context(backward_op, ctx, inputs, keyword_only_inputs, output):
    x, k, v_init = inputs
    neuron = dict(keyword_only_inputs)
    store_v_seq = neuron.pop("store_v_seq")
    # plif_cuda_internal::multistep_forward_saving names what it keeps instead.
    saves = neuron.pop("needs_backward") if "needs_backward" in neuron else neuron.pop("save") != _C.SAVE_NOTHING
    if not saves:
        raise RuntimeError(
            "plif_cuda: the forward ran with needs_backward=False (nothing saved), so it cannot be "
            "differentiated; call it through plif_cuda.plif_multistep"
        )
    # Outputs nobody differentiates (h_seq always, often v_seq) then arrive as None instead of
    # freshly zero-filled [T, ...] tensors.
    ctx.set_materialize_grads(False)
    ctx.backward_op = backward_op
    ctx.neuron = neuron
    ctx.x_dtype = x.dtype
    ctx.store_v_seq = store_v_seq
    h_seq = output[3]
    if h_seq.shape[0] != x.shape[0]:
        # The op kept H's checkpoint rows, a means of the backward that nobody differentiates;
        # the backward recomputes H from them and x.
        ctx.mark_non_differentiable(h_seq)
        ctx.save_for_backward(h_seq, k, v_init, x)
    else:
        ctx.save_for_backward(h_seq, k, v_init, None)


# Values per row of the fixed-order sum below.
_SUM_ROW = 1024


def _fixed_order_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor in an order fixed by its length alone, as a float64 0-dim tensor.

    torch.sum to a single value splits the values among the intra-op threads, so its bits change
    with torch.set_num_threads. Here every reduction has several outputs, each summed by one
    thread, or fewer values than torch's parallel grain (32768): rows of _SUM_ROW values (the
    first level in the values' dtype, as fast as torch.sum; float64 above it), then the row sums
    and the tail the same way, until one row is left. On CUDA a reduction's order depends only
    on the shape and the GPU.
    """
    total = values
    while total.numel() > _SUM_ROW:
        whole = total.numel() // _SUM_ROW * _SUM_ROW
        row_sums = total[:whole].view(-1, _SUM_ROW).sum(dim=1).double()
        if whole < total.numel():
            row_sums = torch.cat([row_sums, total[whole:].sum().double().reshape(1)])
        total = row_sums
    return total.sum(dtype=torch.float64)


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient in ``like``'s shape: the op's already is (one value where ``like`` has one);
    the differentiable recurrence's is per neuron, summed here for a one-value ``like``."""
    if grad.numel() != like.numel():
        grad = _fixed_order_sum(grad)
    return grad.to(like.dtype).reshape(like.shape)


def _backward(ctx, grad_spikes, grad_v_last, grad_v_seq, grad_h_seq):
    h_seq, k, v_init, x = ctx.saved_tensors
    grad_v_seq = grad_v_seq if ctx.store_v_seq else None
    if torch.is_grad_enabled() or grad_h_seq is not None:
        # create_graph=True (a higher-order gradient will follow), or the second pass of
        # one: the fused backward op has no derivative of its own.
        if x is not None:
            # Every H, as a differentiable function of (x, k, v_init): the reference computes
            # the kernels' H in the kernels' order.
            h_seq = membrane_before_reset(x, k, v_init, **ctx.neuron)
        grad_x, grad_k, grad_v_init = _differentiable_backward(
            grad_spikes, grad_v_last, grad_v_seq, grad_h_seq, h_seq, k, v_init, x, **ctx.neuron
        )
        grad_x = grad_x.to(ctx.x_dtype)
    else:
        grad_x, grad_k, grad_v_init = ctx.backward_op(
            None if grad_spikes is None else grad_spikes.contiguous(),
            None if grad_v_last is None else grad_v_last.contiguous(),
            None if grad_v_seq is None else grad_v_seq.contiguous(),
            h_seq,
            x,
            k,
            v_init,
            x_dtype=ctx.x_dtype,
            **ctx.neuron,
            needs_grad_k=ctx.needs_input_grad[1],
            needs_grad_v_init=ctx.needs_input_grad[2],
        )
    # Gradients only for the inputs that need them: v_init is a constant for a fresh layer, and a
    # frozen tau needs nothing either. The neuron's options are keyword-only: no gradient slot.
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        _reduce_to(grad_k, k) if ctx.needs_input_grad[1] else None,
        _reduce_to(grad_v_init, v_init) if ctx.needs_input_grad[2] else None,
    )


def _differentiable_backward(
    grad_spikes,
    grad_v_last,
    grad_v_seq,
    grad_h_seq,
    h_seq,
    k,
    v_init,
    x,
    *,
    v_threshold,
    v_reset,
    decay_input,
    detach_reset,
    surrogate,
    alpha,
    spiking,
):
    """The spec's backward recurrence in torch ops, differentiable in every argument.

    dH[t]/dk = X[t] - (V[t-1] - V_r) is taken from ``x`` where the forward kept it (exact for
    every k), else from H alone as (H[t] - V[t-1]) / k, which equals it as a function of
    (X, k, v_init) once H is seen as the forward's output; a derivative taken through ``h_seq``
    reaches the forward op as ``grad_h_seq``, which this recurrence takes too. The spike is rebuilt from H with the
    reference's firing function, so that every further derivative is the reference
    autograd's (which applies the surrogate to every occurrence of the spike). Absent
    gradients contribute nothing (no zeros times a NaN slope). Returns per-neuron
    ``grad_k`` and ``grad_v_init``, as the backward op does.
    """
    soft_reset = v_reset is None
    v_r = 0.0 if soft_reset else v_reset

    grad_spikes, grad_v_last, grad_v_seq, grad_h_seq = (
        None if grad is None else grad.to(h_seq.dtype) for grad in (grad_spikes, grad_v_last, grad_v_seq, grad_h_seq)
    )

    centred = h_seq - v_threshold
    if spiking:
        spikes = heaviside_with_surrogate(centred, surrogate, alpha)
    else:
        spikes = surrogate_primitive(surrogate, alpha, centred)
    slope = surrogate_derivative(surrogate, alpha, centred)
    spikes_in_reset = spikes.detach() if detach_reset else spikes
    if soft_reset:
        v_seq = h_seq - spikes_in_reset * v_threshold
        reset_slope = torch.ones_like(h_seq) if detach_reset else 1.0 - v_threshold * slope
    else:
        v_seq = spikes_in_reset * v_r + (1.0 - spikes_in_reset) * h_seq
        reset_slope = 1.0 - spikes_in_reset
        if not detach_reset:
            reset_slope = reset_slope + (v_r - h_seq) * slope
    v_before = torch.cat([v_init.expand(h_seq.shape[1:]).unsqueeze(0), v_seq[:-1]])
    if not decay_input:
        h_slope_k = v_r - v_before
    elif x is not None:
        h_slope_k = x.to(h_seq.dtype) - (v_before - v_r)
    else:
        # Where k underflows to 0, H = V[t-1] and the slope is not recoverable, nor needed
        # (dk/dw = 0): dividing by 1 there keeps it 0, as the kernels do, instead of 0/0.
        h_slope_k = (h_seq - v_before) / torch.where(k == 0, torch.ones_like(k), k)

    steps = h_seq.shape[0]
    grad_h = [None] * steps
    # Gradient on V[t] from after step t: the last membrane's, then through H[t+1] (dH/dV = 1 - k).
    carried = grad_v_last
    for t in reversed(range(steps)):
        grad_v = _sum_present(None if grad_v_seq is None else grad_v_seq[t], carried)
        grad_h[t] = _sum_present(
            None if grad_v is None else grad_v * reset_slope[t],
            None if grad_spikes is None else grad_spikes[t] * slope[t],
            None if grad_h_seq is None else grad_h_seq[t],
        )
        carried = None if grad_h[t] is None else grad_h[t] * (1.0 - k)
    no_grad = h_seq.new_zeros(h_seq.shape[1:])
    grad_h = torch.stack([no_grad if g is None else g for g in grad_h]) if steps else torch.zeros_like(h_seq)
    grad_x = grad_h * k if decay_input else grad_h
    grad_k = (grad_h * h_slope_k).sum(0)
    grad_v_init = no_grad if carried is None else carried
    return grad_x, grad_k, grad_v_init


def _sum_present(*terms):
    present = [term for term in terms if term is not None]
    return sum(present[1:], present[0]) if present else None


def cpu_cache_bytes() -> int:
    """Bytes of released CPU output buffers the op keeps for reuse (0 without the extension)."""
    return _C.cpu_cache_bytes() if extension_available() else 0


def empty_cpu_cache() -> None:
    """Return the CPU op's cached output buffers to the system (see PLIF_CPU_CACHE_MB)."""
    if extension_available():
        _C.empty_cpu_cache()


def set_cpu_cache_limit(nbytes: int) -> int:
    """Cap the bytes the CPU op's buffer cache keeps (negative: no cap beyond the op's own peak;
    0: off, later outputs come from torch's allocator) and return the previous cap (-1: none)."""
    return _C.set_cpu_cache_limit(nbytes) if extension_available() else 0


if extension_available():
    # Each forward op with the backward op of its launcher; the tests' forward that names its
    # save mode with the nvcc one.
    for _forward, _backward_op in (
        ("plif_cuda::multistep_forward", torch.ops.plif_cuda.multistep_backward),
        ("plif_cuda::multistep_forward_nvrtc", torch.ops.plif_cuda.multistep_backward_nvrtc),
        ("plif_cuda_internal::multistep_forward_saving", torch.ops.plif_cuda.multistep_backward),
    ):
        torch.library.register_autograd(
            _forward, _backward, setup_context=functools.partial(_setup_context, _backward_op)
        )
