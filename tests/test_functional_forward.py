"""SpikingJelly's functional API on our layers: ``single_step_functional_forward`` and
``multi_step_functional_forward`` (pure transitions of an explicit membrane), against
SpikingJelly's own nodes and against our stateful forward; ``functional_forward`` and
``to_functional_forward``; torch.func over them.

Tests named ``test_sj_*`` need SpikingJelly; the others also run where it cannot be imported
(``test_without_spikingjelly``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import plif_cuda
from helpers import (
    NEURON_OPTIONS,
    assert_grad_close,
    assert_membrane_close,
    assert_passes_without_spikingjelly,
    make_seq,
    needs_spikingjelly,
    random_weights_like,
    sj_base,
    sj_neuron,
    sj_surrogate,
)

STEP_SHAPE = (3, 37)


def _layer(kind, backend="cpu", **kwargs):
    if kind == "plif":
        return plif_cuda.ParametricLIFNode(init_tau=3.0, backend=backend, **kwargs)
    return plif_cuda.LIFNode(tau=3.0, backend=backend, **kwargs)


def _membrane(seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(STEP_SHAPE, generator=generator) * 0.4).to(device)


def _loss(outputs, states, seed=3):
    (spikes,), (v,) = outputs, states
    return (spikes * random_weights_like(spikes, seed)).sum() + (v * random_weights_like(v, seed + 1)).sum()


def _functional_and_grads(layer, step_mode, x, v0):
    """The functional forward from a leaf membrane ``v0``, and d(loss)/d(x, v0, w)."""
    x = x.clone().requires_grad_()
    v0 = v0.clone().requires_grad_()
    method = layer.multi_step_functional_forward if step_mode == "m" else layer.single_step_functional_forward
    outputs, states = method((x,), (v0,))
    w = getattr(layer, "w", None)
    wanted = [x, v0] + ([w] if isinstance(w, nn.Parameter) else [])
    grads = torch.autograd.grad(_loss(outputs, states), wanted)
    return outputs[0].detach(), states[0].detach(), grads


# ---- against our stateful forward ----------------------------------------------------------------
@pytest.mark.parametrize("step_mode", ("s", "m"))
@pytest.mark.parametrize("kind", ("plif", "lif"))
@pytest.mark.parametrize("options", NEURON_OPTIONS)
def test_functional_equals_stateful_forward(options, kind, step_mode, backend, device):
    layer = _layer(kind, backend, step_mode=step_mode, surrogate_function="atan", **options).to(device)
    x = make_seq((6, *STEP_SHAPE) if step_mode == "m" else STEP_SHAPE, device=device, seed=1)
    v0 = _membrane(2, device)
    spikes, v_next, grads = _functional_and_grads(layer, step_mode, x, v0)
    assert spikes.any() and not spikes.all()

    stateful = copy.deepcopy(layer)
    x_leaf = x.clone().requires_grad_()
    v_leaf = v0.clone().requires_grad_()
    stateful.v = v_leaf
    out = stateful(x_leaf)
    w = getattr(stateful, "w", None)
    wanted = [x_leaf, v_leaf] + ([w] if isinstance(w, nn.Parameter) else [])
    expected_grads = torch.autograd.grad(_loss((out,), (stateful.v,)), wanted)
    assert torch.equal(spikes, out.detach())
    assert_membrane_close(v_next, stateful.v.detach())
    for got, expected in zip(grads, expected_grads):
        assert_grad_close(got, expected, torch.float32, summed_terms=x.numel())


@pytest.mark.parametrize("step_mode", ("s", "m"))
@pytest.mark.parametrize("kind", ("plif", "lif"))
def test_functional_forward_is_pure_and_backs_the_regular_forward(kind, step_mode):
    """The layer's memories stay the very objects they were (v and v_seq), the regular forward
    then gives the same outputs and lands on the returned state, and the gradient reaches the
    explicit state."""
    layer = _layer(kind, step_mode=step_mode, store_v_seq=True)
    x = make_seq((4, *STEP_SHAPE) if step_mode == "m" else STEP_SHAPE, seed=4)
    v = _membrane(5).requires_grad_()
    layer.v = v
    layer.v_seq = None
    before = tuple(layer.memories())

    outputs, states = layer.functional_forward((x,), before)

    assert all(now is then for now, then in zip(layer.memories(), before))
    assert layer.v_seq is None, "the functional forward must not record a v_seq"
    assert torch.equal(layer(x), outputs[0])
    assert torch.equal(layer.v, states[0])
    (outputs[0].sum() + states[0].sum()).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ("plif", "lif"))
def test_float_state_and_chained_steps(kind):
    """A float state (the registered reset value) works as a membrane everywhere, and T single
    functional steps chained by hand equal one multi-step call."""
    layer = _layer(kind, v_reset=-0.2)
    x_seq = make_seq((5, *STEP_SHAPE), seed=6)
    (spike_seq,), (v_last,) = layer.multi_step_functional_forward((x_seq,), (-0.2,))
    state, spikes = (-0.2,), []
    for x in x_seq:
        (spike,), state = layer.single_step_functional_forward((x,), state)
        spikes.append(spike)
    assert torch.equal(torch.stack(spikes), spike_seq)
    assert_membrane_close(state[0], v_last)
    assert layer.v == -0.2


def test_half_input_keeps_the_state_in_float32():
    layer = _layer("plif", step_mode="m")
    x_seq = make_seq((4, *STEP_SHAPE), torch.bfloat16, seed=7)
    (spike_seq,), (v_last,) = layer.functional_forward((x_seq,), (0.0,))
    assert spike_seq.dtype == torch.bfloat16 and v_last.dtype == torch.float32
    layer(x_seq)
    assert torch.equal(layer.v, v_last)


@pytest.mark.parametrize("method", ("single_step_functional_forward", "multi_step_functional_forward"))
def test_bad_functional_arguments_are_named(method):
    layer = _layer("plif")
    x = make_seq((2, *STEP_SHAPE))
    call = getattr(layer, method)
    with pytest.raises(ValueError, match="states must be a tuple holding one state"):
        call((x,), ())
    with pytest.raises(ValueError, match="states must be a tuple holding one state"):
        call((x,), (0.0, 0.0))
    with pytest.raises(TypeError, match="inputs must be a tuple holding one tensor"):
        call((x, x), (0.0,))
    with pytest.raises(TypeError, match="inputs must be a tuple holding one tensor"):
        call(x, (0.0,))
    with pytest.raises(TypeError, match="the state v must be a float or a tensor"):
        call((x,), ("0",))
    with pytest.raises(TypeError, match="keyword"):
        call((x,), (0.0,), scale=2.0)
    with pytest.raises(ValueError, match="the state v has shape"):
        call((x,), (torch.zeros(4, 4),))


# ---- torch.func ------------------------------------------------------------------------------------
def test_torch_func_grad_through_the_functional_forward():
    """torch.func.functional_call + torch.func.grad over the pure transition (the op's
    autograd cannot run inside a transform; the layer takes the reference path there) equals
    autograd through the fused op."""
    layer = _layer("plif", step_mode="m", surrogate_function="atan")
    x_seq = make_seq((5, *STEP_SHAPE), seed=8)
    v0 = _membrane(9)
    params = {"w": layer.w.detach().clone()}

    def loss_of(params, x_seq, v0):
        return _loss(*_call_functional(layer, params, x_seq, v0))

    grads = torch.func.grad(loss_of, argnums=(0, 1, 2))(params, x_seq, v0)
    _, _, expected = _functional_and_grads(layer, "m", x_seq, v0)
    assert_grad_close(grads[1], expected[0], torch.float32)
    assert_grad_close(grads[2], expected[1], torch.float32)
    assert_grad_close(grads[0]["w"], expected[2], torch.float32, summed_terms=x_seq.numel())


class _Transition(nn.Module):
    """A layer's multi-step functional forward as a module's forward, for functional_call."""

    def __init__(self, node):
        super().__init__()
        self.node = node

    def forward(self, x_seq, v0):
        return self.node.multi_step_functional_forward((x_seq,), (v0,))


def _call_functional(layer, params, x_seq, v0):
    named = {f"node.{name}": value for name, value in params.items()}
    return torch.func.functional_call(_Transition(layer), named, (x_seq, v0))


# ---- against SpikingJelly's own nodes --------------------------------------------------------------
def _sj_pair(kind, surrogate, **options):
    if kind == "plif":
        theirs = sj_neuron.ParametricLIFNode(init_tau=3.0, surrogate_function=surrogate, **options)
        ours = plif_cuda.ParametricLIFNode(init_tau=3.0, surrogate_function=surrogate, backend="cpu", **options)
    else:
        theirs = sj_neuron.LIFNode(tau=3.0, surrogate_function=surrogate, **options)
        ours = plif_cuda.LIFNode(tau=3.0, surrogate_function=surrogate, backend="cpu", **options)
    return theirs, ours


@needs_spikingjelly
@pytest.mark.parametrize("step_mode", ("s", "m"))
@pytest.mark.parametrize("kind", ("plif", "lif"))
@pytest.mark.parametrize("options", NEURON_OPTIONS)
@pytest.mark.parametrize("surrogate_name", ("Sigmoid", "ATan"))
def test_sj_functional_forward_equals_spikingjelly(surrogate_name, options, kind, step_mode):
    theirs, ours = _sj_pair(kind, getattr(sj_surrogate, surrogate_name)(), **options)
    x = make_seq((6, *STEP_SHAPE) if step_mode == "m" else STEP_SHAPE, seed=11)
    v0 = _membrane(12)
    sj_spikes, sj_v, sj_grads = _functional_and_grads(theirs, step_mode, x, v0)
    spikes, v, grads = _functional_and_grads(ours, step_mode, x, v0)
    assert spikes.any() and not spikes.all()
    assert torch.equal(spikes, sj_spikes)
    assert_membrane_close(v, sj_v)
    for got, expected in zip(grads, sj_grads):
        assert_grad_close(got, expected, torch.float32, summed_terms=x.numel())


@needs_spikingjelly
@pytest.mark.parametrize("kind", ("plif", "lif"))
def test_sj_to_functional_forward_runs_our_transition(kind, monkeypatch):
    """SpikingJelly flattens a Sequential of our layers into their functional forwards (not its
    stateful fallback), and the result equals the stateful network; the network's memories are
    left alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), _layer(kind, step_mode="m"), nn.Linear(7, 4), _layer(kind, step_mode="m"))
    x_seq = make_seq((4, 2, 5), seed=13, scale=3.0)
    calls = []
    original = type(net[1]).multi_step_functional_forward

    def counted(self, inputs, states, **kwargs):
        calls.append(self)
        return original(self, inputs, states, **kwargs)

    monkeypatch.setattr(type(net[1]), "multi_step_functional_forward", counted)
    states = (_membrane(14)[:2, :7].clone(), 0.0)
    outputs, updated = sj_base.to_functional_forward(net)((x_seq,), states)
    assert calls == [net[1], net[3]]
    assert net[1].v == 0.0 and net[3].v == 0.0
    net[1].v = states[0]
    assert torch.equal(net(x_seq), outputs[0])
    assert torch.equal(net[1].v, updated[0]) and torch.equal(net[3].v, updated[1])


@needs_spikingjelly
def test_sj_checkpointed_functional_forward_equals_plain():
    """SpikingJelly's memopt checkpointing over our layer (it calls the functional forward
    when recomputing) gives the gradients of the plain layer."""
    from spikingjelly.activation_based.memopt import checkpointing

    x_seq = make_seq((6, 2, 5), seed=15, scale=3.0)
    results = []
    for wrap in (False, True):
        layer = _layer("plif", step_mode="m")
        node = checkpointing.checkpoint_module(layer) if wrap else layer
        x_leaf = x_seq.clone().requires_grad_()
        out = node(x_leaf)
        _loss((out,), (layer.v,)).backward()
        results.append((out.detach(), layer.v.detach(), x_leaf.grad, layer.w.grad))
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-7)


# ---- without SpikingJelly ---------------------------------------------------------------------------
def test_without_spikingjelly():
    """This file's SpikingJelly-free tests, where SpikingJelly cannot be imported: the stand-in
    MemoryModule gives the same functional_forward."""
    assert_passes_without_spikingjelly(__file__)
