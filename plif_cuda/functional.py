"""``plif_multistep``: the one public entry point for the PLIF math.

It checks every argument (errors name the argument), arranges the layout the kernels
expect, picks the backend and calls the op. The kernels read ``[T, N]``: each time step one
dense block of N values, the steps any distance apart. The step dimensions of ``x_seq`` are
permuted into their memory order (largest stride first) and the op works on that view, whose
outputs are permuted back. An input whose every step is then dense runs without a copy: the
op reads the caller's storage. That covers contiguous and channels-last inputs, permuted step
dims, one step broadcast over time (``y.expand(T, ...)``, time stride 0), every k-th step
(``x[::k]``) and slices of time or of a wider tensor that leave each step dense. Its outputs
are dense, time outermost, with the step dims in the input's memory order. Any other input
(steps with gaps, or time not outermost) is copied once into that order, and its outputs
have the step dims in the input's order.
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import torch
from torch.autograd import forward_ad

from . import backends
from .reference import compute_dtype, reference_multistep, state_tensors
from .surrogate import HAS_PRIMITIVE, in_functorch_transform, resolve_surrogate

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float_scalar(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float{' or None' if allow_none else ''}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_neuron_options(options: dict) -> dict:
    """The neuron's options (``plif_multistep``'s keyword arguments, by name) checked, errors naming
    the argument: a copy with the numbers as floats and the surrogate's default alpha filled in."""
    checked = dict(options)
    checked["v_threshold"] = _check_float_scalar(options["v_threshold"], "v_threshold")
    checked["v_reset"] = _check_float_scalar(options["v_reset"], "v_reset", allow_none=True)
    checked["surrogate"], checked["alpha"] = resolve_surrogate(options["surrogate"], options["alpha"])
    if not options["spiking"] and checked["surrogate"] not in HAS_PRIMITIVE:
        surrogate = checked["surrogate"]
        raise ValueError(f"surrogate {surrogate!r} has no closed-form primitive, so spiking=False is not available")
    for flag_name in ("decay_input", "detach_reset", "store_v_seq", "spiking"):
        if flag_name in options and not isinstance(options[flag_name], bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(options[flag_name]).__name__}")
    return checked


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` unchanged (torch.broadcast_shapes(shape, target) ==
    target), without that Python reference implementation's cost on every layer call."""
    if len(shape) > len(target):
        return False
    return all(size in (1, wanted) for size, wanted in zip(reversed(shape), reversed(target)))


def _check_tensor_arg(t, name: str, x_seq: torch.Tensor, step_shape: torch.Size) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != x_seq.device:
        raise ValueError(f"{name} is on {t.device} but x_seq is on {x_seq.device}")
    if not _broadcasts_to(t.shape, step_shape):
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast against one time step of x_seq, "
            f"shape {tuple(step_shape)}"
        )
    return t


def _steps_contiguous(x: torch.Tensor) -> bool:
    """Whether every step ``x[t]`` is contiguous (size-1 dims anywhere), whatever the time
    stride: the layout the op reads in place (csrc/plif_ops.cpp checks the same)."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _to_op_layout(x_seq: torch.Tensor):
    """Return (x in the op's layout, the permutation of the step dims that it applies)."""
    steps = range(x_seq.dim() - 1)
    # Size-1 dims carry no offset; they go last so that ties in stride cannot misorder.
    order = sorted(steps, key=lambda d: (x_seq.shape[d + 1] == 1, -x_seq.stride(d + 1)))
    # No view (and no autograd node to walk back) where the order is already the op's.
    x_op = x_seq if order == sorted(order) else x_seq.permute([0] + [d + 1 for d in order])
    return (x_op if _steps_contiguous(x_op) else x_op.contiguous()), order


def _per_neuron(t: torch.Tensor, step_shape, order, dtype) -> torch.Tensor:
    """A per-step tensor as the op takes it: one value, or one per neuron in memory order."""
    t = t.to(dtype)
    if t.numel() == 1:
        return t  # the op takes any contiguous one-value tensor
    return t.expand(step_shape).permute(order).contiguous()


def _inverse(order):
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return inverse


def _needs_reference_autodiff(*tensors: torch.Tensor) -> bool:
    """True inside a torch.func transform, or when an input carries a forward-mode AD tangent.
    A torch.library op's autograd formula supports neither (a tangent would be dropped without
    an error); the reference's autograd supports both."""
    if in_functorch_transform():
        return True
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def multistep_keeping_state(
    x_seq: torch.Tensor,
    w,
    v_init=None,
    *,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: float | None = None,
    store_v_seq: bool = False,
    spiking: bool = True,
    backend: str = "auto",
):
    """Multi-step PLIF neuron over all T time steps.

    Args:
        x_seq: input current ``[T, *S]`` (time first), float16/bfloat16/float32/float64.
        w: the tau parameter, ``k = sigmoid(w) = 1/tau``: a 0-dim tensor (per layer) or any
            shape that broadcasts against ``S`` (per channel ``[C, 1, 1]``, per neuron ...).
            A Python float is taken as a constant (plain LIF).
        v_init: membrane before the first step: None (``v_reset``, or 0 for soft reset), a
            float, or a tensor broadcastable to ``S``.
        v_threshold, v_reset: firing threshold; reset value (None: soft reset, subtract threshold).
        decay_input: charge ``H = V + k (X - (V - V_r))`` (True) or ``H = V - k (V - V_r) + X``.
        detach_reset: treat the spike as a constant inside the reset when differentiating.
        surrogate, alpha: surrogate gradient name and its alpha (None: that surrogate's default).
        store_v_seq: also return the post-reset membrane sequence ``V[0..T-1]``.
        spiking: False replaces the step by the surrogate's primitive (a smooth neuron).
        backend: "auto", "cpu", "cuda", "cupy" or "torch" (the reference).

    Returns:
        ``(spike_seq [T, *S], v_last [*S], v_seq [T, *S] or None)`` in ``x_seq``'s dtype.
        Half inputs are computed in float32. (``multistep_keeping_state``, which the layers call,
        leaves ``v_last`` in that compute dtype: the membrane they carry into their next call.)
    """
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"x_seq must be a tensor, got {type(x_seq).__name__}")
    if x_seq.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x_seq must be float16, bfloat16, float32 or float64, got dtype {x_seq.dtype}")
    if x_seq.dim() < 1:
        raise ValueError("x_seq must have a time dimension first: shape [T, ...], got a 0-dim tensor")
    step_shape = x_seq.shape[1:]
    options = check_neuron_options(
        dict(
            v_threshold=v_threshold,
            v_reset=v_reset,
            decay_input=decay_input,
            detach_reset=detach_reset,
            surrogate=surrogate,
            alpha=alpha,
            spiking=spiking,
            store_v_seq=store_v_seq,
        )
    )

    acc = compute_dtype(x_seq.dtype)
    w, v_init = state_tensors(w, v_init, options["v_reset"], acc, x_seq.device)
    w = _check_tensor_arg(w, "w", x_seq, step_shape)
    v_init = _check_tensor_arg(v_init, "v_init", x_seq, step_shape)
    k = torch.sigmoid(w).to(acc)

    chosen = backends.select(backend, x_seq)
    if chosen != "torch" and _needs_reference_autodiff(x_seq, k, v_init):
        chosen = "torch"
    if chosen == "torch":
        return reference_multistep(x_seq, k, v_init.to(acc), **options)

    x_op, order = _to_op_layout(x_seq)
    k_op = _per_neuron(k, step_shape, order, acc)
    v_init_op = _per_neuron(v_init, step_shape, order, acc)
    spikes, v_last, v_seq, _ = backends.forward_op(chosen)(
        x_op,
        k_op,
        v_init_op,
        **options,
        needs_backward=torch.is_grad_enabled()
        and (x_seq.requires_grad or k_op.requires_grad or v_init_op.requires_grad),
    )
    if order == sorted(order):
        return spikes, v_last, v_seq if store_v_seq else None
    back = [0] + [d + 1 for d in _inverse(order)]
    spike_seq = spikes.permute(back)
    v_last = v_last.permute(_inverse(order))
    return spike_seq, v_last, v_seq.permute(back) if store_v_seq else None


@functools.wraps(multistep_keeping_state, assigned=("__doc__", "__annotations__"))
def plif_multistep(*args, **kwargs):
    spike_seq, v_last, v_seq = multistep_keeping_state(*args, **kwargs)
    return spike_seq, v_last.to(spike_seq.dtype), v_seq
