"""NIR (Neuromorphic Intermediate Representation) export and import of PLIF networks.

    graph = plif_cuda.nir.export(model, sample_input, dt=1e-4)   # -> nir.NIRGraph
    nir.write("net.nir", graph)
    net = plif_cuda.nir.load(nir.read("net.nir"))                # [T, N, ...] -> [T, N, ...]

NIR's ``LIF`` is the continuous ``tau dv/dt = (v_leak - v) + r I``. One forward-Euler step of
length ``dt`` with ``tau = tau_plif * dt`` is ``v += (1/tau_plif) (v_leak - v + r I)``: with
``v_leak = v_reset`` this is the discrete PLIF charge for ``r = 1`` (decay_input=True) and for
``r = tau_plif`` (decay_input=False). The export writes exactly that; the import reads it back
to the same float32 ``w`` (so ``k = sigmoid(w)``, and the spikes, are bit-identical).

Needs the ``nir`` package (``pip install nir``); ``import plif_cuda`` does not import it.
"""

from __future__ import annotations

import math
import pathlib
from collections import Counter
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch
from torch import nn

try:
    import nir
except ImportError as _error:
    raise ImportError(f"plif_cuda.nir needs the 'nir' package (pip install nir): {_error}") from None

from . import __version__
from .models import SeqDropout, VotingLayer
from .module import ParametricLIFNode
from .reference import compute_dtype, w_for_tau

__all__ = ["export", "load", "DEFAULT_DT", "DISCRETISATION", "FIRING_RULE", "NIRNetwork"]

DEFAULT_DT = 1e-4  # the step that snnTorch's and Norse's NIR importers assume
DISCRETISATION = "forward-euler"
FIRING_RULE = "v >= v_threshold"
HARD_RESET = "hard"
SOFT_RESET_APPROXIMATED = "soft reset approximated by a hard reset to 0"
# A foreign graph's r counts as 1 or as tau/dt within float32 rounding.
R_RELATIVE_TOLERANCE = 1e-6
MAX_POOL_ADVICE = (
    "NIR has no max pooling: retrain with average pooling (plif_cuda.models networks: pooling='avg'; "
    "elsewhere nn.AvgPool2d or SpikingJelly's layer.AvgPool2d), or with a sum pooling "
    "(nn.AvgPool2d(..., divisor_override=1))"
)
SOFT_RESET_ADVICE = (
    "NIR's LIF only resets to v_reset (hard reset) and has no subtractive (soft) reset: retrain with "
    "v_reset=0.0, or pass approximate_soft_reset=True to export it as a hard reset to 0 (the exported "
    "network then differs whenever a membrane overshoots the threshold)"
)


# ---- what export recognises ----------------------------------------------------------------------
def _spikingjelly_classes():
    """(neuron classes, dropout classes) of SpikingJelly, or empty tuples without it."""
    try:
        from spikingjelly.activation_based import layer as sj_layer
        from spikingjelly.activation_based import neuron as sj_neuron
    except ImportError:
        return (), ()
    return (sj_neuron.ParametricLIFNode, sj_neuron.LIFNode), (sj_layer.Dropout,)


_MAX_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, SeqDropout)
_STATELESS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.Flatten, nn.AvgPool2d, nn.Identity, VotingLayer)


def _layer_kinds():
    sj_neurons, sj_dropouts = _spikingjelly_classes()
    neurons = (ParametricLIFNode,) + sj_neurons
    return neurons, _DROPOUTS + sj_dropouts, neurons + _DROPOUTS + sj_dropouts + _STATELESS + _MAX_POOLS


@dataclass
class _Call:
    name: str
    module: nn.Module
    inputs: tuple
    output: object


def _traced_calls(model: nn.Module, sample_input: torch.Tensor, layer_types):
    """Run ``model`` once in eval mode with hooks on its layers: (calls in order, model output).

    Layers are the modules of ``layer_types`` and the modules without children; their own
    submodules (a neuron's surrogate) are not hooked. The model's training flags and the
    neurons' membranes are restored afterwards."""
    calls: list[_Call] = []
    handles = []

    def hook_layers(module: nn.Module, prefix: str) -> None:
        if isinstance(module, layer_types) or not any(True for _ in module.children()):

            def record(layer, args, output, name=prefix or type(module).__name__):
                calls.append(_Call(name, layer, args, output))

            handles.append(module.register_forward_hook(record))
            return
        for child_name, child in module.named_children():
            hook_layers(child, f"{prefix}.{child_name}" if prefix else child_name)

    training = {m: m.training for m in model.modules()}
    saved_state = {
        m: (dict(m._memories), m.__dict__.get("v_seq"))
        for m in model.modules()
        if isinstance(getattr(m, "_memories", None), dict)
    }
    hook_layers(model, "")
    try:
        model.eval()
        with torch.no_grad():
            output = model(sample_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
        for module, (memories, v_seq) in saved_state.items():
            module._memories.clear()
            module._memories.update(memories)
            if "v_seq" in module.__dict__:
                module.v_seq = v_seq
    return calls, output


class _Stream:
    """Reads a layer's tensors as the time-first sequence ``[T, N, *step]`` that flows through it."""

    def __init__(self, steps: int, batch: int):
        self.steps, self.batch = steps, batch

    def view(self, t):
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            return None
        if t.dim() >= 2 and tuple(t.shape[:2]) == (self.steps, self.batch):
            return t
        if t.shape[0] == self.steps * self.batch:
            return t.unflatten(0, (self.steps, self.batch))
        if t.shape[0] == self.batch:  # one input for all steps (a static image), repeated over time
            return t.unsqueeze(0).expand(self.steps, *t.shape)
        return None


def _node_name(name: str, taken: Counter) -> str:
    base = name.replace(".", "_") or "layer"
    taken[base] += 1
    return base if taken[base] == 1 else f"{base}_{taken[base]}"


def _pair(value, name: str, layer: str) -> np.ndarray:
    if isinstance(value, int):
        return np.array([value, value])
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return np.array(value)
    raise ValueError(f"{layer}: {name}={value!r} cannot be exported to NIR (expected an int or a pair of ints)")


# ---- layer -> NIR node -------------------------------------------------------------------------------
def _conv_node(conv: nn.Conv2d, step_shape, name: str) -> nir.Conv2d:
    if conv.padding_mode != "zeros":
        raise ValueError(f"{name}: padding_mode={conv.padding_mode!r} has no NIR equivalent; use padding_mode='zeros'")
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
        if any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
            raise ValueError(
                f"{name}: padding='same' with an even kernel pads asymmetrically, which NIR cannot express"
            )
    weight = conv.weight.detach().cpu().numpy()
    bias = np.zeros(weight.shape[0], dtype=weight.dtype) if conv.bias is None else conv.bias.detach().cpu().numpy()
    node = nir.Conv2d(
        input_shape=np.array(step_shape[1:]),
        weight=weight,
        stride=_pair(conv.stride, "stride", name),
        padding=_pair(padding, "padding", name),
        dilation=_pair(conv.dilation, "dilation", name),
        groups=conv.groups,
        bias=bias,
    )
    # nir 1.0 takes the input channels from the weight, which holds in_channels / groups of them.
    node.input_type = {"input": np.array(step_shape)}
    return node


def _linear_node(weight: np.ndarray, bias) -> nir.NIRNode:
    return nir.Linear(weight=weight) if bias is None else nir.Affine(weight=weight, bias=bias)


def _fold_batch_norm(node: nir.NIRNode, bn: nn.modules.batchnorm._BatchNorm, name: str) -> nir.NIRNode:
    """The Conv2d / Linear node with the eval-mode batch norm that follows it folded in (in float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{name}: a BatchNorm without running statistics (track_running_stats=False) cannot be folded "
            "into the layer before it; NIR has no batch norm"
        )
    mean = bn.running_mean.detach().double().cpu().numpy()
    scale = 1.0 / np.sqrt(bn.running_var.detach().double().cpu().numpy() + bn.eps)
    shift = -mean * scale
    if bn.affine:
        gamma = bn.weight.detach().double().cpu().numpy()
        scale, shift = scale * gamma, shift * gamma + bn.bias.detach().double().cpu().numpy()
    weight = node.weight.astype(np.float64)
    dtype = node.weight.dtype
    bias = np.zeros(weight.shape[0]) if isinstance(node, nir.Linear) else node.bias.astype(np.float64)
    if weight.shape[0] != scale.shape[0]:
        raise ValueError(f"{name}: {scale.shape[0]} batch-norm features after a layer of {weight.shape[0]} outputs")
    weight = (weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(dtype)
    bias = (bias * scale + shift).astype(dtype)
    if isinstance(node, nir.Conv2d):
        folded = nir.Conv2d(
            input_shape=node.input_shape,
            weight=weight,
            stride=node.stride,
            padding=node.padding,
            dilation=node.dilation,
            groups=node.groups,
            bias=bias,
        )
        folded.input_type = node.input_type
        return folded
    return nir.Affine(weight=weight, bias=bias)


def _flatten_node(in_shape, out_shape, name: str) -> nir.Flatten:
    kept = 0
    while kept < min(len(in_shape), len(out_shape)) and in_shape[kept] == out_shape[kept]:
        kept += 1
    end = kept + len(in_shape) - len(out_shape)
    if (
        end < kept
        or len(out_shape) <= kept
        or math.prod(in_shape[kept : end + 1]) != out_shape[kept]
        or tuple(in_shape[end + 1 :]) != tuple(out_shape[kept + 1 :])
    ):
        raise ValueError(
            f"{name}: maps a step of shape {tuple(in_shape)} to {tuple(out_shape)}, which is not a flatten"
        )
    return nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=kept, end_dim=end)


def _pool_node(pool: nn.AvgPool2d, name: str) -> nir.NIRNode:
    if pool.ceil_mode:
        raise ValueError(f"{name}: ceil_mode=True has no NIR equivalent; use ceil_mode=False")
    padding = _pair(pool.padding, "padding", name)
    if padding.any() and not pool.count_include_pad:
        raise ValueError(f"{name}: count_include_pad=False with padding has no NIR equivalent")
    kernel = _pair(pool.kernel_size, "kernel_size", name)
    stride = kernel if pool.stride is None else _pair(pool.stride, "stride", name)
    if pool.divisor_override is None:
        return nir.AvgPool2d(kernel_size=kernel, stride=stride, padding=padding)
    if pool.divisor_override == 1:
        return nir.SumPool2d(kernel_size=kernel, stride=stride, padding=padding)
    raise ValueError(f"{name}: divisor_override={pool.divisor_override} is neither an average nor a sum pooling")


def _neuron_w(module: nn.Module, x_seq: torch.Tensor) -> torch.Tensor:
    """The ``w`` (k = sigmoid(w)) that the layer's forward gives the op."""
    if isinstance(module, ParametricLIFNode):
        return module._w(x_seq).detach()
    if hasattr(module, "w"):  # SpikingJelly's ParametricLIFNode
        return module.w.detach()
    return torch.tensor(w_for_tau(float(module.tau)), dtype=compute_dtype(x_seq.dtype))  # SpikingJelly's LIFNode


def _lif_node(module: nn.Module, x_seq: torch.Tensor, dt: float, approximate_soft_reset: bool, name: str):
    if getattr(module, "step_mode", "m") != "m":
        raise ValueError(f"{name}: export needs multi-step neurons (step_mode='m'), got step_mode={module.step_mode!r}")
    step_shape = tuple(x_seq.shape[2:])
    w = _neuron_w(module, x_seq).double().cpu().numpy()
    try:
        w = np.broadcast_to(w, step_shape)
    except ValueError:
        raise ValueError(
            f"{name}: its tau of shape {w.shape} does not broadcast to the step shape {step_shape}"
        ) from None
    with np.errstate(over="ignore"):
        tau = dt * (1.0 + np.exp(-w))  # tau_plif = 1/sigmoid(w), exactly, in float64
    if not np.isfinite(tau).all():
        raise ValueError(f"{name}: a tau of its layer is too large to write as a float64 time constant")
    v_threshold = float(module.v_threshold)
    if module.v_reset is None:
        if not approximate_soft_reset:
            raise ValueError(f"{name}: has a soft reset (v_reset=None). {SOFT_RESET_ADVICE}")
        v_reset, reset = 0.0, SOFT_RESET_APPROXIMATED
    else:
        v_reset, reset = float(module.v_reset), HARD_RESET
    r = np.ones(step_shape) if module.decay_input else tau / dt
    node = nir.LIF(
        tau=tau,
        r=r,
        v_leak=np.full(step_shape, v_reset),
        v_threshold=np.full(step_shape, v_threshold),
        v_reset=np.full(step_shape, v_reset),
        metadata={"reset": reset, "layer": name},
    )
    return node, reset


def _voting_node(voting: VotingLayer, features: int, classes: int) -> nir.Linear:
    weight = np.zeros((classes, features), dtype=np.float32)
    for c in range(classes):
        weight[c, c * voting.voting : (c + 1) * voting.voting] = 1.0 / voting.voting
    return nir.Linear(weight=weight)


def _check_export_args(model, sample_input, dt, approximate_soft_reset) -> float:
    if not isinstance(approximate_soft_reset, bool):
        raise TypeError(f"approximate_soft_reset must be a bool, got {type(approximate_soft_reset).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sample_input, torch.Tensor) or not sample_input.is_floating_point():
        raise TypeError(f"sample_input must be a floating-point tensor, got {type(sample_input).__name__}")
    if isinstance(dt, bool) or not isinstance(dt, Real) or not math.isfinite(dt) or not dt > 0:
        raise ValueError(f"dt must be a positive finite number (seconds per step), got {dt!r}")
    return float(dt)


def export(
    model: nn.Module, sample_input: torch.Tensor, dt: float = DEFAULT_DT, *, approximate_soft_reset: bool = False
) -> nir.NIRGraph:
    """The NIR graph of ``model``: one node per layer, chained from ``input`` to ``output``.

    Args:
        model: layers that run one after the other: Conv2d, Linear, BatchNorm (folded into the
            Conv2d / Linear before it, with its running statistics), Flatten, AvgPool2d (a sum
            pooling when ``divisor_override=1``), Dropout (dropped), plif_cuda's and
            SpikingJelly's ``ParametricLIFNode`` / ``LIFNode`` (step_mode 'm', tau per layer,
            channel or neuron), in SeqToBatch / SeqToANNContainer / Sequential wrappers; a
            ``VotingLayer`` last becomes a Linear node whose output averaged over time is the
            model's output (recorded in the metadata).
        sample_input: what ``model``'s forward takes: ``[T, N, ...]``, or ``[N, ...]`` for a network
            that repeats its input over time (``StaticImageSNN``; the graph then takes the input at
            every step). It runs once, in eval mode; the model's flags and membranes are restored.
        dt: the step, in seconds: NIR's tau is ``tau * dt``.
        approximate_soft_reset: write neurons with a soft reset (``v_reset=None``) as a hard reset
            to 0, which is not the same network; refused (ValueError) when False.

    The graph's metadata holds ``dt``, ``discretisation`` ("forward-euler"), ``reset``,
    ``firing`` and ``producer``.
    """
    dt = _check_export_args(model, sample_input, dt, approximate_soft_reset)
    neuron_types, dropout_types, layer_types = _layer_kinds()
    calls, model_output = _traced_calls(model, sample_input, layer_types)
    if not calls:
        raise ValueError("model ran no layer on sample_input: nothing to export")
    for call in calls:
        if isinstance(call.module, _MAX_POOLS):
            raise ValueError(f"{call.name} ({type(call.module).__name__}): {MAX_POOL_ADVICE}")
        if not isinstance(call.module, layer_types):
            raise ValueError(
                f"{call.name}: {type(call.module).__name__} cannot be exported to NIR; export supports Conv2d, "
                "Linear, BatchNorm, Flatten, AvgPool2d, Dropout, Identity, ParametricLIFNode and LIFNode"
            )
    if len({id(call.module) for call in calls}) != len(calls):
        repeated = next(c.name for i, c in enumerate(calls) if any(c.module is d.module for d in calls[:i]))
        raise ValueError(
            f"{repeated} ran more than once in one forward: export needs each layer to run once on the whole "
            "[T, N, ...] sequence (multi-step neurons, stateless layers in SeqToBatch / SeqToANNContainer)"
        )
    first_neuron = next((c for c in calls if isinstance(c.module, neuron_types)), None)
    if first_neuron is not None and first_neuron.inputs and first_neuron.inputs[0].dim() >= 2:
        steps, batch = first_neuron.inputs[0].shape[:2]
    elif sample_input.dim() >= 2:
        steps, batch = sample_input.shape[:2]
    else:
        raise ValueError(f"sample_input must be a sequence [T, N, ...], got shape {tuple(sample_input.shape)}")
    if steps < 2 or batch < 2 or steps == batch:
        raise ValueError(
            f"sample_input has {steps} time steps and a batch of {batch}: use at least 2 of each, and a batch size "
            "other than the number of steps, so that export can tell time from batch in the layers' shapes"
        )
    stream = _Stream(steps, batch)
    current = stream.view(sample_input)
    if current is None:
        raise ValueError(f"sample_input of shape {tuple(sample_input.shape)} is not a [T, N, ...] sequence")
    input_shape = tuple(current.shape[2:])
    nodes: list[tuple[str, nir.NIRNode]] = []
    taken = Counter()
    folding_target = False  # the last node is a Conv2d / Linear that a batch norm may fold into
    resets = set()
    readout = None
    for index, call in enumerate(calls):
        module = call.module
        tensors = [a for a in call.inputs if isinstance(a, torch.Tensor)]
        seen = stream.view(tensors[0]) if len(tensors) == 1 == len(call.inputs) else None
        if seen is None or seen.shape != current.shape or not torch.equal(seen, current):
            before = calls[index - 1].name if index else "the model input"
            raise ValueError(
                f"{call.name}: its input is not the output of the layer before it ({before}); "
                "export supports networks whose layers run one after the other on [T, N, ...] sequences "
                "(no skip connections, no computation outside the layers)"
            )
        if isinstance(module, VotingLayer):
            if index != len(calls) - 1:
                raise ValueError(f"{call.name}: a VotingLayer averages over time, so it must be the last layer")
            features, classes = current.shape[-1], call.output.shape[-1]
            nodes.append((_node_name(call.name, taken), _voting_node(module, features, classes)))
            readout = "the model's output is this graph's output averaged over time"
            current = None
            break
        result = stream.view(call.output)
        if result is None:
            raise ValueError(
                f"{call.name}: its output of shape {tuple(call.output.shape)} is not a [T, N, ...] sequence"
            )
        step_in, step_out = tuple(current.shape[2:]), tuple(result.shape[2:])
        node = None
        if isinstance(module, neuron_types):
            node, reset = _lif_node(module, current, dt, approximate_soft_reset, call.name)
            resets.add(reset)
        elif isinstance(module, dropout_types + (nn.Identity,)):
            pass
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not folding_target:
                raise ValueError(
                    f"{call.name}: NIR has no batch norm, and this one does not follow a Conv2d or Linear to fold into"
                )
            nodes[-1] = (nodes[-1][0], _fold_batch_norm(nodes[-1][1], module, call.name))
        elif isinstance(module, nn.Conv2d):
            node = _conv_node(module, step_in, call.name)
        elif isinstance(module, nn.Linear):
            bias = None if module.bias is None else module.bias.detach().cpu().numpy()
            node = _linear_node(module.weight.detach().cpu().numpy(), bias)
        elif isinstance(module, nn.Flatten):
            node = _flatten_node(step_in, step_out, call.name)
        elif isinstance(module, nn.AvgPool2d):
            node = _pool_node(module, call.name)
        if node is not None:
            nodes.append((_node_name(call.name, taken), node))
        folding_target = isinstance(node, (nir.Conv2d, nir.Linear, nir.Affine))
        current = result
    if current is not None:
        final = stream.view(model_output)
        if final is None or final.shape != current.shape or not torch.equal(final, current):
            raise ValueError(
                f"the model's output is not the output of its last layer ({calls[-1].name}): export supports "
                "networks that return their last layer's [T, N, ...] output"
            )
        output_shape = tuple(current.shape[2:])
    else:
        output_shape = (call.output.shape[-1],)
    return _chain_graph(
        nodes,
        input_shape,
        output_shape,
        dict(
            dt=dt,
            discretisation=DISCRETISATION,
            firing=FIRING_RULE,
            producer=f"plif_cuda {__version__}",
            reset=" and ".join(sorted(resets)) if resets else "no neurons",
            **({"readout": readout} if readout else {}),
        ),
    )


def _chain_graph(nodes, input_shape, output_shape, metadata) -> nir.NIRGraph:
    named = {"input": nir.Input(input_type={"input": np.array(input_shape)})}
    named.update(nodes)
    named["output"] = nir.Output(output_type={"output": np.array(output_shape)})
    names = list(named)
    return nir.NIRGraph(nodes=named, edges=list(zip(names[:-1], names[1:])), metadata=metadata)


# ---- NIR graph -> module ---------------------------------------------------------------------------
def w_from_tau(tau: np.ndarray, dt: float) -> np.ndarray:
    """The float32 ``w`` whose exported time constant ``dt * (1 + exp(-w))`` is nearest to ``tau``.

    ``-log(tau/dt - 1)`` in float64 lands within a few float64 ulps of the exported ``w``; of it
    and its two float32 neighbours, the one that exports back to ``tau`` is the original ``w``
    (where float64 cannot tell two float32 ``w`` apart, they have the same float32 sigmoid)."""
    tau = np.asarray(tau, dtype=np.float64)
    ratio = tau / dt
    if not (ratio >= 1).all():
        raise ValueError(f"a LIF tau of {tau.min()} is below dt={dt}: the discrete decay dt/tau must be at most 1")
    with np.errstate(divide="ignore"):
        nearest = (-np.log(ratio - 1.0)).astype(np.float32)
    # tau == dt (k = 1): the largest float32, whose sigmoid is 1, rather than an infinite w
    nearest = np.minimum(nearest, np.finfo(np.float32).max)
    with np.errstate(over="ignore"):
        candidates = np.stack(
            [nearest, np.nextafter(nearest, np.float32(-np.inf)), np.nextafter(nearest, np.float32(np.inf))]
        )
        error = np.abs(dt * (1.0 + np.exp(-candidates.astype(np.float64))) - tau)
    return np.take_along_axis(candidates, error.argmin(axis=0)[None], axis=0)[0]


def _compact(values: np.ndarray) -> np.ndarray:
    """One value per layer or per channel (``[C, 1, ...]``) where the array repeats, else as it is."""
    if values.size and (values == values.flat[0]).all():
        return values.flat[0:1].reshape(())
    if values.ndim > 1:
        per_channel = values[(slice(None),) + (slice(0, 1),) * (values.ndim - 1)]
        if (values == per_channel).all():
            return per_channel
    return values


def _single_value(values, what: str, name: str) -> float:
    unique = np.unique(np.asarray(values, dtype=np.float64))
    if unique.size != 1:
        raise ValueError(
            f"node {name!r}: {what} differs between neurons ({unique.size} values); plif_cuda takes one per layer"
        )
    return float(unique[0])


class _Scale(nn.Module):
    """Multiplies each step by a constant per neuron (NIR's Scale; a LIF's input weight)."""

    def __init__(self, scale: np.ndarray):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _lif_modules(node: nir.LIF, dt: float, name: str) -> list[tuple[str, nn.Module]]:
    tau = np.asarray(node.tau, dtype=np.float64)
    r = np.broadcast_to(np.asarray(node.r, dtype=np.float64), tau.shape)
    v_threshold = _single_value(node.v_threshold, "v_threshold", name)
    v_reset = _single_value(node.v_reset, "v_reset", name)
    if not np.array_equal(
        np.broadcast_to(np.asarray(node.v_leak, dtype=np.float64), tau.shape), np.full(tau.shape, v_reset)
    ):
        raise ValueError(f"node {name!r}: v_leak differs from v_reset; plif_cuda's neuron leaks toward its reset value")
    w = _compact(w_from_tau(tau, dt))
    modules = []
    if np.array_equal(r, np.ones_like(r)) or np.allclose(r, 1.0, rtol=0, atol=R_RELATIVE_TOLERANCE):
        decay_input = True
    else:
        decay_input = False
        if not np.allclose(r, tau / dt, rtol=R_RELATIVE_TOLERANCE, atol=0):
            modules.append((f"{name}_input_weight", _Scale(_compact(r * dt / tau))))  # r/tau_plif, not decayed
    neuron = ParametricLIFNode(
        decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset, step_mode="m", tau_shape=w.shape
    )
    with torch.no_grad():
        neuron.w.copy_(torch.from_numpy(np.array(w)))
    modules.append((name, neuron))
    return modules


def _ints(values) -> tuple:
    return tuple(int(v) for v in np.atleast_1d(values))


def _per_dim(values, dims: int) -> tuple:
    values = _ints(values)
    return values * dims if len(values) == 1 else values


def _flatten_dim(dim) -> int:
    dim = int(dim)
    return dim + 1 if dim >= 0 else dim  # past the folded time-and-batch dimension


def _node_modules(node: nir.NIRNode, dt: float, name: str) -> list[tuple[str, nn.Module]]:
    """The modules that run ``node``, with their names."""
    if isinstance(node, nir.LIF):
        return _lif_modules(node, dt, name)
    return [(name, _stateless_module(node, name))]


def _stateless_module(node: nir.NIRNode, name: str) -> nn.Module:
    if isinstance(node, (nir.Affine, nir.Linear)):
        weight = torch.as_tensor(np.asarray(node.weight, dtype=np.float32))
        bias = node.bias if isinstance(node, nir.Affine) else None
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(torch.as_tensor(np.asarray(bias, dtype=np.float32)))
        return linear
    if isinstance(node, nir.Conv2d):
        weight = torch.as_tensor(np.asarray(node.weight, dtype=np.float32))
        bias = np.asarray(node.bias, dtype=np.float32) if node.bias is not None else None
        has_bias = bias is not None and np.any(bias != 0)  # a zero bias adds nothing
        padding = node.padding if isinstance(node.padding, str) else _per_dim(node.padding, 2)
        conv = nn.Conv2d(
            weight.shape[1] * int(node.groups),
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=_per_dim(node.stride, 2),
            padding=padding,
            dilation=_per_dim(node.dilation, 2),
            groups=int(node.groups),
            bias=has_bias,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if has_bias:
                conv.bias.copy_(torch.as_tensor(bias))
        return conv
    if isinstance(node, nir.Flatten):
        return nn.Flatten(_flatten_dim(node.start_dim), _flatten_dim(node.end_dim))
    if isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
        return nn.AvgPool2d(
            _per_dim(node.kernel_size, 2),
            _per_dim(node.stride, 2),
            _per_dim(node.padding, 2),
            divisor_override=1 if isinstance(node, nir.SumPool2d) else None,
        )
    if isinstance(node, nir.Scale):
        return _Scale(node.scale)
    raise ValueError(
        f"node {name!r}: NIR {type(node).__name__} is not supported by plif_cuda.nir.load (it loads Input, Output, "
        "Affine, Linear, Conv2d, Flatten, AvgPool2d, SumPool2d, Scale and LIF)"
    )


def _chain_order(graph: nir.NIRGraph) -> list[str]:
    inputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Input)]
    outputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"load needs one Input and one Output node, the graph has {len(inputs)} and {len(outputs)}")
    following: dict[str, list[str]] = {k: [] for k in graph.nodes}
    preceding = Counter()
    for source, target in graph.edges:
        if source not in graph.nodes or target not in graph.nodes:
            raise ValueError(f"edge ({source!r}, {target!r}) names a node the graph does not have")
        following[source].append(target)
        preceding[target] += 1
    order = [inputs[0]]
    while order[-1] != outputs[0]:
        after = following[order[-1]]
        if len(after) != 1 or preceding[after[0]] != 1 or after[0] in order:
            raise ValueError(
                f"load supports graphs whose nodes form one chain from input to output; node {order[-1]!r} "
                f"is followed by {after}"
            )
        order.append(after[0])
    if len(order) != len(graph.nodes):
        raise ValueError(f"nodes {sorted(set(graph.nodes) - set(order))} are not on the chain from input to output")
    return order


class NIRNetwork(nn.Module):
    """A NIR graph on plif_cuda: ``[T, N, *input_shape]`` -> ``[T, N, ...]``.

    Stateless layers run once on the steps folded into the batch; each LIF node is a
    multi-step ``ParametricLIFNode`` (learnable tau, so the network can be trained further).
    Every call starts from the resting membrane (each neuron's v_reset).
    """

    def __init__(self, layers: dict[str, nn.Module], input_shape: tuple, metadata: dict):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.input_shape = input_shape
        self.metadata = metadata

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 2 or tuple(x_seq.shape[2:]) != self.input_shape:
            shape = tuple(x_seq.shape) if isinstance(x_seq, torch.Tensor) else type(x_seq).__name__
            raise ValueError(f"x_seq must be [T, N, *{self.input_shape}], got {shape}")
        steps, batch = x_seq.shape[:2]
        for layer in self.layers.values():
            if isinstance(layer, ParametricLIFNode):
                layer.reset()
                x_seq = layer(x_seq)
            else:
                x_seq = layer(x_seq.flatten(0, 1)).unflatten(0, (steps, batch))
        return x_seq


def load(graph, *, dt: float | None = None) -> NIRNetwork:
    """A module that runs ``graph`` (a ``nir.NIRGraph``, or a path that ``nir.read`` reads).

    The graph must be a chain of Affine, Linear, Conv2d, Flatten, AvgPool2d, SumPool2d, Scale and
    LIF nodes from its Input to its Output. A LIF node's tau may differ between neurons; its
    v_threshold and v_reset must be one value per layer and its v_leak equal to v_reset.
    ``dt`` (seconds per step) defaults to the graph's ``metadata["dt"]``, else ``DEFAULT_DT``.
    """
    if isinstance(graph, (str, pathlib.Path)):
        graph = nir.read(graph)
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(f"graph must be a nir.NIRGraph or a path to a NIR file, got {type(graph).__name__}")
    metadata = dict(graph.metadata or {})
    if dt is None:
        dt = float(metadata.get("dt", DEFAULT_DT))
    if isinstance(dt, bool) or not isinstance(dt, Real) or not math.isfinite(dt) or not dt > 0:
        raise ValueError(f"dt must be a positive finite number (seconds per step), got {dt!r}")
    discretisation = metadata.get("discretisation", DISCRETISATION)
    if discretisation != DISCRETISATION:
        raise ValueError(f"graph metadata says discretisation={discretisation!r}; load runs {DISCRETISATION!r} only")
    order = _chain_order(graph)
    layers: dict[str, nn.Module] = {}
    for name in order[1:-1]:
        for layer_name, module in _node_modules(graph.nodes[name], float(dt), name):
            layers[layer_name.replace(".", "_")] = module
    input_shape = graph.nodes[order[0]].input_type["input"]
    return NIRNetwork(layers, tuple(int(s) for s in np.atleast_1d(input_shape)), metadata)
