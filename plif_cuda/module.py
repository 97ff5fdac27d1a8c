"""``ParametricLIFNode`` and ``LIFNode``: drop-ins for SpikingJelly's layers of the same names, on the fused op."""

from __future__ import annotations

import warnings
from numbers import Real

import torch
from torch import nn

from .functional import _broadcasts_to, multistep_keeping_state
from .reference import compute_dtype, plif_time_loop, w_for_tau
from .spikingjelly_compat import MemoryModule, layer_neuron_options
from .surrogate import Sigmoid, describe_surrogate


def _describe(value) -> str:
    """A value's type, and its length where it has one: a message never prints a whole tensor."""
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _check_tau(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 1:
        raise ValueError(f"{name} must be a number > 1 (tau = 1/sigmoid(w)), got {value!r}")
    return float(value)


def init_learnable_w(layer: nn.Module, init_tau, tau_shape, learnable_tau: bool) -> float:
    """Gives ``layer`` its ``w`` for ``init_tau`` (a parameter, or a buffer where ``learnable_tau``
    is False); returns ``init_tau`` checked."""
    init_tau = _check_tau(init_tau, "init_tau")
    w = torch.full(tuple(tau_shape), w_for_tau(init_tau))
    if learnable_tau:
        layer.w = nn.Parameter(w)
    else:
        layer.register_buffer("w", w)
    return init_tau


def check_membrane(v, x_seq: torch.Tensor, name: str):
    """``v``, a membrane carried into ``x_seq``'s steps, where it broadcasts against one step."""
    if isinstance(v, torch.Tensor) and isinstance(x_seq, torch.Tensor) and not _broadcasts_to(v.shape, x_seq.shape[1:]):
        raise ValueError(
            f"{name} has shape {tuple(v.shape)} but the input step has shape "
            f"{tuple(x_seq.shape[1:])}; call reset() between inputs of different shapes"
        )
    return v


def set_neuron_options(layer, decay_input, v_threshold, v_reset, surrogate_function, detach_reset, backend) -> None:
    """The neuron options every layer keeps, under SpikingJelly's names, and its membrane ``v``."""
    layer.decay_input = decay_input
    layer.v_threshold = v_threshold
    layer.v_reset = v_reset
    layer.detach_reset = detach_reset
    layer.backend = backend
    layer.surrogate_function = Sigmoid() if surrogate_function is None else surrogate_function
    layer.register_memory("v", 0.0 if v_reset is None else v_reset)


class ParametricLIFNode(MemoryModule):
    """Parametric LIF neuron (Fang et al., ICCV 2021) with a learnable time constant.

    Same constructor arguments and defaults as SpikingJelly's ``ParametricLIFNode``, plus:

    Args:
        tau_shape: shape of ``w``: ``()`` (one tau per layer, as in the paper), ``(C, 1, 1)``
            (per channel), or any shape that broadcasts against one time step of the input.
        backend: "auto", "cpu", "cuda", "cupy" or "torch" (see ``plif_cuda.backends``).
        learnable_tau: False keeps tau at ``init_tau`` (``w`` is then a buffer, not a parameter).

    ``step_mode='m'`` takes ``[T, N, ...]`` and runs all T steps in one fused call;
    ``step_mode='s'`` takes ``[N, ...]`` and runs one step. The membrane ``v`` is a SpikingJelly
    memory: it persists across calls (keeping its autograd graph, so gradient reaches the previous
    call) until ``reset()``, is cut from the graph by ``detach()``, and is kept in the compute
    dtype (float32 for half inputs), so that splitting a sequence into calls never rounds it.

    SpikingJelly's functional API is there too: ``single_step_functional_forward`` and
    ``multi_step_functional_forward`` take ``((x,), (v,))`` and return ``((spikes,), (v_next,))``
    without touching the layer's memory (``v`` a float or a tensor of one step's shape), as
    ``spikingjelly.activation_based.base.to_functional_forward`` and its checkpointing call them.
    """

    def __init__(
        self,
        init_tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function=None,
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "auto",
        store_v_seq: bool = False,
        tau_shape=(),
        learnable_tau: bool = True,
    ):
        super().__init__()
        self._init_time_constant(init_tau, tau_shape, learnable_tau)
        set_neuron_options(self, decay_input, v_threshold, v_reset, surrogate_function, detach_reset, backend)
        self.step_mode = step_mode
        self.store_v_seq = store_v_seq
        self._warned_fallback = False

    def _init_time_constant(self, init_tau, tau_shape, learnable_tau) -> None:
        self.init_tau = init_learnable_w(self, init_tau, tau_shape, learnable_tau)

    def _w(self, x_seq: torch.Tensor) -> torch.Tensor:
        """The op's ``w`` (k = sigmoid(w) = 1/tau)."""
        return self.w

    @property
    def tau(self) -> torch.Tensor:
        return 1.0 / torch.sigmoid(self.w.detach())

    def _tau_text(self) -> str:
        tau = self.tau
        return f"{tau.item():.4f}" if tau.numel() == 1 else f"shape {tuple(tau.shape)}, mean {tau.mean().item():.4f}"

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
            f"step_mode={self.step_mode}, backend={self.backend}, tau={self._tau_text()}"
        )

    # As in SpikingJelly, setting store_v_seq drops the stored sequence.
    @property
    def store_v_seq(self) -> bool:
        return self._store_v_seq

    @store_v_seq.setter
    def store_v_seq(self, value: bool) -> None:
        self._store_v_seq = value
        self.v_seq = None

    def reset(self) -> None:
        super().reset()
        self.v_seq = None

    def detach(self) -> None:
        # The membrane is a view of the op's output, which the in-place detach_() refuses.
        self.v = self.v.detach() if isinstance(self.v, torch.Tensor) else self.v
        if self.v_seq is not None:
            self.v_seq = self.v_seq.detach()

    def _surrogate(self):
        described = describe_surrogate(self.surrogate_function)
        if described is None and not callable(self.surrogate_function):
            raise TypeError(
                f"surrogate_function must be a surrogate name, a surrogate object or a callable, "
                f"got {type(self.surrogate_function).__name__}"
            )
        return described

    def _run(self, x_seq: torch.Tensor, v_init, store_v_seq: bool):
        """All steps of ``x_seq`` from the membrane ``v_init``: (spike_seq, v_last, v_seq or None)."""
        described = self._surrogate()
        if described is None:
            return self._generic_surrogate_forward(x_seq, v_init, store_v_seq)
        return multistep_keeping_state(
            x_seq,
            self._w(x_seq),
            v_init,
            store_v_seq=store_v_seq,
            backend=self.backend,
            **layer_neuron_options(self, described),
        )

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        v_init = check_membrane(self.v, x_seq, "the stored membrane v")
        spike_seq, self.v, v_seq = self._run(x_seq, v_init, self.store_v_seq)
        if self.store_v_seq:
            self.v_seq = v_seq
        return spike_seq

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.unsqueeze(0)
        v_init = check_membrane(self.v, x_seq, "the stored membrane v")
        spike_seq, self.v, v_step = self._run(x_seq, v_init, self.store_v_seq)
        if self.store_v_seq:
            self._append_v_seq(v_step)
        return spike_seq.squeeze(0)

    # ---- SpikingJelly's functional API: the same transition on an explicit state ----------------
    def _functional_arguments(self, inputs, states, kwargs, method: str):
        if kwargs:
            raise TypeError(f"{method} takes no keyword arguments, got {sorted(kwargs)}")
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise TypeError(f"{method}: inputs must be a tuple holding one tensor (x), got {_describe(inputs)}")
        if not isinstance(states, (tuple, list)) or len(states) != 1:
            raise ValueError(
                f"{method}: states must be a tuple holding one state (the membrane v), got {_describe(states)}"
            )
        (v,) = states
        if isinstance(v, bool) or not isinstance(v, (Real, torch.Tensor)):
            raise TypeError(f"{method}: the state v must be a float or a tensor, got {type(v).__name__}")
        return inputs[0], v

    def single_step_functional_forward(self, inputs, states, **kwargs):
        """One step from the explicit membrane: ``((x,), (v,))`` -> ``((spike,), (v_next,))``.

        SpikingJelly's pure transition: the layer's memory (``v``, ``v_seq``) is left as it is;
        ``v`` is a float or a tensor broadcastable to ``x``'s shape; ``v_next`` is in the
        compute dtype (float32 for half inputs), as the layer's own membrane is.
        """
        x, v = self._functional_arguments(inputs, states, kwargs, "single_step_functional_forward")
        x_seq = x.unsqueeze(0)
        spike_seq, v_next, _ = self._run(x_seq, check_membrane(v, x_seq, "the state v"), False)
        return (spike_seq.squeeze(0),), (v_next,)

    def multi_step_functional_forward(self, inputs, states, **kwargs):
        """All steps in one fused call: ``((x_seq,), (v,))`` -> ``((spike_seq,), (v_last,))``,
        ``x_seq`` time-first; otherwise as ``single_step_functional_forward``."""
        x_seq, v = self._functional_arguments(inputs, states, kwargs, "multi_step_functional_forward")
        spike_seq, v_last, _ = self._run(x_seq, check_membrane(v, x_seq, "the state v"), False)
        return (spike_seq,), (v_last,)

    def _append_v_seq(self, v_step: torch.Tensor) -> None:
        # SpikingJelly's single-step rule: the sequence grows by one step per call and restarts
        # when the step's shape, device or dtype changes.
        v_seq = self.v_seq
        if v_seq is None or (v_seq.shape[1:], v_seq.device, v_seq.dtype) != (
            v_step.shape[1:],
            v_step.device,
            v_step.dtype,
        ):
            self.v_seq = v_step
        else:
            self.v_seq = torch.cat((v_seq, v_step))

    def _generic_surrogate_forward(self, x_seq, v_init, store_v_seq):
        """Any other callable surrogate: the reference time loop, calling it at each step."""
        if not self._warned_fallback:
            surrogate = self.surrogate_function
            name = getattr(surrogate, "__qualname__", None)  # functions have one, objects do not
            described = f"function {name}" if name else f"an object of class {type(surrogate).__name__}"
            alpha = getattr(surrogate, "alpha", None)
            reason = (
                "its alpha is a tensor that needs a gradient, which the fused kernels do not compute"
                if isinstance(alpha, torch.Tensor) and alpha.requires_grad
                else "it is not a surrogate the fused kernels know"
            )
            warnings.warn(
                f"plif_cuda.{type(self).__name__}: surrogate_function ({described}) runs on the PyTorch time loop: "
                f"{reason}",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_fallback = True
        acc = compute_dtype(x_seq.dtype)
        if not isinstance(v_init, torch.Tensor):
            v_init = torch.full((), float(v_init), dtype=acc, device=x_seq.device)
        return plif_time_loop(
            x_seq,
            torch.sigmoid(self._w(x_seq)).to(acc),
            v_init.to(device=x_seq.device, dtype=acc),
            self.surrogate_function,
            store_v_seq=store_v_seq,
            **layer_neuron_options(self),
        )


class LIFNode(ParametricLIFNode):
    """Plain LIF: the same layer with a fixed tau. It takes ParametricLIFNode's arguments with
    ``tau`` in place of ``init_tau``, and neither ``tau_shape`` nor ``learnable_tau``.

    As in SpikingJelly, ``tau`` is a constant float attribute, not a parameter or buffer: the
    state_dict is empty, and ``.half()`` / ``.to()`` cannot round it.
    """

    # ParametricLIFNode's arguments up to store_v_seq, in SpikingJelly's order (decay_input,
    # v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, store_v_seq).
    _ARGUMENTS_AFTER_TAU = 8

    def __init__(self, tau: float = 2.0, *args, **kwargs):
        if len(args) > self._ARGUMENTS_AFTER_TAU:
            raise TypeError(f"LIFNode takes at most {self._ARGUMENTS_AFTER_TAU + 1} positional arguments")
        for name in ("init_tau", "tau_shape", "learnable_tau"):
            if name in kwargs:
                raise TypeError(f"LIFNode has no argument {name!r}: its tau is one fixed number, given as tau")
        super().__init__(tau, *args, **kwargs)

    # A plain attribute (set in _init_time_constant) in place of ParametricLIFNode's property.
    tau = None

    def _init_time_constant(self, init_tau, tau_shape, learnable_tau) -> None:
        self.tau = _check_tau(init_tau, "tau")

    def _w(self, x_seq: torch.Tensor) -> torch.Tensor:
        # Built from tau at every call, in the compute dtype, so that tau is rounded only there.
        return torch.full((), w_for_tau(self.tau), dtype=compute_dtype(x_seq.dtype), device=x_seq.device)

    def _tau_text(self) -> str:
        return f"{self.tau:.4f}"
