"""ParametricLIFNode / LIFNode: state across calls, parameters, surrogates, state_dict."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import plif_cuda
from helpers import BACKEND_DEVICE, assert_grad_close, assert_membrane_close, make_seq, random_weights_like
from plif_cuda import surrogate as plif_surrogate


def _layer(backend, **kwargs):
    return plif_cuda.ParametricLIFNode(backend=backend, **kwargs).to(BACKEND_DEVICE[backend])


@pytest.mark.parametrize("v_reset", (0.0, None), ids=("hard", "soft"))
@pytest.mark.parametrize("tau_shape", ((), (3, 1)), ids=("layer_tau", "channel_tau"))
def test_single_step_calls_equal_multi_step(backend, device, v_reset, tau_shape):
    x_seq = make_seq((7, 2, 3, 67), torch.float32, device).requires_grad_()
    single = _layer(backend, step_mode="s", v_reset=v_reset, tau_shape=tau_shape, init_tau=3.0)
    multi = _layer(backend, step_mode="m", v_reset=v_reset, tau_shape=tau_shape, init_tau=3.0)

    stepped = torch.stack([single(x) for x in x_seq])
    loss_single = (stepped * random_weights_like(stepped, 1)).sum() + (
        single.v * random_weights_like(single.v, 2)
    ).sum()
    grad_x_single, grad_w_single = torch.autograd.grad(loss_single, (x_seq, single.w))

    spikes = multi(x_seq)
    loss_multi = (spikes * random_weights_like(spikes, 1)).sum() + (multi.v * random_weights_like(multi.v, 2)).sum()
    grad_x_multi, grad_w_multi = torch.autograd.grad(loss_multi, (x_seq, multi.w))

    assert torch.equal(stepped, spikes)
    assert_membrane_close(single.v, multi.v)
    assert_grad_close(grad_x_single, grad_x_multi, torch.float32)
    assert_grad_close(grad_w_single, grad_w_multi, torch.float32, summed_terms=x_seq.numel() // single.w.numel())


def test_membrane_persists_and_carries_gradient_across_calls(backend, device):
    first = make_seq((3, 2, 67), torch.float32, device, seed=1).requires_grad_()
    second = make_seq((4, 2, 67), torch.float32, device, seed=2).requires_grad_()
    layer = _layer(backend, step_mode="m", store_v_seq=True)
    layer(first)
    v_after_first = layer.v
    assert isinstance(v_after_first, torch.Tensor) and v_after_first.grad_fn is not None
    out = layer(second)
    loss = (out * random_weights_like(out, 3)).sum() + (layer.v_seq * random_weights_like(layer.v_seq, 4)).sum()
    grad_first, grad_w = torch.autograd.grad(loss, (first, layer.w))
    assert grad_first.abs().sum() > 0, "no gradient reached the previous call's input through v"

    # One call on the concatenated sequence, with the loss on the second part only.
    whole = torch.cat([first, second])
    one_call = _layer(backend, step_mode="m", store_v_seq=True)
    out_whole = one_call(whole)
    loss_whole = (out_whole[3:] * random_weights_like(out, 3)).sum()
    loss_whole = loss_whole + (one_call.v_seq[3:] * random_weights_like(layer.v_seq, 4)).sum()
    grad_whole, grad_w_whole = torch.autograd.grad(loss_whole, (whole, one_call.w))
    assert torch.equal(out, out_whole[3:])
    assert_grad_close(grad_first, grad_whole[:3], torch.float32)
    assert_grad_close(grad_w, grad_w_whole, torch.float32, summed_terms=whole.numel())


@pytest.mark.parametrize("v_reset", (-0.3, None), ids=("hard", "soft"))
def test_reset(backend, device, v_reset):
    x_seq = make_seq((5, 2, 67), torch.float32, device)
    layer = _layer(backend, step_mode="m", v_reset=v_reset, store_v_seq=True)
    first = layer(x_seq)
    assert layer.v_seq is not None
    layer(x_seq)
    layer.reset()
    assert layer.v == (0.0 if v_reset is None else v_reset) and layer.v_seq is None
    assert torch.equal(layer(x_seq), first)


def test_store_v_seq(backend, device):
    x_seq = make_seq((6, 2, 67), torch.float32, device)
    layer = _layer(backend, step_mode="m", store_v_seq=True, v_reset=None)
    layer(x_seq)
    _, v_last, v_seq = plif_cuda.plif_multistep(x_seq, layer.w, v_reset=None, store_v_seq=True, backend="torch")
    assert layer.v_seq.shape == x_seq.shape
    assert_membrane_close(layer.v_seq, v_seq)
    assert torch.equal(layer.v_seq[-1], layer.v)
    without = _layer(backend, step_mode="m")
    without(x_seq)
    assert without.v_seq is None


def test_parameter_w_and_tau():
    layer = plif_cuda.ParametricLIFNode(init_tau=3.0)
    assert [name for name, _ in layer.named_parameters()] == ["w"]
    assert layer.w.shape == () and layer.w.requires_grad
    assert layer.w.item() == pytest.approx(-math.log(3.0 - 1.0))
    assert plif_cuda.ParametricLIFNode().w.item() == 0.0  # init_tau=2 gives w0 = 0
    assert layer.tau.item() == pytest.approx(3.0)
    assert "tau=3.0000" in repr(layer)


def test_tau_shape_per_channel():
    layer = plif_cuda.ParametricLIFNode(init_tau=4.0, tau_shape=(5, 1, 1), step_mode="m")
    assert layer.w.shape == (5, 1, 1)
    assert torch.allclose(layer.tau, torch.full((5, 1, 1), 4.0))
    assert "shape (5, 1, 1)" in repr(layer)
    x_seq = make_seq((3, 2, 5, 4, 4), torch.float32)
    layer(x_seq).sum().backward()
    assert layer.w.grad.shape == (5, 1, 1)


def test_lif_has_a_constant_tau():
    layer = plif_cuda.LIFNode(tau=5.0, step_mode="m")
    assert list(layer.parameters()) == [] and list(layer.buffers()) == []
    assert layer.tau == 5.0 and "tau=5.0000" in repr(layer)
    x_seq = make_seq((4, 2, 67), torch.float32).requires_grad_()
    spikes = layer(x_seq)
    ref_spikes, _, _ = plif_cuda.plif_multistep(x_seq, torch.tensor(-math.log(4.0)), backend="torch")
    assert torch.equal(spikes, ref_spikes)
    spikes.sum().backward()
    assert x_seq.grad is not None


@pytest.mark.parametrize(
    "surrogate_function",
    [
        "atan",
        plif_surrogate.ATan(alpha=3.0),
        plif_surrogate.Erf(),
        plif_surrogate.Sigmoid(alpha=2.0, spiking=False),
    ],
    ids=("name", "ATan3", "Erf", "Sigmoid-smooth"),
)
def test_known_surrogates_use_the_fused_path(surrogate_function):
    layer = plif_cuda.ParametricLIFNode(step_mode="m", surrogate_function=surrogate_function, backend="cpu")
    name, alpha, spiking = plif_surrogate.describe_surrogate(surrogate_function)
    x_seq = make_seq((4, 2, 67), torch.float32).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spikes = layer(x_seq)
    ref, _, _ = plif_cuda.plif_multistep(x_seq, layer.w, surrogate=name, alpha=alpha, spiking=spiking, backend="torch")
    assert_membrane_close(spikes, ref)
    grad_fused = torch.autograd.grad((spikes * random_weights_like(spikes, 1)).sum(), x_seq)[0]
    grad_ref = torch.autograd.grad((ref * random_weights_like(ref, 1)).sum(), x_seq)[0]
    assert_grad_close(grad_fused, grad_ref, torch.float32)


def test_any_callable_surrogate_falls_back_with_one_warning(backend, device):
    atan = plif_surrogate.ATan(alpha=3.0)

    def my_surrogate(x):
        return atan(x)

    x_seq = make_seq((5, 2, 67), torch.float32, device)
    fallback = _layer(backend, step_mode="m", surrogate_function=my_surrogate, store_v_seq=True, v_reset=None)
    fused = _layer(backend, step_mode="m", surrogate_function=atan, store_v_seq=True, v_reset=None)
    x_fallback = x_seq.clone().requires_grad_()
    x_fused = x_seq.clone().requires_grad_()
    with pytest.warns(
        RuntimeWarning,
        match=r"surrogate_function \(function .*my_surrogate\) runs on the PyTorch time loop: it is not a surrogate",
    ) as caught:
        out_fallback = [fallback(x_fallback), fallback(x_fallback)]
    assert len([w for w in caught if "surrogate_function" in str(w.message)]) == 1
    out_fused = [fused(x_fused), fused(x_fused)]
    for a, b in zip(out_fallback, out_fused):
        assert torch.equal(a, b)
    assert_membrane_close(fallback.v, fused.v)
    assert_membrane_close(fallback.v_seq, fused.v_seq)
    loss_fallback = sum((o * random_weights_like(o, i)).sum() for i, o in enumerate(out_fallback)) + fallback.v.sum()
    loss_fused = sum((o * random_weights_like(o, i)).sum() for i, o in enumerate(out_fused)) + fused.v.sum()
    loss_fallback.backward()
    loss_fused.backward()
    assert_grad_close(x_fallback.grad, x_fused.grad, torch.float32)
    assert_grad_close(fallback.w.grad, fused.w.grad, torch.float32, summed_terms=2 * x_seq.numel())


def test_state_dict_round_trip():
    layer = plif_cuda.ParametricLIFNode(init_tau=2.5, tau_shape=(3, 1), step_mode="m")
    with torch.no_grad():
        layer.w.add_(torch.tensor([[0.1], [-0.2], [0.3]]))
    state = layer.state_dict()
    assert list(state) == ["w"]
    restored = plif_cuda.ParametricLIFNode(tau_shape=(3, 1), step_mode="m")
    restored.load_state_dict(state)
    assert torch.equal(restored.w, layer.w)
    x_seq = make_seq((4, 2, 3, 5), torch.float32)
    assert torch.equal(restored(x_seq), layer(x_seq))
    assert plif_cuda.LIFNode(tau=3.0).state_dict() == {}  # tau is a constant, as in SpikingJelly


@pytest.mark.parametrize("second_shape", ((2, 4, 5), (2, 5)), ids=("other_batch", "fewer_dims"))
def test_input_shape_change_needs_reset(second_shape):
    # The stored membrane [3, 5] broadcasts with a [5] step but not to it: the error names it too.
    layer = plif_cuda.ParametricLIFNode(step_mode="m")
    layer(make_seq((2, 3, 5), torch.float32))
    with pytest.raises(ValueError, match="stored membrane v .*reset"):
        layer(make_seq(second_shape, torch.float32))
    layer.reset()
    assert layer(make_seq(second_shape, torch.float32)).shape == second_shape


def test_lif_node_takes_the_parametric_nodes_arguments_with_a_fixed_tau():
    """SpikingJelly's LIFNode order: tau, decay_input, v_threshold, v_reset, surrogate_function,
    detach_reset, step_mode, backend, store_v_seq."""
    surrogate = plif_cuda.surrogate.ATan()
    layer = plif_cuda.LIFNode(3.0, False, 0.5, None, surrogate, True, "m", "cpu", True)
    assert (layer.tau, layer.decay_input, layer.v_threshold, layer.v_reset) == (3.0, False, 0.5, None)
    assert layer.surrogate_function is surrogate and layer.detach_reset
    assert (layer.step_mode, layer.backend, layer.store_v_seq) == ("m", "cpu", True)
    with pytest.raises(TypeError, match="positional"):
        plif_cuda.LIFNode(3.0, False, 0.5, None, surrogate, True, "m", "cpu", True, (2,))
    for name, value in (("init_tau", 3.0), ("tau_shape", (2,)), ("learnable_tau", False)):
        with pytest.raises(TypeError, match=name):
            plif_cuda.LIFNode(**{name: value})
