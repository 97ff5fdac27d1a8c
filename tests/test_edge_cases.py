"""Corners of the math and of the layout handling: memory layouts that are copied, precision of
dL/dw at large tau, k underflowing to 0, NaN/inf inputs with absent gradients, the reference's
own derivatives, and the thread-count independence of the reduced gradients."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import (
    SMOOTH_SURROGATES,
    assert_grad_close,
    assert_membrane_close,
    op_options,
    strided_leaf,
)
from plif_cuda import plif_multistep
from plif_cuda.functional import _to_op_layout
from plif_cuda.surrogate import DEFAULT_ALPHA, surrogate_derivative, surrogate_primitive


def _seeded(shape, seed, dtype=torch.float64, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).mul(scale).add(shift).to(dtype)


def _outputs_and_grads(x_seq, w, v_init, loss_fn, **kwargs):
    """Outputs and the gradients of loss_fn(spike_seq, v_last, v_seq) for fresh leaves (x_seq's
    strides kept)."""
    x_leaf = strided_leaf(x_seq)
    w_leaf = w.detach().clone().requires_grad_()
    v_leaf = v_init.detach().clone().requires_grad_()
    outputs = plif_multistep(x_leaf, w_leaf, v_leaf, **kwargs)
    loss_fn(*outputs).backward()
    return outputs, (x_leaf.grad, w_leaf.grad, v_leaf.grad)


# ---- layouts (docs/layouts.md: which layouts run without a copy) ------------------------------
def _channels_last_sliced(seed=0):
    big = _seeded((3, 4, 5, 12), seed, torch.float32, 1.5, 0.4).contiguous(memory_format=torch.channels_last)
    return big[..., ::2]  # [T=3, C=4, H=5, W=6], not dense, strides in channels-last order


def _time_innermost(seed=0):
    base = _seeded((6, 5, 4), seed, torch.float32, 1.5, 0.4)  # [W, H, T] contiguous
    return base.permute(2, 1, 0)  # [T=4, H=5, W=6]: time stride 1, W outermost in memory


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("time_slice", [False, True])
def test_dense_time_first_input_runs_on_a_view_and_outputs_keep_its_strides(memory_format, time_slice):
    x_seq = _seeded((5, 4, 5, 6), 1, torch.float32, 1.5, 0.4).contiguous(memory_format=memory_format)
    if time_slice:
        x_seq = x_seq[1:4]
    x_op, _ = _to_op_layout(x_seq)
    assert x_op.data_ptr() == x_seq.data_ptr()
    spike_seq, _, v_seq = plif_multistep(x_seq, torch.tensor(0.0), store_v_seq=True, backend="cpu")
    assert spike_seq.stride() == x_seq.stride() and v_seq.stride() == x_seq.stride()


def test_sliced_input_is_copied_once_and_outputs_keep_its_dim_order():
    x_seq = _channels_last_sliced()
    x_op, _ = _to_op_layout(x_seq)
    assert x_op.data_ptr() != x_seq.data_ptr() and x_op.is_contiguous()
    w, v_init = torch.tensor(-0.3), torch.tensor(0.1)
    (spike_seq, v_last, v_seq), grads = _outputs_and_grads(
        x_seq, w, v_init, lambda s, v, vs: s.sum() + v.sum() + vs.sum(), store_v_seq=True, backend="cpu"
    )
    for out in (spike_seq, v_seq):
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert v_last.permute(1, 2, 0).is_contiguous()  # [C, H, W] stored as H, W, C
    (ref_s, ref_v, ref_vs), ref_grads = _outputs_and_grads(
        x_seq, w, v_init, lambda s, v, vs: s.sum() + v.sum() + vs.sum(), store_v_seq=True, backend="torch"
    )
    assert torch.equal(spike_seq, ref_s)
    assert_membrane_close(v_seq, ref_vs)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_grad_close(grad, ref_grad, torch.float32, summed_terms=x_seq.numel())


def test_time_innermost_input_is_copied_to_time_first_with_its_step_order():
    x_seq = _time_innermost()
    x_op, order = _to_op_layout(x_seq)
    assert x_op.data_ptr() != x_seq.data_ptr() and x_op.is_contiguous()
    assert order == [1, 0]  # W then H, as in x_seq's memory
    spike_seq, v_last, v_seq = plif_multistep(x_seq, torch.tensor(-0.3), store_v_seq=True, backend="cpu")
    t, h, w = x_seq.shape
    assert spike_seq.stride() == (h * w, 1, h) and v_seq.stride() == (h * w, 1, h)
    assert v_last.stride() == (1, h)
    ref = plif_multistep(x_seq, torch.tensor(-0.3), store_v_seq=True, backend="torch")
    assert torch.equal(spike_seq, ref[0])
    assert_membrane_close(v_seq, ref[2])


# ---- dL/dw at large tau (docs/precision.md: precision of the tau gradient) ------------------------
def _w_grad(w_value, dtype, backend, x_seq, v_init, grad_spikes, grad_v_last):
    w = torch.tensor(w_value, dtype=dtype, requires_grad=True)
    spike_seq, v_last, _ = plif_multistep(x_seq.to(dtype), w, v_init.to(dtype), backend=backend)
    ((spike_seq * grad_spikes.to(dtype)).sum() + (v_last * grad_v_last.to(dtype)).sum()).backward()
    return w.grad.double()


@pytest.mark.parametrize("w_value", [-4.0, -8.0, -12.0])
def test_float32_tau_gradient_error_stays_within_the_documented_bound(w_value):
    """docs/precision.md: with decay_input the fp32 dL/dw carries a relative error below 2^-24 / k (tau times
    6e-8) against a float64 evaluation, since X - (V - V_r) is recovered as (H - V) / k."""
    steps, neurons = 8, 4096
    x_seq = _seeded((steps, neurons), 2).float()
    v_init = torch.rand(neurons, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.3 - 0.5
    grad_spikes, grad_v_last = _seeded((steps, neurons), 4), _seeded((neurons,), 5)
    args = (x_seq, v_init.float(), grad_spikes, grad_v_last)
    exact = _w_grad(w_value, torch.float64, "torch", *args)
    fused = _w_grad(w_value, torch.float32, "cpu", *args)
    k = 1.0 / (1.0 + math.exp(-w_value))
    assert abs(fused - exact) <= 2.0**-24 / k * abs(exact)


# ---- k underflows to 0 ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,w_value", [(torch.float32, -110.0), (torch.float16, -18.0), (torch.bfloat16, -95.0), (torch.float64, -750.0)]
)
def test_tau_gradient_is_zero_where_k_underflows(backend, device, dtype, w_value):
    x_seq = _seeded((5, 7), 6, dtype, 1.5, 0.4).to(device)
    w = torch.tensor([w_value, 0.0] * 3 + [w_value], dtype=dtype, device=device)  # per neuron: some k = 0
    v_init = _seeded((7,), 7, dtype).to(device)
    assert torch.sigmoid(w)[0].item() == 0.0

    def loss(spike_seq, v_last, v_seq):
        return (spike_seq * torch.arange(35, device=device).reshape(5, 7)).sum() + v_last.sum()

    outputs, grads = _outputs_and_grads(x_seq, w, v_init, loss, backend=backend)
    ref_outputs, ref_grads = _outputs_and_grads(x_seq, w, v_init, loss, backend="torch")
    assert torch.equal(outputs[0], ref_outputs[0])
    assert torch.isfinite(grads[1]).all()
    assert (grads[1][w == w_value] == 0).all()
    for grad, ref_grad in zip(grads, ref_grads):
        assert_grad_close(grad, ref_grad, dtype)


def test_second_derivative_is_finite_where_k_underflows(backend, device):
    # create_graph takes the differentiable recurrence (ops._differentiable_backward), which
    # recovers dH/dk by the same division by k as the kernels.

    def second_derivatives(chosen):
        x_seq = _seeded((5, 7), 6, torch.float32, 1.5, 0.4).to(device).requires_grad_()
        w = torch.tensor([-110.0, 0.0] * 3 + [-110.0], device=device, requires_grad=True)
        spike_seq, v_last, _ = plif_multistep(x_seq, w, backend=chosen)
        (grad_w,) = torch.autograd.grad(spike_seq.sum() + v_last.sum(), w, create_graph=True)
        return grad_w, torch.autograd.grad(grad_w.sum(), [x_seq, w])

    grad_w, second = second_derivatives(backend)
    ref_grad_w, ref_second = second_derivatives("torch")
    assert torch.isfinite(grad_w).all() and all(torch.isfinite(g).all() for g in second)
    assert_grad_close(grad_w, ref_grad_w, torch.float32)
    for grad, ref_grad in zip(second, ref_second):
        assert_grad_close(grad, ref_grad, torch.float32)


# ---- NaN / inf inputs with absent incoming gradients ---------------------------------------------
@pytest.mark.parametrize("loss_on", ["v_last", "v_seq"])
def test_absent_spike_gradient_adds_nothing_for_a_nan_input(backend, device, loss_on):
    """detach_reset, loss on the membrane only: no gradient reaches the spikes, so surrogate'(NaN)
    must not enter (the reference gives finite gradients for x here)."""
    x_seq = torch.tensor([[0.5, float("nan")], [0.5, 0.5]], device=device)
    w = torch.tensor(0.0, device=device)

    def loss(spike_seq, v_last, v_seq):
        return v_last.sum() if loss_on == "v_last" else v_seq[-1].sum()

    kwargs = dict(detach_reset=True, store_v_seq=loss_on == "v_seq")
    _, grads = _outputs_and_grads(x_seq, w, torch.tensor(0.0, device=device), loss, backend=backend, **kwargs)
    _, ref_grads = _outputs_and_grads(x_seq, w, torch.tensor(0.0, device=device), loss, backend="torch", **kwargs)
    torch.testing.assert_close(grads[0].cpu(), torch.tensor([[0.25, 0.25], [0.5, 0.5]]))
    for grad, ref_grad in zip(grads, ref_grads):
        assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("store_v_seq", [False, True])
@pytest.mark.parametrize("last_input", [float("inf"), -float("inf"), float("nan")])
def test_absent_membrane_gradient_at_the_last_step_adds_nothing(backend, device, store_v_seq, last_input):
    """Loss on the spikes only (v_last and v_seq unused): nothing reaches V[T-1], so dV/dH at T-1
    (NaN for an infinite or NaN H under a hard reset) must not enter."""
    x_seq = torch.tensor([[0.7, 0.2], [0.9, 1.4], [last_input, 0.3]], device=device)
    w, v_init = torch.tensor(-0.2, device=device), torch.tensor([0.1, 0.0], device=device)
    weights = torch.tensor([[1.0, -2.0], [0.5, 1.5], [3.0, -1.0]], device=device)

    def loss(spike_seq, v_last, v_seq):
        return (spike_seq * weights).sum()

    kwargs = dict(surrogate="atan", store_v_seq=store_v_seq)
    _, grads = _outputs_and_grads(x_seq, w, v_init, loss, backend=backend, **kwargs)
    _, ref_grads = _outputs_and_grads(x_seq, w, v_init, loss, backend="torch", **kwargs)
    if not math.isnan(last_input):  # surrogate'(inf) = 0: the earlier steps' gradients stay finite
        assert torch.isfinite(grads[0][:2]).all()
    for grad, ref_grad in zip(grads, ref_grads):
        assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("surrogate", ["sigmoid", "piecewise_quadratic", "piecewise_exp"])
def test_present_gradients_keep_a_nan_as_the_reference_does(backend, device, surrogate):
    """A gradient that arrives, even a zero one, meets surrogate'(NaN) = NaN, as in autograd."""
    x_seq = torch.tensor([[0.5, float("nan")], [0.5, 0.5]], device=device)
    w, v_init = torch.tensor(0.0, device=device), torch.tensor(0.0, device=device)

    def loss(spike_seq, v_last, v_seq):
        return (spike_seq * torch.tensor([[1.0, 0.0], [2.0, 0.0]], device=device)).sum()

    # detach_reset keeps dV/dH free of the surrogate, so only the spike path meets the NaN.
    _, grads = _outputs_and_grads(x_seq, w, v_init, loss, surrogate=surrogate, detach_reset=True, backend=backend)
    _, ref_grads = _outputs_and_grads(x_seq, w, v_init, loss, surrogate=surrogate, detach_reset=True, backend="torch")
    assert torch.isnan(grads[0][:, 1]).all() and torch.isfinite(grads[0][:, 0]).all()
    for grad, ref_grad in zip(grads, ref_grads):
        assert_grad_close(grad, ref_grad, torch.float32)


def test_backward_with_no_incoming_gradient_gives_zeros():
    """The op's contract: absent gradients are nothing, even where the saved H is NaN."""
    h_seq = torch.tensor([[0.5, float("nan")], [float("inf"), 0.2]])
    k, v_init = torch.tensor([0.5]), torch.tensor([0.0])
    grad_x, grad_k, grad_v_init = torch.ops.plif_cuda.multistep_backward(
        None,
        None,
        None,
        h_seq,
        None,
        k,
        v_init,
        x_dtype=torch.float32,
        **op_options(),
    )
    assert torch.equal(grad_x, torch.zeros(2, 2))
    # One value each, as k and v_init hold: the sums of the neurons' (zero) shares.
    assert torch.equal(grad_k, torch.zeros(1)) and torch.equal(grad_v_init, torch.zeros(1))


# ---- the reference's derivatives equal the spec's derivative column ------------------------------
@pytest.mark.parametrize("surrogate", SMOOTH_SURROGATES)
def test_smooth_primitive_derivative_is_the_spec_derivative(surrogate):
    """Including x = 0 (abs' would be 0), +-inf (torch.where's unselected branch) and large |x|
    (cancellation in 1 - sigmoid)."""
    alpha = DEFAULT_ALPHA[surrogate]
    points = [0.0, 1e-3, -1e-3, 0.5, -0.5, 30.0, -30.0]
    if surrogate != "soft_sign":  # its primitive is inf / inf = NaN at +-inf, in the kernels too
        points += [float("inf"), -float("inf")]
    x = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    (derivative,) = torch.autograd.grad(surrogate_primitive(surrogate, alpha, x).sum(), x)
    expected = surrogate_derivative(surrogate, alpha, x.detach())
    torch.testing.assert_close(derivative, expected, rtol=1e-12, atol=0.0)


def test_sigmoid_derivative_does_not_cancel_where_alpha_x_is_large():
    x = torch.tensor([6.0, 10.0, -10.0, 20.0])
    alpha = 4.0
    e = torch.exp(-alpha * x.double().abs())
    exact = alpha * e / (1 + e) ** 2
    torch.testing.assert_close(surrogate_derivative("sigmoid", alpha, x).double(), exact, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("alpha_scale", (1.0, 0.3, 2.9), ids=("default_alpha", "alpha_x0.3", "alpha_x2.9"))
@pytest.mark.parametrize("surrogate", ("sigmoid", "piecewise_exp", "erf"))
def test_cpu_surrogate_derivative_over_the_whole_range_of_exp(surrogate, alpha_scale):
    """The CPU kernel's exp (plif_math.h, vectorised, not libm's) in each derivative that uses it,
    from exp(0) down through subnormal results to 0: one step, dL/dS = 1 and k = 1, so dL/dX is
    the derivative itself, against the same formula in float32 torch ops (libm's exp). Alphas that
    are not powers of two as well: the exp's reduction starts from |x| and alpha / ln 2."""
    alpha = DEFAULT_ALPHA[surrogate] * alpha_scale
    reach = (120.0 / alpha) if surrogate != "erf" else math.sqrt(120.0) / alpha  # exp(-120) rounds to 0
    h_seq = (1.0 + torch.linspace(-reach, reach, 40001)).reshape(1, -1)
    grad_x, _, _ = torch.ops.plif_cuda.multistep_backward(
        torch.ones_like(h_seq),
        None,
        None,
        h_seq,
        None,
        torch.ones(1),
        torch.zeros(1),
        x_dtype=torch.float32,
        v_threshold=1.0,
        v_reset=0.0,
        decay_input=True,
        detach_reset=False,
        surrogate=surrogate,
        alpha=alpha,
        spiking=True,
    )
    expected = surrogate_derivative(surrogate, alpha, h_seq - 1.0)
    smallest_subnormal = 2.0**-149
    # The range reaches subnormal results and results that round to 0.
    assert ((expected < 2.0**-126) & (expected > 0)).sum() > 100 and (expected == 0).sum() > 100
    # A subnormal exp within a unit of libm's, times up to alpha in the derivative.
    torch.testing.assert_close(grad_x, expected, rtol=3e-7, atol=max(4.0, alpha) * smallest_subnormal)


def test_smooth_piecewise_exp_gradient_at_the_threshold(backend, device):
    """H = V_th exactly (0 + 0.5 (2 - 0) = 1): dS/dx = k alpha / 2 = 0.25, in the reference too."""
    x_seq = torch.tensor([[2.0]], dtype=torch.float64, device=device)
    for name in (backend, "torch"):
        (spike_seq, _, _), grads = _outputs_and_grads(
            x_seq,
            torch.tensor(0.0, dtype=torch.float64, device=device),
            torch.tensor(0.0, dtype=torch.float64, device=device),
            lambda s, v, vs: s.sum(),
            surrogate="piecewise_exp",
            spiking=False,
            backend=name,
        )
        assert spike_seq.item() == 0.5
        assert grads[0].item() == 0.25


# ---- reduced gradients do not depend on the thread count -----------------------------------------
@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", ["per_layer", "per_layer_with_a_tail", "per_channel_channels_last"])
def test_reduced_gradients_are_bitwise_equal_for_any_thread_count(case, restore_threads):
    if case.startswith("per_layer"):
        # Above torch's parallel grain; the tail: neurons after the kernel's last 1024-neuron block.
        neurons = (1 << 17) + (300 if case.endswith("tail") else 0)
        x_seq = _seeded((4, neurons), 8, torch.float32, 1.5, 0.4)
        w, v_init = torch.tensor(-0.3), torch.tensor(0.05)
    else:
        x_seq = _seeded((4, 8, 16, 24, 24), 8, torch.float32, 1.5, 0.4)
        x_seq = x_seq.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x_seq.shape)
        w, v_init = torch.full((16, 1, 1), -0.3), torch.full((16, 1, 1), 0.05)
    grad_spikes = _seeded(x_seq.shape, 9, torch.float32)

    def loss(spike_seq, v_last, v_seq):
        return (spike_seq * grad_spikes).sum() + v_last.sum()

    results = []
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        _, grads = _outputs_and_grads(x_seq, w, v_init, loss, backend="cpu")
        results.append(grads)
    for grads in results[1:]:
        for grad, first in zip(grads, results[0]):
            assert torch.equal(grad, first)
