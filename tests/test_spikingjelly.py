"""Drop-in equality with SpikingJelly's ParametricLIFNode (skipped when SpikingJelly is absent)."""

from __future__ import annotations

import inspect
import itertools
import warnings

import pytest
import torch

import plif_cuda
from helpers import assert_grad_close, assert_membrane_close, distance_to_threshold, make_seq, random_weights_like
from plif_cuda import backends as plif_backends

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
sj_functional = pytest.importorskip("spikingjelly.activation_based.functional")

SJ_SURROGATES = ("Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "SoftSign", "SuperSpike", "Erf")
STEP_SHAPE = (3, 67)


def _sj_layer(**kwargs):
    # SpikingJelly 0.0.0.0.14 takes backend= ('torch' is its Python loop); 2.0.0 dropped it and
    # runs its own CPU implementation, whose charge has the same operation order as ours.
    if "backend" in inspect.signature(sj_neuron.ParametricLIFNode.__init__).parameters:
        kwargs["backend"] = "torch"
    return sj_neuron.ParametricLIFNode(step_mode="m", **kwargs)


def _inputs_away_from_threshold(v_reset, decay_input, init_tau):
    """Spikes are compared exactly, so the inputs keep every H at least 1e-4 from the threshold.

    Versions of SpikingJelly round the charge differently from us in places (0.0.0.0.14 charges
    decay_input=False, v_reset=0 as ``v * (1 - k) + x`` where we compute ``v - k * (v - v_r) + x``);
    those differences are a few float32 ulps and cannot flip a spike with this margin, so any
    spike mismatch is a real difference in the model, not rounding.
    """
    w = torch.tensor(-torch.log(torch.tensor(init_tau - 1.0)).item())
    for seed in range(100):
        x_seq = make_seq((8, *STEP_SHAPE), torch.float32, seed=seed, scale=1.2, shift=0.5)
        if distance_to_threshold(x_seq, w, None, v_reset, decay_input) > 1e-4:
            return x_seq
    raise AssertionError("could not draw inputs away from the threshold")


def _run(layer, x_seq, seed=10):
    x_leaf = x_seq.clone().requires_grad_()
    spikes = layer(x_leaf)
    v = layer.v
    loss = (spikes * random_weights_like(spikes, seed)).sum() + (v * random_weights_like(v, seed + 1)).sum()
    if layer.v_seq is not None:
        loss = loss + (layer.v_seq * random_weights_like(layer.v_seq, seed + 2)).sum()
    loss.backward()
    return spikes.detach(), v.detach(), x_leaf.grad, layer.w.grad


@pytest.mark.parametrize(
    "decay_input, v_reset, detach_reset", list(itertools.product((True, False), (0.0, -0.5, None), (False, True)))
)
@pytest.mark.parametrize("surrogate_name", SJ_SURROGATES)
def test_equal_to_spikingjelly(surrogate_name, decay_input, v_reset, detach_reset):
    options = dict(init_tau=3.0, decay_input=decay_input, v_reset=v_reset, detach_reset=detach_reset, store_v_seq=True)
    surrogate_class = getattr(sj_surrogate, surrogate_name)
    x_seq = _inputs_away_from_threshold(v_reset, decay_input, init_tau=3.0)
    theirs = _sj_layer(surrogate_function=surrogate_class(), **options)
    ours = plif_cuda.ParametricLIFNode(step_mode="m", surrogate_function=surrogate_class(), backend="cpu", **options)
    sj_spikes, sj_v, sj_grad_x, sj_grad_w = _run(theirs, x_seq)
    spikes, v, grad_x, grad_w = _run(ours, x_seq)
    assert spikes.any() and not spikes.all()
    assert torch.equal(spikes, sj_spikes)
    assert_membrane_close(v, sj_v)
    assert_grad_close(grad_x, sj_grad_x, torch.float32)
    assert_grad_close(grad_w, sj_grad_w, torch.float32, summed_terms=x_seq.numel())


@pytest.mark.parametrize("surrogate_name", ("Sigmoid", "ATan"))
def test_two_calls_equal_spikingjelly(surrogate_name):
    """State carried across calls (and its gradient) matches too."""
    surrogate_class = getattr(sj_surrogate, surrogate_name)
    x_seq = _inputs_away_from_threshold(0.0, True, init_tau=2.0)
    results = []
    for layer in (
        _sj_layer(surrogate_function=surrogate_class()),
        plif_cuda.ParametricLIFNode(step_mode="m", surrogate_function=surrogate_class()),
    ):
        x_leaf = x_seq.clone().requires_grad_()
        first = layer(x_leaf[:4])
        second = layer(x_leaf[4:])
        (second * random_weights_like(second, 3)).sum().backward()
        results.append((torch.cat([first, second]).detach(), x_leaf.grad, layer.w.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert_grad_close(results[1][1], results[0][1], torch.float32)
    assert_grad_close(results[1][2], results[0][2], torch.float32, summed_terms=x_seq.numel())


@pytest.mark.parametrize("surrogate_name", SJ_SURROGATES)
def test_spikingjelly_surrogates_keep_the_fused_path(surrogate_name, monkeypatch):
    surrogate = getattr(sj_surrogate, surrogate_name)(alpha=1.5)
    assert plif_cuda.surrogate.describe_surrogate(surrogate)[:2] == (
        plif_cuda.surrogate.SPIKINGJELLY_CLASS_NAMES[surrogate_name],
        1.5,
    )
    fused_calls = []
    real_forward_op = plif_backends.forward_op
    monkeypatch.setattr(
        plif_backends, "forward_op", lambda backend: fused_calls.append(backend) or real_forward_op(backend)
    )
    layer = plif_cuda.ParametricLIFNode(step_mode="m", surrogate_function=surrogate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(make_seq((3, *STEP_SHAPE), torch.float32))
    assert fused_calls == ["cpu"]


@pytest.mark.parametrize("surrogate_name", ("Sigmoid", "ATan"))
def test_spikingjelly_smooth_surrogate(surrogate_name):
    """SpikingJelly's ``spiking=False`` surrogates run our smooth mode (the primitive in forward)."""
    surrogate_class = getattr(sj_surrogate, surrogate_name)
    x_seq = make_seq((5, *STEP_SHAPE), torch.float32)
    theirs = _sj_layer(surrogate_function=surrogate_class(spiking=False))
    ours = plif_cuda.ParametricLIFNode(step_mode="m", surrogate_function=surrogate_class(spiking=False))
    sj_out, sj_v, sj_grad_x, _ = _run(theirs, x_seq)
    out, v, grad_x, _ = _run(ours, x_seq)
    assert_membrane_close(out, sj_out)
    assert_membrane_close(v, sj_v)
    assert_grad_close(grad_x, sj_grad_x, torch.float32)


def test_reset_net_resets_our_layer():
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 5), plif_cuda.ParametricLIFNode(step_mode="m", v_reset=-0.1, store_v_seq=True)
    )
    first = net(make_seq((3, 2, 5), torch.float32))
    assert isinstance(net[1].v, torch.Tensor) and net[1].v_seq is not None
    sj_functional.reset_net(net)
    assert net[1].v == -0.1 and net[1].v_seq is None
    assert torch.equal(net(make_seq((3, 2, 5), torch.float32)), first)
