"""Fused BatchNorm + PLIF: ``BatchNormPLIF``, ``bn_plif_multistep`` and ``fuse_bn_plif``.

The block every PLIF network is made of, Conv -> BatchNorm -> PLIF, keeps two ``[T, ...]`` tensors
for the backward when BatchNorm and the neuron run apart (BatchNorm's input and the neuron's H).
The fused op (``plif_cuda::bn_plif_forward``, csrc/plif_bn.h) keeps BatchNorm's input alone and
recomputes the normalised input and the membrane from it in the backward, bit for bit.

Training normalises with the statistics of the batch over T x N x spatial, as ``nn.BatchNorm``
applied to the time-folded batch does, and updates the running statistics the same way
(momentum, unbiased variance); eval mode normalises with the running statistics. An input whose
time stride is 0 (one step broadcast over T, as the paper's static-image network feeds its first
neurons) is normalised with the statistics of its one step, as BatchNorm before the broadcast
would. docs/batchnorm.md says how the arithmetic is ordered and when a spike can differ from
the unfused pair's.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import (
    FLOAT_DTYPES,
    _broadcasts_to,
    _check_float_scalar,
    _needs_reference_autodiff,
    _steps_contiguous,
    check_neuron_options,
    multistep_keeping_state,
)
from .module import ParametricLIFNode, check_membrane, init_learnable_w, set_neuron_options
from .ops import _fixed_order_sum, extension_available
from .reference import compute_dtype, state_tensors, w_for_tau
from .spikingjelly_compat import MemoryModule, layer_neuron_options
from .surrogate import describe_surrogate

# Rows of the op's channel_terms output (enum ChannelTerm of csrc/plif_bn.h).
_MEAN, _INVSTD, _SCALE, _SHIFT, _UNBIASED_VAR = range(5)


def fused_op_available(device_type: str = "cpu") -> bool:
    """Whether the compiled extension has the fused BatchNorm + PLIF ops for tensors on ``device_type``
    (CUDA tensors: a build with the nvcc kernels)."""
    if not (extension_available() and hasattr(torch.ops.plif_cuda, "bn_plif_forward")):
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "plif_cuda::bn_plif_forward", dispatch_key
    )


# ---- the op's fake kernels and autograd ---------------------------------------------------------------
def _fake_forward(y, weight, bias, running_mean, running_var, k, v_init, **options):
    acc = compute_dtype(y.dtype)
    return (
        y.new_empty(y.shape),
        y.new_empty(y.shape[1:], dtype=acc),
        y.new_empty((5, y.shape[2]), dtype=torch.float64),
    )


def _fake_backward(grad_spikes, grad_v_last, y, channel_terms, k, v_init, *, need_grad_y, need_grad_v_init, **options):
    acc = compute_dtype(y.dtype)
    return (
        y.new_empty(y.shape if need_grad_y else (0,)),
        y.new_empty((y.shape[2],), dtype=torch.float64),
        y.new_empty((y.shape[2],), dtype=torch.float64),
        y.new_empty(k.shape, dtype=acc),
        y.new_empty(y.shape[1:] if need_grad_v_init else (0,), dtype=acc),
    )


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    y, weight, bias, running_mean, running_var, k, v_init = inputs
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])
    ctx.neuron = {name: value for name, value in keyword_only_inputs.items() if name != "eps"}
    ctx.batch_statistics = running_mean is None
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(y, k, v_init, output[2])


def _backward(ctx, grad_spikes, grad_v_last, grad_channel_terms):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "BatchNormPLIF's fused backward has no derivative of its own (create_graph=True); "
            "run the layer with backend='torch' for higher-order gradients"
        )
    y, k, v_init, channel_terms = ctx.saved_tensors
    needs_y, needs_weight, needs_bias, _, _, needs_k, needs_v_init = ctx.needs_input_grad
    grad_y, grad_weight, grad_bias, grad_k, grad_v_init = torch.ops.plif_cuda.bn_plif_backward(
        None if grad_spikes is None else grad_spikes.to(y.dtype).contiguous(),
        None if grad_v_last is None else grad_v_last.to(k.dtype).contiguous(),
        y,
        channel_terms,
        k,
        v_init,
        batch_statistics=ctx.batch_statistics,
        need_grad_y=needs_y,
        need_grad_v_init=needs_v_init,
        **ctx.neuron,
    )
    if needs_v_init and v_init.numel() == 1:
        grad_v_init = _fixed_order_sum(grad_v_init.reshape(-1)).to(v_init.dtype)
    # One gradient per tensor; the options are keyword-only, with no gradient slot.
    return (
        grad_y if needs_y else None,
        grad_weight.to(ctx.weight_dtype) if needs_weight else None,
        grad_bias.to(ctx.bias_dtype) if needs_bias else None,
        None,
        None,
        grad_k if needs_k else None,
        grad_v_init.reshape(v_init.shape) if needs_v_init else None,
    )


if fused_op_available():
    torch.library.register_fake("plif_cuda::bn_plif_forward")(_fake_forward)
    torch.library.register_fake("plif_cuda::bn_plif_backward")(_fake_backward)
    torch.library.register_autograd("plif_cuda::bn_plif_forward", _backward, setup_context=_setup_context)


# ---- the functional form ------------------------------------------------------------------------------
def _check_channel_tensor(t, name: str, channels: int, device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but y_seq is on {device}")


def _per_channel_w(w: torch.Tensor, step_shape) -> bool:
    """Whether ``w`` holds one value, or one per channel of a ``[N, C, *spatial]`` step."""
    if w.numel() == 1:
        return True
    shape = tuple(w.shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape == (step_shape[1],) + (1,) * (len(step_shape) - 2)


def _update_running(running_mean, running_var, channel_terms, momentum: float) -> None:
    """running = momentum * batch + (1 - momentum) * running, as nn.BatchNorm (unbiased variance)."""
    with torch.no_grad():
        for running, row in ((running_mean, _MEAN), (running_var, _UNBIASED_VAR)):
            batch = channel_terms[row].to(device=running.device)
            running.copy_(momentum * batch + (1.0 - momentum) * running.double())


def _keyword_defaults(function, skipped=()) -> dict:
    """The defaults of ``function``'s arguments that have one, but ``skipped``: one source for them."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty and p.name not in skipped}


def _with_defaults(caller: str, arguments: dict, defaults: dict) -> dict:
    """``arguments`` (keyword arguments taken as ``**``) over ``defaults``, naming an unknown one."""
    unknown = sorted(set(arguments) - set(defaults))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    return dict(defaults, **arguments)


# plif_multistep's neuron options that the fused op takes, with their defaults.
_NEURON_DEFAULTS = _keyword_defaults(multistep_keeping_state, skipped=("v_init", "store_v_seq", "backend"))


def bn_plif_multistep(
    y_seq: torch.Tensor,
    w,
    v_init=None,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    batch_statistics: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
    **neuron_options,
):
    """BatchNorm over ``[T, N, C, *spatial]`` (statistics over T x N x spatial) and a multi-step PLIF
    neuron on its output, in one fused op where it runs (CPU tensors; CUDA tensors in a build with
    the nvcc kernels; ``backend`` "auto" or the tensors' device type).

    ``batch_statistics`` normalises with the batch's statistics and, where ``running_mean`` /
    ``running_var`` are given, updates them in place with ``momentum``; otherwise the running
    statistics normalise. ``w``, ``v_init`` and the neuron options (``v_threshold``, ``v_reset``,
    ``decay_input``, ``detach_reset``, ``surrogate``, ``alpha``, ``spiking``, by keyword) are
    ``plif_multistep``'s, with its defaults; the fused op takes ``w`` per layer or per channel (any
    other shape runs BatchNorm and the neuron apart). Returns ``(spike_seq, v_last)``, ``v_last`` in
    the compute dtype.
    """
    if not isinstance(y_seq, torch.Tensor):
        raise TypeError(f"y_seq must be a tensor, got {type(y_seq).__name__}")
    if y_seq.dtype not in FLOAT_DTYPES:
        raise TypeError(f"y_seq must be float16, bfloat16, float32 or float64, got dtype {y_seq.dtype}")
    if y_seq.dim() < 3:
        raise ValueError(f"y_seq must be [T, N, C, ...] (time first), got shape {tuple(y_seq.shape)}")
    channels = y_seq.shape[2]
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        _check_channel_tensor(t, name, channels, y_seq.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not isinstance(batch_statistics, bool):
        raise TypeError(f"batch_statistics must be a bool, got {type(batch_statistics).__name__}")
    if not batch_statistics and running_mean is None:
        raise ValueError("batch_statistics=False needs running_mean and running_var")
    momentum = _check_float_scalar(momentum, "momentum")
    eps = _check_float_scalar(eps, "eps")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    options = check_neuron_options(_with_defaults("bn_plif_multistep", neuron_options, _NEURON_DEFAULTS))
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    broadcast_steps = y_seq.shape[0] > 1 and y_seq.stride(0) == 0
    distinct = math.prod(y_seq.shape[3:]) * y_seq.shape[1] * (1 if broadcast_steps else y_seq.shape[0])
    if batch_statistics and distinct <= 1:
        raise ValueError(
            f"y_seq must hold more than 1 value per channel to normalise with batch statistics, got shape "
            f"{tuple(y_seq.shape)}"
        )

    acc = compute_dtype(y_seq.dtype)
    step_shape = y_seq.shape[1:]
    w, v_init = state_tensors(w, v_init, options["v_reset"], acc, y_seq.device)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a tensor or a float, got {type(w).__name__}")
    if not isinstance(v_init, torch.Tensor):
        raise TypeError(f"v_init must be a tensor, a float or None, got {type(v_init).__name__}")

    fused = (
        backend in ("auto", y_seq.device.type)
        and fused_op_available(y_seq.device.type)
        and _per_channel_w(w, step_shape)
        and not _needs_reference_autodiff(y_seq, w, v_init)
    )
    if not fused:
        # BatchNorm on the time-folded batch (on the one step of a broadcast input), then the neuron.
        norm = dict(training=batch_statistics, momentum=momentum, eps=eps)
        if broadcast_steps:
            z = F.batch_norm(y_seq[0], running_mean, running_var, weight, bias, **norm)
            z_seq = z.unsqueeze(0).expand(y_seq.shape)
        else:
            z = F.batch_norm(y_seq.flatten(0, 1), running_mean, running_var, weight, bias, **norm)
            z_seq = z.unflatten(0, y_seq.shape[:2])
        spikes, v_last, _ = multistep_keeping_state(z_seq, w, v_init, backend=backend, **options)
        return spikes, v_last

    if not _broadcasts_to(v_init.shape, step_shape):
        raise ValueError(
            f"v_init of shape {tuple(v_init.shape)} does not broadcast against one time step of y_seq, "
            f"shape {tuple(step_shape)}"
        )
    y_op = y_seq if _steps_contiguous(y_seq) else y_seq.contiguous()
    k = torch.sigmoid(w).to(acc).reshape(-1)
    v_op = v_init.to(acc).reshape(()) if v_init.numel() == 1 else v_init.to(acc).expand(step_shape).contiguous()
    spikes, v_last, channel_terms = torch.ops.plif_cuda.bn_plif_forward(
        y_op,
        weight,
        bias,
        None if batch_statistics else running_mean,
        None if batch_statistics else running_var,
        k,
        v_op,
        eps=eps,
        **options,
    )
    if batch_statistics and running_mean is not None:
        _update_running(running_mean, running_var, channel_terms, momentum)
    return spikes, v_last


# ---- the module ---------------------------------------------------------------------------------------
class DeferredBatchNorm(_BatchNorm):
    """A BatchNorm's parameters and running statistics, whose forward passes its input through:
    the ``BatchNormPLIF`` after it normalises. ``fuse_bn_plif`` puts one where each fused
    BatchNorm was, holding that BatchNorm's own tensors under its names, so the state_dict keys stay
    the unfused model's; ``train()`` / ``eval()`` on it set the mode the normalisation runs in."""

    def _check_input_dim(self, input):
        pass

    def forward(self, input):
        return input

    @classmethod
    def taking_over(cls, bn: _BatchNorm) -> DeferredBatchNorm:
        deferred = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        for name in ("weight", "bias"):
            setattr(deferred, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            deferred._buffers[name] = bn._buffers.get(name)
        deferred.train(bn.training)
        return deferred


# ParametricLIFNode's arguments that BatchNormPLIF takes, with their defaults.
_LAYER_DEFAULTS = _keyword_defaults(ParametricLIFNode.__init__, skipped=("step_mode", "store_v_seq"))


class BatchNormPLIF(MemoryModule):
    """BatchNorm followed by a multi-step Parametric LIF neuron, fused: input ``[T, N, C, ...]``
    (``[T, N, C]``, ``[T, N, C, L]`` as BatchNorm1d, ``[T, N, C, H, W]`` as BatchNorm2d), output
    the spikes, same shape.

    BatchNorm's arguments are ``nn.BatchNorm2d``'s; the neuron's, by keyword, are ``ParametricLIFNode``'s
    with its defaults, but ``step_mode`` and ``store_v_seq`` (``tau_shape`` ``()`` for one tau per
    layer, ``(C, 1, 1)`` or ``(C,)`` per channel; ``learnable_tau=False`` keeps it a buffer).
    ``fuse_bn_plif`` builds these from existing layers.
    The membrane ``v`` persists across calls until ``reset()``, as the neuron's does.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        **neuron_arguments,
    ):
        super().__init__()
        neuron = _with_defaults("BatchNormPLIF", neuron_arguments, _LAYER_DEFAULTS)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.bn = DeferredBatchNorm(num_features, eps, momentum, affine, track_running_stats)
        init_learnable_w(self, neuron["init_tau"], neuron["tau_shape"], neuron["learnable_tau"])
        self.constant_tau = None
        self._set_neuron_options(
            neuron["decay_input"],
            neuron["v_threshold"],
            neuron["v_reset"],
            neuron["surrogate_function"],
            neuron["detach_reset"],
            neuron["backend"],
        )
        self.step_mode = "m"

    def _set_neuron_options(self, decay_input, v_threshold, v_reset, surrogate_function, detach_reset, backend):
        set_neuron_options(self, decay_input, v_threshold, v_reset, surrogate_function, detach_reset, backend)
        if describe_surrogate(self.surrogate_function) is None:
            raise TypeError(
                "surrogate_function must be one of plif_cuda's or SpikingJelly's seven surrogates "
                f"(a name or an object), got {type(self.surrogate_function).__name__}"
            )

    def supported_step_mode(self):
        return ("m",)

    @property
    def norm(self) -> DeferredBatchNorm:
        """The BatchNorm this layer normalises with: its own, or the one ``fuse_bn_plif`` left in the network."""
        external = self.__dict__.get("_external_norm")
        return self.bn if external is None else external

    @classmethod
    def fused_from(cls, deferred: DeferredBatchNorm, neuron: nn.Module) -> BatchNormPLIF:
        """The layer for a BatchNorm (now ``deferred``, left in the network) and ``neuron``: it takes the
        neuron's ``w`` (or constant tau), options and membrane, and normalises with ``deferred``."""
        layer = cls.__new__(cls)
        MemoryModule.__init__(layer)
        object.__setattr__(layer, "_external_norm", deferred)
        if isinstance(getattr(neuron, "w", None), torch.Tensor):
            if isinstance(neuron.w, nn.Parameter):
                layer.w = neuron.w
            else:
                layer.register_buffer("w", neuron.w)
            layer.constant_tau = None
        else:
            layer.constant_tau = float(neuron.tau)
        layer._set_neuron_options(
            neuron.decay_input,
            neuron.v_threshold,
            neuron.v_reset,
            neuron.surrogate_function,
            neuron.detach_reset,
            neuron.backend if isinstance(neuron, ParametricLIFNode) else "auto",
        )
        layer.v = neuron.v
        layer.step_mode = "m"
        layer.train(neuron.training)
        return layer

    @property
    def tau(self):
        if self.constant_tau is not None:
            return self.constant_tau
        return 1.0 / torch.sigmoid(self.w.detach())

    def extra_repr(self) -> str:
        norm = self.norm
        tau = self.tau
        tau_text = f"{float(tau):.4f}" if not isinstance(tau, torch.Tensor) or tau.numel() == 1 else "per channel"
        return (
            f"{norm.num_features}, eps={norm.eps}, momentum={norm.momentum}, affine={norm.affine}, "
            f"track_running_stats={norm.track_running_stats}, v_threshold={self.v_threshold}, "
            f"v_reset={self.v_reset}, detach_reset={self.detach_reset}, tau={tau_text}"
        )

    def detach(self) -> None:
        self.v = self.v.detach() if isinstance(self.v, torch.Tensor) else self.v

    def _w(self, y_seq: torch.Tensor):
        if self.constant_tau is not None:
            return torch.full((), w_for_tau(self.constant_tau), dtype=compute_dtype(y_seq.dtype), device=y_seq.device)
        return self.w

    def multi_step_forward(self, y_seq: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        factor = 0.0 if norm.momentum is None else norm.momentum
        if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        batch_statistics = norm.training or norm.running_mean is None
        track = not norm.training or norm.track_running_stats
        v = check_membrane(self.v, y_seq, "the stored membrane v")
        spikes, self.v = bn_plif_multistep(
            y_seq,
            self._w(y_seq),
            v,
            weight=norm.weight,
            bias=norm.bias,
            running_mean=norm.running_mean if track else None,
            running_var=norm.running_var if track else None,
            batch_statistics=batch_statistics,
            momentum=factor,
            eps=norm.eps,
            backend=self.backend,
            **layer_neuron_options(self, describe_surrogate(self.surrogate_function)),
        )
        return spikes

    def single_step_forward(self, y):
        raise ValueError("BatchNormPLIF runs in multi-step mode only: its input is [T, N, C, ...]")

    def forward(self, y_seq: torch.Tensor) -> torch.Tensor:
        return self.multi_step_forward(y_seq)


# ---- fuse_bn_plif -------------------------------------------------------------------------------------
def _is_plain_batch_norm(module) -> bool:
    return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, DeferredBatchNorm)


def _is_multistep_batch_norm(module) -> bool:
    """SpikingJelly's layer.BatchNorm1d/2d in multi-step mode (folds T into the batch)."""
    return _is_plain_batch_norm(module) and getattr(module, "step_mode", None) == "m"


def _time_folded_batch_norm(module):
    """(container, key) of the BatchNorm a time-folding wrapper ends with, or None: our
    ``models.SeqToBatch``, SpikingJelly's ``SeqToANNContainer``."""
    from .models import SeqToBatch

    if isinstance(module, SeqToBatch):
        inner = module.module
        if _is_plain_batch_norm(inner):
            return module._modules, "module"
        module = inner if isinstance(inner, nn.Sequential) else None
    elif type(module).__name__ != "SeqToANNContainer" or not isinstance(module, nn.Sequential):
        return None
    if module is None or len(module) == 0:
        return None
    last_key = list(module._modules)[-1]
    return (module._modules, last_key) if _is_plain_batch_norm(module._modules[last_key]) else None


def _fusable_neuron(module) -> bool:
    """A multi-step PLIF or LIF node, ours or SpikingJelly's, that the fused op covers."""
    from .module import ParametricLIFNode

    ours = isinstance(module, ParametricLIFNode)
    theirs = type(module).__name__ in ("ParametricLIFNode", "LIFNode") and type(module).__module__.startswith(
        "spikingjelly"
    )
    if not (ours or theirs) or getattr(module, "step_mode", None) != "m" or getattr(module, "store_v_seq", False):
        return False
    if getattr(module, "_neuron_precision", None) is not None:
        return False
    return describe_surrogate(module.surrogate_function) is not None


def _fuse_pair(slot, neuron_modules, neuron_key) -> BatchNormPLIF:
    modules, key = slot
    bn = modules[key]
    deferred = DeferredBatchNorm.taking_over(bn)
    modules[key] = deferred
    fused = BatchNormPLIF.fused_from(deferred, neuron_modules[neuron_key])
    neuron_modules[neuron_key] = fused
    return fused


def fuse_bn_plif(model: nn.Module) -> nn.Module:
    """Fuse each BatchNorm directly followed by a PLIF or LIF node, in place; returns ``model``.

    A pair is fused where, inside an ``nn.Sequential`` (whose order is the data's), a time-folding
    wrapper ending in ``nn.BatchNorm1d/2d`` (``plif_cuda.models.SeqToBatch``, SpikingJelly's
    ``SeqToANNContainer``) or SpikingJelly's multi-step ``layer.BatchNorm1d/2d`` comes right before
    a multi-step ``ParametricLIFNode`` / ``LIFNode`` (plif_cuda's or SpikingJelly's, without
    ``store_v_seq``), and in the first block of ``plif_cuda.models``' networks. The BatchNorm
    becomes a ``DeferredBatchNorm`` holding its tensors (the same objects, so optimizers and the
    state_dict keys are unchanged) and the neuron a ``BatchNormPLIF`` holding the neuron's ``w``,
    options and membrane. Everything else is left as it is; the fused model's state_dict loads
    into the unfused one and back.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    from .models import SpikingConvNet

    for module in list(model.modules()):
        if isinstance(module, SpikingConvNet):
            slot = _time_folded_batch_norm(module.first_conv)
            if slot is not None and _fusable_neuron(module.first_neuron):
                _fuse_pair(slot, module._modules, "first_neuron")
        if not isinstance(module, nn.Sequential):
            continue
        keys = list(module._modules)
        for before, after in zip(keys, keys[1:]):
            first, second = module._modules[before], module._modules[after]
            if not _fusable_neuron(second):
                continue
            if _is_multistep_batch_norm(first):
                slot = (module._modules, before)
            else:
                slot = _time_folded_batch_norm(first)
            if slot is not None:
                _fuse_pair(slot, module._modules, after)
    return model
