"""dL/dw exact for every tau: the backward keeps X and takes dH/dk = X - (V[t-1] - V_r) itself,
where from H alone it would be (H - V[t-1]) / k, which loses the digits H - V[t-1] cancels as k
shrinks (benchmarks/NOTES.md, "Exact dL/dk"). Compared with the pure-PyTorch reference evaluated
in float64 (its autograd takes the same derivative term by term)."""

from __future__ import annotations

import pytest
import torch

import plif_cuda
from helpers import FLOAT_DTYPES

# w from tau ~ 1 + e^80 (k = 1.8e-35, still a normal float32) to tau ~ 1 (k = 1 - 1e-13).
W_VALUES = (-80.0, -40.0, -16.0, -12.0, -8.0, -4.0, 0.0, 4.0)


def _grad_w(x: torch.Tensor, w: float, dtype: torch.dtype, backend: str, per_neuron: bool, **options) -> torch.Tensor:
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    shape = x.shape[1:] if per_neuron else ()
    w_tensor = torch.full(shape, w, dtype=compute, requires_grad=True)
    spikes, v_last, _ = plif_cuda.plif_multistep(x.to(dtype), w_tensor, backend=backend, **options)
    generator = torch.Generator().manual_seed(1)
    # Values every dtype holds exactly: the gradient reaching the spikes is the same for all.
    upstream = torch.randn(spikes.shape, generator=generator, dtype=torch.float64).bfloat16().double()
    loss = (spikes.double() * upstream).sum() + v_last.double().sum()
    (grad,) = torch.autograd.grad(loss, [w_tensor])
    return grad.double()


def _inputs(steps=8, neurons=257):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(steps, neurons, generator=generator, dtype=torch.float64) * 0.5 + 0.6


@pytest.mark.parametrize("decay_input", (True, False), ids=("decay", "no_decay"))
@pytest.mark.parametrize("per_neuron", (False, True), ids=("layer", "neuron"))
@pytest.mark.parametrize("w", W_VALUES)
def test_float32_tau_gradient_within_1e_5_of_float64(w, per_neuron, decay_input):
    x = _inputs()
    options = dict(surrogate="sigmoid", alpha=4.0, decay_input=decay_input)
    fused = _grad_w(x, w, torch.float32, "cpu", per_neuron, **options)
    exact = _grad_w(x, w, torch.float64, "torch", per_neuron, **options)
    scale = exact.abs().max().item()
    assert scale > 0
    # A layer's one value to 1e-5 of itself; each neuron's to 1e-5 of itself or of the largest
    # (a neuron's sum over its steps may cancel to far below its terms, in any float32 sum).
    atol = 1e-5 * scale if per_neuron else 0.0
    torch.testing.assert_close(fused, exact, rtol=1e-5, atol=atol)


def test_tau_gradient_at_w_minus_80_is_the_tiny_exact_value():
    """At w = -80, k = 1.8e-35: the membrane barely moves, and dL/dw = k(1 - k) dL/dk is of order
    1e-32 here, not 0 (the value from H alone: H - V[t-1] rounds to 0 in float32)."""
    x = _inputs()
    fused = _grad_w(x, -80.0, torch.float32, "cpu", False)
    exact = _grad_w(x, -80.0, torch.float64, "torch", False)
    assert 1e-36 < exact.abs().item() < 1e-30
    torch.testing.assert_close(fused, exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[2:], ids=str)
def test_half_inputs_tau_gradient_equals_float32s_on_the_same_values(dtype):
    """The half types compute in float32 from their own inputs and keep them too: the gradient is
    float32's on those values (whose distance to float64 the tests above bound)."""
    x = _inputs().to(dtype).double()
    fused = _grad_w(x, -16.0, dtype, "cpu", False)
    single = _grad_w(x, -16.0, torch.float32, "cpu", False)
    torch.testing.assert_close(fused, single, rtol=1e-6, atol=0)


def _membrane_gradients(x: torch.Tensor, w: torch.Tensor, backend: str):
    x = x.to(w.dtype).requires_grad_(True)
    v_init = torch.full(x.shape[1:], 0.1, dtype=w.dtype, requires_grad=True)
    _, v_last, _ = plif_cuda.plif_multistep(x, w, v_init, backend=backend, detach_reset=True)
    return [grad.double() for grad in torch.autograd.grad(v_last.sum(), [x, v_init])]


@pytest.mark.parametrize("w", (4.0, 7.0, 10.0))
def test_float32_membrane_gradients_stay_exact_as_tau_nears_1(w):
    """As k nears 1 the gradient carried back through the membrane, (1 - k) dL/dH, is a small
    part of dL/dH: formed from 1 - k (exact for k >= 1/2) it keeps float32's precision, while
    dL/dH - k dL/dH would keep only about 2^-24 / (1 - k) of it (6e-5 at w = 7). With the loss
    on V[T-1] alone and detach_reset, every gradient is a product along the membrane, so each
    element of dL/dX and dL/dv_init is held to 1e-5 of its float64 value, computed from the same
    k (float32's sigmoid(w), whose own rounding moves 1 - k by up to 2^-25 / (1 - k))."""
    x = _inputs(neurons=64) * 0.3  # below threshold mostly; a spike cuts its neuron's chain exactly
    w_single = torch.tensor(w, dtype=torch.float32)
    w_same_k = torch.logit(torch.sigmoid(w_single).double())
    fused = _membrane_gradients(x, w_single, "cpu")
    exact = _membrane_gradients(x, w_same_k, "torch")
    for got, want in zip(fused, exact):
        assert (want != 0).any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
