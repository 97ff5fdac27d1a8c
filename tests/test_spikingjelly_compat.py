"""The SpikingJelly drop-in (plif_cuda/spikingjelly_compat.py and the layers' side of it), around
the math: SpikingJelly's stateful-module protocol and tools, dtype and device conversion of the
membrane, state_dicts, chunked half sequences, tensor alphas, ``patch_spikingjelly``; and its
functional API on our layers: ``single_step_functional_forward`` and
``multi_step_functional_forward`` (pure transitions of an explicit membrane) against SpikingJelly's
own nodes and against our stateful forward, ``functional_forward``, ``to_functional_forward`` and
torch.func over them. The math itself against SpikingJelly's node is in test_spikingjelly.py.

Tests named ``test_sj_*`` need SpikingJelly; the others also run in a subprocess where
SpikingJelly cannot be imported (``test_without_spikingjelly``).
"""

from __future__ import annotations

import copy
import math
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import plif_cuda
from helpers import (
    BACKEND_DEVICE,
    BACKENDS,
    HAVE_SPIKINGJELLY,
    NEURON_OPTIONS,
    assert_grad_close,
    assert_membrane_close,
    assert_passes_without_spikingjelly,
    make_seq,
    needs_spikingjelly,
    op_options,
    random_weights_like,
    sj_base,
    sj_neuron,
    sj_surrogate,
)
from plif_cuda import backends as plif_backends
from plif_cuda import surrogate as plif_surrogate
from plif_cuda.spikingjelly_compat import MemoryModule

LAYERS = {
    "plif": lambda **kw: plif_cuda.ParametricLIFNode(init_tau=3.0, **kw),
    "lif": lambda **kw: plif_cuda.LIFNode(tau=3.0, **kw),
}


def _sj():
    from spikingjelly.activation_based import base, functional, neuron, surrogate
    from spikingjelly.activation_based.memopt import checkpointing

    return base, functional, neuron, surrogate, checkpointing


def _sj_monitor(monkeypatch):
    # SpikingJelly's monitor module imports torch.utils.tensorboard for a writer the monitors
    # below never use; tensorboard is not among the test dependencies.
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=None))
    from spikingjelly.activation_based import monitor

    return monitor


# ---- the stateful-module protocol (ours, or SpikingJelly's when installed) -----------------------
def test_memory_module_is_spikingjelly_s_when_installed():
    layer = plif_cuda.ParametricLIFNode()
    assert isinstance(layer, MemoryModule)
    if HAVE_SPIKINGJELLY:
        assert MemoryModule is sys.modules["spikingjelly.activation_based.base"].MemoryModule
    else:
        assert MemoryModule.__module__ == "plif_cuda.spikingjelly_compat"
        with pytest.raises(ImportError, match="SpikingJelly"):
            plif_cuda.patch_spikingjelly()


@pytest.mark.parametrize("kind", LAYERS)
def test_memory_protocol(kind):
    layer = LAYERS[kind](step_mode="m", v_reset=-0.25)
    assert dict(layer.named_memories()) == {"v": -0.25} and list(layer.memories()) == [-0.25]
    layer(make_seq((3, 2, 5), torch.float32))
    ((name, v),) = layer.named_memories()
    assert name == "v" and v is layer.v and isinstance(v, torch.Tensor) and v.shape == (2, 5)
    layer.reset()
    assert layer.v == -0.25
    with pytest.raises(ValueError, match="step_mode"):
        layer.step_mode = "x"
    layer.step_mode = "s"
    assert layer(make_seq((2, 5), torch.float32)).shape == (2, 5)


@pytest.mark.parametrize("kind", LAYERS)
def test_truncated_bptt_with_detach(kind):
    """detach() cuts the graph between chunks: each chunk's gradient is that of a fresh run
    started from the (constant) membrane the previous chunk left."""
    x_seq = make_seq((8, 2, 67), torch.float32, seed=3, scale=2.0).requires_grad_()
    layer = LAYERS[kind](step_mode="m")
    layer(x_seq[:4]).sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        layer(x_seq[4:]).sum().backward()

    layer.reset()
    x_seq.grad = None
    layer(x_seq[:4]).sum().backward()
    v_between = layer.v
    layer.detach()
    assert layer.v.grad_fn is None and torch.equal(layer.v, v_between)
    layer(x_seq[4:]).sum().backward()
    fresh = x_seq[4:].detach().clone().requires_grad_()
    w = layer.w if kind == "plif" else -math.log(3.0 - 1.0)
    spikes, _, _ = plif_cuda.plif_multistep(fresh, w, v_between.detach(), backend="torch")
    spikes.sum().backward()
    assert_grad_close(x_seq.grad[4:], fresh.grad, torch.float32)


@pytest.mark.parametrize(
    "conversion, dtype",
    [
        (lambda m: m.double(), torch.float64),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.to(dtype=torch.float64), torch.float64),
    ],
    ids=("double", "half", "to_bf16", "to_dtype"),
)
def test_module_conversion_converts_the_membrane(conversion, dtype):
    layer = plif_cuda.ParametricLIFNode(step_mode="m")
    layer(make_seq((3, 2, 5), torch.float32))
    v_before = layer.v
    conversion(layer)
    assert layer.v.dtype == dtype and layer.w.dtype == dtype
    assert torch.equal(layer.v, v_before.to(dtype))
    layer.reset()
    assert layer.v == 0.0


def test_module_to_device_moves_the_membrane():
    layer = plif_cuda.LIFNode(step_mode="m")
    layer(make_seq((3, 2, 5), torch.float32))
    layer.to("meta")
    assert layer.v.device.type == "meta" and layer.v.shape == (2, 5)


def test_single_step_store_v_seq_accumulates(backend, device):
    x_seq = make_seq((3, 2, 4), torch.float32, device)
    single = plif_cuda.ParametricLIFNode(step_mode="s", store_v_seq=True, backend=backend).to(device)
    multi = plif_cuda.ParametricLIFNode(step_mode="m", store_v_seq=True, backend=backend).to(device)
    for t, x in enumerate(x_seq):
        single(x)
        assert single.v_seq.shape == (t + 1, 2, 4)
    multi(x_seq)
    assert torch.equal(single.v_seq, multi.v_seq)
    single.reset()
    assert single.v_seq is None
    single(x_seq[0])
    assert single.v_seq.shape == (1, 2, 4)
    single.store_v_seq = False
    assert single.v_seq is None


# ---- state_dict and the fixed tau of LIFNode -----------------------------------------------------
def test_lif_tau_is_a_constant():
    lif = plif_cuda.LIFNode(tau=2.5, step_mode="m")
    assert lif.tau == 2.5 and isinstance(lif.tau, float)
    assert lif.state_dict() == {} and not list(lif.parameters()) and not list(lif.buffers())
    lif.to(torch.bfloat16).float()
    assert lif.tau == 2.5
    x_seq = make_seq((4, 2, 67), torch.float32)
    spikes = lif(x_seq)
    ref, _, _ = plif_cuda.plif_multistep(x_seq, -math.log(1.5), backend="torch")
    assert torch.equal(spikes, ref)
    fresh = plif_cuda.LIFNode(tau=7.0)
    fresh.load_state_dict(lif.state_dict(), strict=True)
    assert fresh.tau == 7.0  # a constant of the constructor, as in SpikingJelly: nothing to load


# ---- half inputs: the membrane carried between calls stays in the compute dtype ------------------
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_half_sequence_split_into_calls_equals_one_call(backend, dtype):
    device = BACKEND_DEVICE.get(backend, "cpu")
    x_seq = make_seq((16, 64, 2048), dtype, device, seed=5, scale=1.5, shift=0.5)
    layer = plif_cuda.ParametricLIFNode(step_mode="m", backend=backend, init_tau=3.0).to(device)
    whole = layer(x_seq)
    v_whole = layer.v
    assert v_whole.dtype == torch.float32
    layer.reset()
    chunks = torch.cat([layer(chunk) for chunk in x_seq.split(4)])
    assert torch.equal(chunks, whole) and torch.equal(layer.v, v_whole)

    # The input is one where rounding the carried membrane to the half dtype flips spikes.
    v, rounded = None, []
    for chunk in x_seq.split(4):
        spikes, v, _ = plif_cuda.plif_multistep(chunk, layer.w, v, backend=backend)
        rounded.append(spikes)
    assert v.dtype == dtype
    assert not torch.equal(torch.cat(rounded), whole)


def test_half_membrane_carries_gradient_in_float32():
    x_seq = make_seq((5, 2, 67), torch.bfloat16).requires_grad_()
    grads = []
    for backend in ("cpu", "torch"):
        x_seq.grad = None
        layer = plif_cuda.ParametricLIFNode(step_mode="m", backend=backend)
        spikes = layer(x_seq)
        loss = (spikes * random_weights_like(spikes, 1)).sum() + (layer.v * random_weights_like(layer.v, 2)).sum()
        loss.backward()
        grads.append((x_seq.grad.clone(), layer.w.grad.clone()))
    assert_grad_close(grads[0][0], grads[1][0], torch.bfloat16)
    assert_grad_close(grads[0][1], grads[1][1], torch.float32, summed_terms=x_seq.numel())


def test_op_returns_v_last_in_the_compute_dtype():
    x = make_seq((3, 2, 5), torch.bfloat16)
    one = torch.ones(1)
    for device in ("cpu", "meta"):
        spikes, v_last, v_seq, _ = torch.ops.plif_cuda.multistep_forward(
            x.to(device),
            one.to(device) * 0.5,
            one.to(device) * 0,
            **op_options(),
            store_v_seq=True,
            needs_backward=False,
        )
        assert (spikes.dtype, v_last.dtype, v_seq.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    spike_seq, v_last, _ = plif_cuda.plif_multistep(x, torch.zeros(()))
    assert v_last.dtype == torch.bfloat16  # the public function keeps x_seq's dtype


# ---- surrogate alpha given as a tensor -----------------------------------------------------------
def test_alpha_tensor_without_gradient_is_a_number():
    assert plif_surrogate.ATan(alpha=torch.tensor(3.0)).alpha == 3.0
    assert plif_surrogate.resolve_surrogate("erf", torch.tensor(1.5, dtype=torch.float64)) == ("erf", 1.5)
    x_seq = make_seq((4, 2, 67), torch.float32)
    a = plif_cuda.plif_multistep(x_seq, torch.zeros(()), surrogate="atan", alpha=torch.tensor(3.0))
    b = plif_cuda.plif_multistep(x_seq, torch.zeros(()), surrogate="atan", alpha=3.0)
    assert all(torch.equal(p, q) for p, q in zip(a[:2], b[:2]))
    for bad in (torch.tensor(3.0, requires_grad=True), torch.tensor([3.0]), torch.tensor(True)):
        with pytest.raises(TypeError, match="alpha"):
            plif_surrogate.resolve_surrogate("atan", bad)


# ==== SpikingJelly's functional API on our layers ==============================================
STEP_SHAPE = (3, 37)


def _layer(kind, backend="cpu", **kwargs):
    return LAYERS[kind](backend=backend, **kwargs)


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


# ---- the functional forward against our stateful forward -----------------------------------------
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


# ---- torch.func over the functional forward ------------------------------------------------------
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


# ---- the functional forward against SpikingJelly's own nodes -------------------------------------
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


# ---- without SpikingJelly ------------------------------------------------------------------------
def test_without_spikingjelly():
    """This file's SpikingJelly-free tests, where SpikingJelly cannot be imported: the stand-in
    MemoryModule gives the same layers and the same functional_forward."""
    assert_passes_without_spikingjelly(__file__)


# ---- with SpikingJelly: its tools on our layers --------------------------------------------------
def _net(kind="plif", **kwargs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), LAYERS[kind](step_mode="m", **kwargs), nn.Linear(7, 3))


@needs_spikingjelly
@pytest.mark.parametrize("kind", LAYERS)
def test_sj_named_memories_reset_and_step_mode(kind):
    base, functional, *_ = _sj()
    net = _net(kind, store_v_seq=True)
    assert [name for name, _ in base.named_memories(net)] == ["1.v"]
    x_seq = make_seq((3, 2, 5), torch.float32)
    outputs, (v_after,) = base.to_functional_forward(net)((x_seq,), (0.0,))
    assert net[1].v == 0.0, "to_functional_forward must not change the module's state"
    assert torch.equal(outputs[0], net(x_seq)) and torch.equal(v_after, net[1].v)
    base.load_memories(net, base.extract_memories(net))
    assert isinstance(net[1].v, torch.Tensor) and net[1].v_seq is not None
    functional.reset_net(net)
    assert net[1].v == 0.0 and net[1].v_seq is None
    functional.set_step_mode(net, "s")
    assert net[1].step_mode == "s" and net(make_seq((2, 5), torch.float32)).shape == (2, 3)
    with pytest.raises(ValueError):
        functional.set_step_mode(net, "x")


@needs_spikingjelly
@pytest.mark.parametrize("kind", LAYERS)
def test_sj_detach_net_truncated_bptt(kind):
    _, functional, *_ = _sj()
    net = _net(kind)
    x_seq = make_seq((8, 2, 5), torch.float32, seed=1, scale=3.0)
    grads = []
    for chunk in x_seq.split(4):
        net(chunk).sum().backward()
        functional.detach_net(net)
        assert net[1].v.grad_fn is None
        grads.append(net[0].weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])


@needs_spikingjelly
def test_sj_checkpoint_module_equals_plain():
    *_, checkpointing = _sj()
    x_seq = make_seq((6, 2, 5), torch.float32, seed=2, scale=3.0)
    results = []
    for wrap in (False, True):
        net = _net("plif", store_v_seq=True)
        if wrap:
            net[1] = checkpointing.checkpoint_module(net[1])
        x_leaf = x_seq.clone().requires_grad_()
        out = net(x_leaf)
        out.sum().backward()
        layer = net[1]._checkpoint_wrapped_module if wrap else net[1]
        results.append((out.detach(), layer.v.detach(), x_leaf.grad, layer.w.grad))
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-7)


@needs_spikingjelly
def test_sj_checkpoint_module_chunks_equal_plain():
    *_, checkpointing = _sj()
    x_seq = make_seq((6, 2, 5), torch.float32, seed=4, scale=3.0)
    plain = _net("plif")
    spikes = plain[1](x_seq)
    chunked = checkpointing.checkpoint_module(plif_cuda.ParametricLIFNode(init_tau=3.0, step_mode="m"), chunks=3)
    assert torch.equal(chunked(x_seq), spikes)
    assert torch.equal(chunked._checkpoint_wrapped_module.v, plain[1].v)


@needs_spikingjelly
def test_sj_monitors_see_the_membrane(monkeypatch):
    base, *_ = _sj()
    monitor = _sj_monitor(monkeypatch)
    net = _net("plif")
    v_monitor = monitor.AttributeMonitor("v", pre_forward=False, net=net, instance=base.MemoryModule)
    out_monitor = monitor.OutputMonitor(net, instance=plif_cuda.ParametricLIFNode)
    net(make_seq((3, 2, 5), torch.float32))
    assert len(v_monitor.records) == 1 and torch.equal(v_monitor.records[0], net[1].v)
    assert len(out_monitor.records) == 1 and out_monitor.records[0].shape == (3, 2, 7)


@needs_spikingjelly
@pytest.mark.parametrize("kind", LAYERS)
def test_sj_state_dict_both_ways(kind):
    _, _, neuron, _, _ = _sj()
    sj_class = neuron.ParametricLIFNode if kind == "plif" else neuron.LIFNode
    ours = LAYERS[kind](step_mode="m")
    theirs = sj_class(3.0, step_mode="m")
    if kind == "plif":
        with torch.no_grad():
            theirs.w.fill_(0.3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if kind == "plif":
        assert torch.equal(ours.w, theirs.w)
        with torch.no_grad():
            ours.w.fill_(-0.7)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if kind == "plif":
        assert theirs.w.item() == pytest.approx(-0.7)
    else:
        assert ours.tau == theirs.tau == 3.0


@needs_spikingjelly
def test_sj_half_membrane_dtype():
    """SpikingJelly stores v in the input's dtype (and computes half inputs in it on CPU); we keep
    float32, so that a split sequence gives the spikes of one call."""
    _, _, neuron, _, _ = _sj()
    x_seq = make_seq((4, 2, 67), torch.bfloat16)
    theirs = neuron.ParametricLIFNode(step_mode="m")
    ours = plif_cuda.ParametricLIFNode(step_mode="m")
    theirs(x_seq)
    ours(x_seq)
    assert theirs.v.dtype == torch.bfloat16 and ours.v.dtype == torch.float32


@needs_spikingjelly
@pytest.mark.parametrize("kind", LAYERS)
def test_sj_single_step_v_seq_like_spikingjelly(kind):
    _, _, neuron, _, _ = _sj()
    x_seq = make_seq((3, 2, 4), torch.float32)
    theirs = (neuron.ParametricLIFNode if kind == "plif" else neuron.LIFNode)(3.0, store_v_seq=True)
    ours = LAYERS[kind](store_v_seq=True)
    for x in x_seq:
        assert torch.equal(ours(x), theirs(x))
    assert ours.v_seq.shape == theirs.v_seq.shape == (3, 2, 4)
    assert_membrane_close(ours.v_seq, theirs.v_seq)


@needs_spikingjelly
def test_sj_surrogate_with_tensor_alpha():
    _, _, _, surrogate, _ = _sj()
    x_seq = make_seq((4, 2, 67), torch.float32)
    fused_calls = []
    real_forward_op = plif_backends.forward_op
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            plif_backends, "forward_op", lambda backend: fused_calls.append(backend) or real_forward_op(backend)
        )
        layer = plif_cuda.ParametricLIFNode(step_mode="m", surrogate_function=surrogate.ATan(alpha=torch.tensor(3.0)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            spikes = layer(x_seq)
    assert fused_calls == ["cpu"]
    ref, _, _ = plif_cuda.plif_multistep(x_seq, torch.zeros(()), surrogate="atan", alpha=3.0)
    assert torch.equal(spikes, ref)

    # An alpha that needs a gradient takes the reference loop, which calls the surrogate object, so
    # alpha gets what SpikingJelly's own layer gives it (2.0.0's surrogates give it no gradient).
    results = []
    for make in (
        lambda sg: plif_cuda.ParametricLIFNode(step_mode="m", surrogate_function=sg),
        lambda sg: _sj()[2].ParametricLIFNode(step_mode="m", surrogate_function=sg),
    ):
        alpha = torch.tensor(3.0, requires_grad=True)
        layer = make(surrogate.ATan(alpha=alpha))
        x_leaf = x_seq.clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = layer(x_leaf)
            layer(x_leaf)
        (out * random_weights_like(out, 1)).sum().backward()
        results.append((out.detach(), x_leaf.grad, alpha.grad, caught))
    ours, theirs = results
    assert len([w for w in ours[3] if "alpha" in str(w.message)]) == 1
    assert torch.equal(ours[0], theirs[0])
    assert_grad_close(ours[1], theirs[1], torch.float32)
    assert (ours[2] is None) == (theirs[2] is None)
    if theirs[2] is not None:
        assert_grad_close(ours[2], theirs[2], torch.float32, summed_terms=x_seq.numel())


# ---- patch_spikingjelly --------------------------------------------------------------------------
def _sj_network(neuron):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32),
        neuron.ParametricLIFNode(step_mode="m", detach_reset=True),
        nn.Linear(32, 32),
        neuron.LIFNode(step_mode="m", v_reset=None),
        nn.Linear(32, 4),
    )


def _train(net, steps=5):
    base, functional, *_ = _sj()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x_seq = torch.rand(6, 16, 12, generator=generator) * 2
        target = torch.randint(0, 4, (16,), generator=generator)
        loss = nn.functional.cross_entropy(net(x_seq).mean(0), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        functional.reset_net(net)
        losses.append(loss.item())
    return losses


@needs_spikingjelly
def test_sj_patch_trains_like_spikingjelly(monkeypatch):
    _, _, neuron, _, _ = _sj()
    original = (neuron.ParametricLIFNode.multi_step_forward, neuron.LIFNode.multi_step_forward)
    unpatched_net = _sj_network(neuron)
    unpatched = _train(unpatched_net)

    fused_calls = []
    real_forward_op = plif_backends.forward_op
    monkeypatch.setattr(
        plif_backends, "forward_op", lambda backend: fused_calls.append(backend) or real_forward_op(backend)
    )
    with plif_cuda.patch_spikingjelly():
        patched_net = _sj_network(neuron)
        patched = _train(patched_net)
    assert len(fused_calls) == 2 * 5  # two layers, five training steps
    assert (neuron.ParametricLIFNode.multi_step_forward, neuron.LIFNode.multi_step_forward) == original
    assert patched[0] != patched[-1]
    torch.testing.assert_close(patched, unpatched, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(patched_net.named_parameters(), unpatched_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@needs_spikingjelly
def test_sj_patch_keeps_state_checkpoints_and_uncovered_cases(monkeypatch):
    _, sj_functional, neuron, surrogate, _ = _sj()
    fused_calls = []
    real_forward_op = plif_backends.forward_op
    monkeypatch.setattr(
        plif_backends, "forward_op", lambda backend: fused_calls.append(backend) or real_forward_op(backend)
    )
    x_seq = make_seq((4, 2, 67), torch.float32)
    unpatched = neuron.ParametricLIFNode(step_mode="m", store_v_seq=True)
    reference_spikes = unpatched(x_seq)
    plif_cuda.patch_spikingjelly()
    try:
        layer = neuron.ParametricLIFNode(step_mode="m", store_v_seq=True)
        layer.load_state_dict(unpatched.state_dict())
        assert torch.equal(layer(x_seq), reference_spikes) and fused_calls == ["cpu"]
        assert layer.v.dtype == unpatched.v.dtype and layer.v_seq.shape == unpatched.v_seq.shape
        assert_membrane_close(layer.v, unpatched.v)
        assert list(layer.state_dict()) == ["w"]
        sj_functional.detach_net(layer)  # SpikingJelly detaches v in place
        assert layer.v.grad_fn is None

        fused_calls.clear()
        single = neuron.ParametricLIFNode(step_mode="s")
        torch.stack([single(x) for x in x_seq])
        custom = neuron.ParametricLIFNode(step_mode="m", surrogate_function=lambda h: (h >= 0).float())
        custom(x_seq)
        learnable_alpha = neuron.ParametricLIFNode(
            step_mode="m", surrogate_function=surrogate.ATan(alpha=torch.tensor(2.0, requires_grad=True))
        )
        learnable_alpha(x_seq)
        assert fused_calls == []
    finally:
        plif_cuda.unpatch_spikingjelly()
    plif_cuda.unpatch_spikingjelly()  # a second call is a no-op
