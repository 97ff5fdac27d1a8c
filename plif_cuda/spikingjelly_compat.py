"""Working with SpikingJelly: its stateful-module protocol, and ``patch_spikingjelly``.

``MemoryModule`` is SpikingJelly's ``activation_based.base.MemoryModule`` when SpikingJelly is
importable, so that its tools (``functional.reset_net`` / ``detach_net`` / ``set_step_mode``,
``base.named_memories``, ``memopt`` checkpointing, monitors) treat our layers as their own.
Without SpikingJelly it is a stand-in with the same protocol (``register_memory``, ``reset``,
``memories``, ``named_memories``, ``step_mode``, ``functional_forward``, memories converted by
``.to()``; our layers add ``detach`` and the single- and multi-step functional forwards).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .reference import w_for_tau

try:
    from spikingjelly.activation_based import base as _sj_base
except ImportError:
    _sj_base = None


class _MemoryModule(nn.Module):
    """SpikingJelly's ``MemoryModule`` protocol, for when SpikingJelly is not installed.

    A memory is a state variable (a membrane ``v``) kept outside the parameters and buffers:
    ``reset()`` restores its registered value and ``.to()`` / ``.double()`` / ``.half()``
    convert it along with the module. (Our layers define ``detach()`` themselves.)
    """

    def __init__(self):
        super().__init__()
        self._memories = {}
        self._memories_rv = {}
        self._step_mode = "s"

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("s", "m")

    @property
    def step_mode(self) -> str:
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str):
        if value not in self.supported_step_mode():
            raise ValueError(f"step_mode can only be {self.supported_step_mode()}, got {value!r}")
        self._step_mode = value

    def forward(self, *args, **kwargs):
        if self.step_mode == "m":
            return self.multi_step_forward(*args, **kwargs)
        return self.single_step_forward(*args, **kwargs)

    def materialize_states(self, inputs, states, step_mode: str):
        """The explicit states as the functional forwards take them (ours take them as they are)."""
        return states

    def functional_forward(self, inputs, states, **kwargs):
        """``(outputs, updated_states)`` of one call in the current step mode, from explicit
        states, leaving the module's memories alone."""
        states = self.materialize_states(inputs, states, self.step_mode)
        if self.step_mode == "m":
            return self.multi_step_functional_forward(inputs, states, **kwargs)
        return self.single_step_functional_forward(inputs, states, **kwargs)

    def register_memory(self, name: str, value) -> None:
        if hasattr(self, name):
            raise AttributeError(f"{name} is already an attribute of {type(self).__name__}")
        self._memories[name] = value
        self._memories_rv[name] = copy.deepcopy(value)

    def reset(self) -> None:
        for name, value in self._memories_rv.items():
            self._memories[name] = copy.deepcopy(value)

    def memories(self):
        yield from self._memories.values()

    def named_memories(self):
        yield from self._memories.items()

    def _apply(self, fn, *args, **kwargs):
        for store in (self._memories, self._memories_rv):
            for name, value in store.items():
                if isinstance(value, torch.Tensor):
                    store[name] = fn(value)
        return super()._apply(fn, *args, **kwargs)

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._memories = self._memories.copy()
        return replica

    def __getattr__(self, name: str):
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            return memories[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            memories[name] = value
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._memories:
            del self._memories[name]
            del self._memories_rv[name]
        else:
            super().__delattr__(name)


MemoryModule = _MemoryModule if _sj_base is None else _sj_base.MemoryModule


def layer_neuron_options(layer, surrogate: tuple | None = None) -> dict:
    """A neuron layer's options as ``plif_multistep`` takes them (plif_cuda's layers and
    SpikingJelly's name them alike); ``surrogate``, a ``describe_surrogate`` triple, adds its."""
    options = dict(
        v_threshold=layer.v_threshold,
        v_reset=layer.v_reset,
        decay_input=layer.decay_input,
        detach_reset=layer.detach_reset,
    )
    if surrogate is not None:
        options["surrogate"], options["alpha"], options["spiking"] = surrogate
    return options


# ---- patch_spikingjelly --------------------------------------------------------------------------
_ORIGINAL_FORWARDS: dict[type, object] = {}


def _plif_w(layer):
    return layer.w


def _lif_w(layer):
    # SpikingJelly's LIFNode keeps tau as a float; k = sigmoid(w) = 1/tau.
    return w_for_tau(layer.tau)


def _fused_multi_step_forward(cls, w_of):
    """A ``multi_step_forward`` for SpikingJelly's ``cls`` that runs our op when it covers the layer."""
    from .functional import plif_multistep
    from .surrogate import describe_surrogate

    original = _ORIGINAL_FORWARDS[cls]

    def multi_step_forward(self, x_seq, *args, **kwargs):
        described = describe_surrogate(self.surrogate_function)
        if (
            args
            or kwargs
            or described is None
            or self._neuron_precision is not None
            # A subclass with dynamics of its own (SpikingJelly's own test for this).
            or type(self).single_step_functional_forward is not cls.single_step_functional_forward
            or type(self).multi_step_functional_forward is not cls.multi_step_functional_forward
        ):
            return original(self, x_seq, *args, **kwargs)
        # SpikingJelly's own state materialisation: the float reset value becomes a tensor in
        # x's dtype, a membrane of another shape restarts from the reset value.
        (v,) = self.materialize_states((x_seq,), tuple(self._memories.values()), "m")
        spike_seq, v_last, v_seq = plif_multistep(
            x_seq, w_of(self), v, store_v_seq=self.store_v_seq, **layer_neuron_options(self, described)
        )
        # A fresh tensor, not our permuted view of the op's output: SpikingJelly's detach() works in
        # place (detach_), which views refuse.
        self._memories["v"] = v_last.clone()
        self.v_seq = v_seq
        return spike_seq

    multi_step_forward.__doc__ = original.__doc__
    return multi_step_forward


class _Patched:
    """What ``patch_spikingjelly`` returns: leaving its ``with`` block unpatches."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        unpatch_spikingjelly()


def patch_spikingjelly() -> _Patched:
    """Run SpikingJelly's ``neuron.ParametricLIFNode`` and ``neuron.LIFNode`` on plif_cuda's op.

    Their multi-step forward (``step_mode='m'``) runs the fused op whenever it covers the layer
    (one of SpikingJelly's seven surrogates of the spec, no ``set_neuron_precision``, no subclass
    with dynamics of its own); anything else, and single-step mode, stays SpikingJelly's. The
    layers keep their parameters, state (``v`` in the input's dtype, as SpikingJelly keeps it) and
    checkpoints. Undo with ``unpatch_spikingjelly()``, or use the return value as a context
    manager::

        with plif_cuda.patch_spikingjelly():
            train(net)
    """
    try:
        from spikingjelly.activation_based import neuron
    except ImportError as error:
        raise ImportError(f"patch_spikingjelly needs SpikingJelly, which could not be imported ({error})") from None
    for cls, w_of in ((neuron.ParametricLIFNode, _plif_w), (neuron.LIFNode, _lif_w)):
        if cls not in _ORIGINAL_FORWARDS:
            _ORIGINAL_FORWARDS[cls] = cls.__dict__["multi_step_forward"]
            cls.multi_step_forward = _fused_multi_step_forward(cls, w_of)
    return _Patched()


def unpatch_spikingjelly() -> None:
    """Give SpikingJelly's neurons back their own forward (a no-op when not patched)."""
    while _ORIGINAL_FORWARDS:
        cls, forward = _ORIGINAL_FORWARDS.popitem()
        cls.multi_step_forward = forward
