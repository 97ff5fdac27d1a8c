"""``ParametricLIFNode``: a drop-in for SpikingJelly's layer of the same name, on the fused op."""
from __future__ import annotations

import math
import warnings
from numbers import Real

import torch
from torch import nn

from .functional import plif_multistep
from .reference import compute_dtype, plif_time_loop
from .surrogate import Sigmoid, describe_surrogate


class ParametricLIFNode(nn.Module):
    """Parametric LIF neuron (Fang et al., ICCV 2021) with a learnable time constant.

    Same constructor arguments and defaults as SpikingJelly's ``ParametricLIFNode``, plus:

    Args:
        tau_shape: shape of ``w``: ``()`` (one tau per layer, as in the paper), ``(C, 1, 1)``
            (per channel), or any shape that broadcasts against one time step of the input.
        backend: "auto", "cpu", "cuda", "cupy" or "torch" (see ``plif_cuda.backends``).
        learnable_tau: False gives a plain LIF neuron whose tau stays ``init_tau`` (``w`` is
            then a buffer, not a parameter).

    ``step_mode='m'`` takes ``[T, N, ...]`` and runs all T steps in one fused call;
    ``step_mode='s'`` takes ``[N, ...]`` and runs one step. The membrane ``v`` persists across
    calls (keeping its autograd graph, so gradient reaches the previous call) until ``reset()``.
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
        if isinstance(init_tau, bool) or not isinstance(init_tau, Real) or not init_tau > 1:
            raise ValueError(f"init_tau must be a number > 1 (tau = 1/sigmoid(w)), got {init_tau!r}")
        if step_mode not in ("s", "m"):
            raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
        if surrogate_function is None:
            surrogate_function = Sigmoid()
        self.init_tau = float(init_tau)
        self.decay_input = decay_input
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.detach_reset = detach_reset
        self.step_mode = step_mode
        self.backend = backend
        self.store_v_seq = store_v_seq
        self.surrogate_function = surrogate_function
        w0 = -math.log(self.init_tau - 1.0)
        w = torch.full(tuple(tau_shape), w0)
        if learnable_tau:
            self.w = nn.Parameter(w)
        else:
            self.register_buffer("w", w)
        self.v = 0.0 if v_reset is None else v_reset
        self.v_seq = None
        self._warned_fallback = False

    # SpikingJelly's functional.reset_net calls reset() on every module that has one.
    def reset(self) -> None:
        self.v = 0.0 if self.v_reset is None else self.v_reset
        self.v_seq = None

    @property
    def tau(self) -> torch.Tensor:
        return 1.0 / torch.sigmoid(self.w.detach())

    def extra_repr(self) -> str:
        tau = self.tau
        tau_text = f"{tau.item():.4f}" if tau.numel() == 1 else f"shape {tuple(tau.shape)}, mean {tau.mean().item():.4f}"
        return (
            f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
            f"step_mode={self.step_mode}, backend={self.backend}, tau={tau_text}"
        )

    def _surrogate(self):
        described = describe_surrogate(self.surrogate_function)
        if described is None and not callable(self.surrogate_function):
            raise TypeError(
                f"surrogate_function must be a surrogate name, a surrogate object or a callable, "
                f"got {type(self.surrogate_function).__name__}"
            )
        return described

    def _options(self):
        return dict(
            v_threshold=self.v_threshold, v_reset=self.v_reset, decay_input=self.decay_input,
            detach_reset=self.detach_reset,
        )

    def _check_state(self, x_seq: torch.Tensor):
        v = self.v
        if isinstance(v, torch.Tensor) and v.shape != x_seq.shape[1:]:
            try:
                torch.broadcast_shapes(v.shape, x_seq.shape[1:])
            except RuntimeError:
                raise ValueError(
                    f"the stored membrane v has shape {tuple(v.shape)} but the input step has shape "
                    f"{tuple(x_seq.shape[1:])}; call reset() between inputs of different shapes"
                ) from None
        return v

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        v_init = self._check_state(x_seq)
        described = self._surrogate()
        if described is None:
            spike_seq, v_last, v_seq = self._generic_surrogate_forward(x_seq, v_init)
        else:
            name, alpha, spiking = described
            spike_seq, v_last, v_seq = plif_multistep(
                x_seq, self.w, v_init, surrogate=name, alpha=alpha, spiking=spiking,
                store_v_seq=self.store_v_seq, backend=self.backend, **self._options(),
            )
        self.v = v_last
        if self.store_v_seq:
            self.v_seq = v_seq
        return spike_seq

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multi_step_forward(x.unsqueeze(0)).squeeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            return self.multi_step_forward(x)
        if self.step_mode == "s":
            return self.single_step_forward(x)
        raise ValueError(f"step_mode must be 's' or 'm', got {self.step_mode!r}")

    def _generic_surrogate_forward(self, x_seq, v_init):
        """Any other callable surrogate: the reference time loop, calling it at each step."""
        if not self._warned_fallback:
            name = getattr(self.surrogate_function, "__qualname__", None)  # functions have one, objects do not
            described = f"function {name}" if name else f"an object of class {type(self.surrogate_function).__name__}"
            warnings.warn(
                f"plif_cuda.ParametricLIFNode: surrogate_function ({described}) is not a surrogate the fused "
                "kernels know; using the PyTorch time loop",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_fallback = True
        acc = compute_dtype(x_seq.dtype)
        if not isinstance(v_init, torch.Tensor):
            v_init = torch.full((), float(v_init), dtype=acc, device=x_seq.device)
        return plif_time_loop(
            x_seq, torch.sigmoid(self.w).to(acc), v_init.to(device=x_seq.device, dtype=acc), self.surrogate_function,
            store_v_seq=self.store_v_seq, **self._options(),
        )


class LIFNode(ParametricLIFNode):
    """Plain LIF: the same layer with a fixed (non-learnable) tau."""

    def __init__(self, tau: float = 2.0, **kwargs):
        kwargs.pop("learnable_tau", None)
        super().__init__(init_tau=tau, learnable_tau=False, **kwargs)
