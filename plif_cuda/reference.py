"""The executable spec: a plain PyTorch time loop whose gradients come from autograd.

Every fused kernel is tested against ``plif_multistep_ref``. It is written to be read,
not to be fast; the arithmetic order here is the order the kernels reproduce
(see ``csrc/plif_math.h``), so spikes match bit for bit.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .surrogate import heaviside_with_surrogate, surrogate_primitive


def w_for_tau(tau: float) -> float:
    """The ``w`` with ``k = sigmoid(w) = 1/tau``: ``-log(tau - 1)`` (tau > 1)."""
    return -math.log(tau - 1.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half inputs are computed in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def state_tensors(w, v_init, v_reset, dtype: torch.dtype, device):
    """``w`` and ``v_init`` with Python numbers made 0-dim tensors of ``dtype`` on ``device``, and
    ``v_init`` None made the reset value (0 for soft reset); anything else is returned as it is."""
    if v_init is None:
        v_init = 0.0 if v_reset is None else v_reset
    # torch.full, a device-side fill: torch.tensor would copy from the host and synchronise,
    # which a CUDA graph capture forbids.
    return tuple(
        torch.full((), float(value), dtype=dtype, device=device)
        if isinstance(value, Real) and not isinstance(value, bool)
        else value
        for value in (w, v_init)
    )


def plif_multistep_ref(x_seq: torch.Tensor, w, v_init=None, **options):
    """Reference multi-step PLIF: ``plif_multistep``'s arguments (but ``backend``) and results.

    A drop-in comparator for ``plif_cuda.plif_multistep``: ``w`` is the tau parameter
    (``k = sigmoid(w)``), a tensor or a float; ``v_init`` None (``v_reset``, or 0 for soft
    reset), a float or a tensor broadcastable to one step; ``alpha`` None takes the surrogate's
    default. Returns ``(spike_seq [T, *S], v_last [*S], v_seq [T, *S] or None)`` in ``x_seq``'s
    dtype, computed in ``compute_dtype(x_seq.dtype)``. It is ``plif_multistep`` with
    ``backend="torch"``: the same argument checks, then ``reference_multistep``.
    """
    from .functional import plif_multistep

    return plif_multistep(x_seq, w, v_init, backend="torch", **options)


def _firing_function(surrogate: str, alpha: float, spiking: bool):
    """``fire(H - V_th)``: the spike with the surrogate's derivative, or the smooth primitive."""
    if spiking:

        def fire(centred):
            return heaviside_with_surrogate(centred, surrogate, alpha)
    else:

        def fire(centred):
            return surrogate_primitive(surrogate, alpha, centred)

    return fire


def reference_multistep(
    x_seq: torch.Tensor,
    k: torch.Tensor,
    v_init: torch.Tensor,
    *,
    surrogate: str,
    alpha: float,
    spiking: bool,
    **loop_options,
):
    """The reference on the fused op's terms (what ``backend="torch"`` runs): ``plif_time_loop``
    firing through the surrogate ``(surrogate, alpha, spiking)``; ``loop_options`` are the loop's
    (``v_threshold``, ``v_reset``, ``decay_input``, ``detach_reset``, ``store_v_seq``, ``h_rows``).

    Shapes:
        x_seq:  [T, *S]   any float dtype; computed in ``compute_dtype(x_seq.dtype)``
        k:      broadcastable to S, k = sigmoid(w) = 1/tau, in the compute dtype
        v_init: broadcastable to S, V[-1], in the compute dtype
    Returns:
        spike_seq [T, *S] and v_seq [T, *S] (or None) in x_seq's dtype; v_last [*S] in the compute
        dtype, as the fused op returns it (``plif_multistep`` converts it to x_seq's dtype).
    """
    return plif_time_loop(x_seq, k, v_init, _firing_function(surrogate, alpha, spiking), **loop_options)


def membrane_before_reset(x_seq, k, v_init, **options) -> torch.Tensor:
    """H[0..T-1] ([T, *S], compute dtype), differentiable in (x_seq, k, v_init): the values the
    fused forward keeps for its backward, in the kernels' arithmetic order. ``options`` are
    ``reference_multistep``'s but ``store_v_seq``."""
    h_rows = []
    reference_multistep(x_seq, k, v_init, store_v_seq=False, h_rows=h_rows, **options)
    if not h_rows:
        return x_seq.new_empty(x_seq.shape, dtype=compute_dtype(x_seq.dtype))
    return torch.stack(h_rows).reshape(x_seq.shape)


def plif_time_loop(
    x_seq, k, v_init, fire, *, v_threshold, v_reset, decay_input, detach_reset, store_v_seq, h_rows=None
):
    """The time loop itself, with ``fire(H - V_th)`` giving the spike (any callable surrogate);
    ``h_rows``, a list, receives every H."""
    out_dtype = x_seq.dtype
    x_seq = x_seq.to(compute_dtype(out_dtype))
    v_r = 0.0 if v_reset is None else v_reset
    v = v_init.expand(x_seq.shape[1:])
    spikes, vs = [], []
    for t in range(x_seq.shape[0]):
        x = x_seq[t]
        if decay_input:
            h = v + k * (x - (v - v_r))
        else:
            h = v - k * (v - v_r) + x
        if h_rows is not None:
            h_rows.append(h)
        s = fire(h - v_threshold)
        s_reset = s.detach() if detach_reset else s
        if v_reset is None:
            v = h - s_reset * v_threshold
        else:
            v = s_reset * v_r + (1.0 - s_reset) * h
        spikes.append(s)
        vs.append(v)
    if x_seq.shape[0] == 0:
        spike_seq = x_seq.new_empty(x_seq.shape)
        v_seq = x_seq.new_empty(x_seq.shape)
        v = v.clone()
    else:
        spike_seq = torch.stack(spikes)
        v_seq = torch.stack(vs)
    return (
        spike_seq.to(out_dtype),
        v,
        v_seq.to(out_dtype) if store_v_seq else None,
    )
