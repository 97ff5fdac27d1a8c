"""Gradients beyond first-order reverse mode: higher-order gradients through the fused op, and
forward-mode AD and torch.func transforms (which plif_multistep runs on the reference's math)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from helpers import (
    NEURON_OPTION,
    SMOOTH_SURROGATES,
    SURROGATES,
    assert_grad_close,
    assert_membrane_close,
    make_seq,
    outputs_loss,
    random_weights_like,
)
from plif_cuda import backends as plif_backends
from plif_cuda import ops as plif_ops
from plif_cuda import plif_multistep

# Each covers a different corner of the backward: one of the neuron's option combinations
# (helpers.NEURON_OPTIONS) with a shape of w (per layer, channel or neuron) and of v_init.
OPTION_SETS = {
    "hard-decay-layer": dict(neuron=NEURON_OPTION["hard0-decay-attached"], w_shape=(), v_init_shape=None),
    "soft-nodecay-channel-vinit": dict(
        neuron=NEURON_OPTION["soft-nodecay-attached"], w_shape=(2, 1), v_init_shape=(2, 5)
    ),
    "hard-detach-channel": dict(neuron=NEURON_OPTION["hard-0.3-decay-detach"], w_shape=(2, 1), v_init_shape=None),
    "soft-decay-detach-vinit": dict(neuron=NEURON_OPTION["soft-decay-detach"], w_shape=(), v_init_shape=(5,)),
    "hard-nodecay-neuron-vinit": dict(
        neuron=NEURON_OPTION["hard-0.3-nodecay-attached"], w_shape=(2, 5), v_init_shape=(2, 5)
    ),
}
# detach_reset makes the first-order gradient differ from the derivative on purpose, so finite
# differences cannot check it (the reference fails gradcheck there too).
DIFFERENTIABLE_OPTION_SETS = {
    name: options for name, options in OPTION_SETS.items() if not options["neuron"]["detach_reset"]
}
FIRING_MODES = [pytest.param(s, True, id=f"{s}-spiking") for s in SURROGATES] + [
    pytest.param(s, False, id=f"{s}-smooth") for s in SMOOTH_SURROGATES
]


def _inputs(device, dtype, options, seed=0):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    x_seq = make_seq((4, 2, 5), dtype, device, seed=seed, scale=0.9, shift=0.5)
    w = (torch.randn(options["w_shape"], generator=generator, dtype=torch.float64) * 0.5).to(device, acc)
    v_init = None
    if options["v_init_shape"] is not None:
        v_init = (torch.randn(options["v_init_shape"], generator=generator, dtype=torch.float64) * 0.3).to(device, acc)
    leaves = [t.requires_grad_() for t in (x_seq, w, v_init) if t is not None]
    return x_seq, w, v_init, leaves


def _call(backend, x_seq, w, v_init, options, **kwargs):
    return plif_multistep(x_seq, w, v_init, **options["neuron"], store_v_seq=True, backend=backend, **kwargs)


def _first_and_second_order(backend, device, dtype, options, **kwargs):
    """Gradients of a loss on every output, then gradients of a random mix of those gradients."""
    x_seq, w, v_init, leaves = _inputs(device, dtype, options)
    first = torch.autograd.grad(
        outputs_loss(*_call(backend, x_seq, w, v_init, options, **kwargs)), leaves, create_graph=True
    )
    mixed = sum((g * random_weights_like(g, seed=7 + i)).sum() for i, g in enumerate(first))
    second = torch.autograd.grad(mixed, leaves, materialize_grads=True)
    return [g.detach() for g in first], second


# ---- higher-order reverse mode ------------------------------------------------------------------
def test_second_derivative_of_the_issue_example_matches_the_reference(backend, device):
    """T=3, two neurons, x=0.5, w=-0.4, loss = sum(spikes) + sum(v_seq): d2L/dw2 = -0.2027 from
    the reference's autograd (the fused op once returned +0.1745 with only a warning)."""

    def second_derivative(name):
        x_seq = torch.full((3, 2), 0.5, device=device, requires_grad=True)
        w = torch.tensor(-0.4, device=device, requires_grad=True)
        spikes, _, v_seq = plif_multistep(x_seq, w, store_v_seq=True, backend=name)
        (grad_w,) = torch.autograd.grad(spikes.sum() + v_seq.sum(), w, create_graph=True)
        (grad_w_w,) = torch.autograd.grad(grad_w, w)
        return grad_w_w

    fused, reference = second_derivative(backend), second_derivative("torch")
    assert abs(reference.item() - (-0.2027)) < 1e-4
    assert_grad_close(fused, reference, torch.float32, summed_terms=6)


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("surrogate, spiking", FIRING_MODES)
def test_second_order_matches_the_reference(backend, device, options, surrogate, spiking):
    kwargs = dict(surrogate=surrogate, spiking=spiking)
    fused_first, fused_second = _first_and_second_order(backend, device, torch.float64, options, **kwargs)
    ref_first, ref_second = _first_and_second_order("torch", device, torch.float64, options, **kwargs)
    for fused, reference in zip(fused_first + list(fused_second), ref_first + list(ref_second)):
        assert_grad_close(fused, reference, torch.float64, summed_terms=40)
    assert any(g.abs().max() > 0 for g in ref_second), "the case should have a nonzero second derivative"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_second_order_in_lower_precision_matches_the_reference(backend, device, dtype):
    options = OPTION_SETS["soft-nodecay-channel-vinit"]
    fused_first, fused_second = _first_and_second_order(backend, device, dtype, options, surrogate="atan")
    ref_first, ref_second = _first_and_second_order("torch", device, dtype, options, surrogate="atan")
    assert fused_first[0].dtype == dtype
    for fused, reference in zip(fused_first + list(fused_second), ref_first + list(ref_second)):
        assert_grad_close(fused, reference, dtype, summed_terms=40)


def test_third_derivative_matches_the_reference(backend, device):
    def third_derivative(name):
        x_seq = make_seq((5, 3), torch.float64, device, scale=0.9, shift=0.5)
        w = torch.tensor(0.3, dtype=torch.float64, device=x_seq.device, requires_grad=True)
        spikes, v_last, v_seq = plif_multistep(
            x_seq.requires_grad_(), w, surrogate="erf", store_v_seq=True, backend=name
        )
        derivative = outputs_loss(spikes, v_last, v_seq)
        for _ in range(3):
            (derivative,) = torch.autograd.grad(derivative, w, create_graph=True)
        (grad_x,) = torch.autograd.grad(derivative, x_seq)
        return derivative, grad_x

    for fused, reference in zip(third_derivative(backend), third_derivative("torch")):
        assert_grad_close(fused, reference, torch.float64, summed_terms=15)


@pytest.mark.parametrize("options", DIFFERENTIABLE_OPTION_SETS.values(), ids=DIFFERENTIABLE_OPTION_SETS.keys())
@pytest.mark.parametrize("surrogate", SMOOTH_SURROGATES)
def test_gradgradcheck_smooth_mode(backend, device, options, surrogate):
    x_seq, w, v_init, leaves = _inputs(device, torch.float64, options, seed=3)

    def all_outputs(*leaves):
        x_seq, w, *v_init = leaves
        return _call(backend, x_seq, w, v_init[0] if v_init else None, options, surrogate=surrogate, spiking=False)

    assert torch.autograd.gradgradcheck(all_outputs, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_second_order_with_no_time_steps():
    """T=0: v_last is v_init, so the gradient on v_last is v_init's, differentiable as such."""
    v_init = torch.full((3,), 0.2, requires_grad=True)
    grad_v_last = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    _, v_last, _ = plif_multistep(torch.zeros(0, 3), torch.tensor(0.1), v_init, backend="cpu")
    (grad_v_init,) = torch.autograd.grad(v_last, v_init, grad_v_last, create_graph=True)
    assert torch.equal(grad_v_init, grad_v_last)
    (grad_grad,) = torch.autograd.grad(grad_v_init.sum(), grad_v_last)
    assert torch.equal(grad_grad, torch.ones(3))


def test_first_order_gradients_take_the_fused_backward(monkeypatch):
    """Only a backward with grad mode on (create_graph) takes the differentiable recurrence."""
    monkeypatch.setattr(
        plif_ops, "_differentiable_backward", lambda *args: pytest.fail("first-order backward left the fused op")
    )
    x_seq, w, v_init, leaves = _inputs("cpu", torch.float32, OPTION_SETS["soft-nodecay-channel-vinit"])
    outputs_loss(*_call("cpu", x_seq, w, v_init, OPTION_SETS["soft-nodecay-channel-vinit"])).backward()
    assert all(leaf.grad is not None for leaf in leaves)


def test_the_op_saves_only_h_k_and_v_init():
    """Higher-order gradients recover what they need from H: the forward keeps no copy of x."""
    x_seq, w, v_init, _ = _inputs("cpu", torch.float32, OPTION_SETS["soft-nodecay-channel-vinit"])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        spikes, _, _ = _call("cpu", x_seq, w, v_init, OPTION_SETS["soft-nodecay-channel-vinit"])
    op_saved = [t for t in saved if t.shape == x_seq.shape]
    assert len(op_saved) == 1 and op_saved[0].data_ptr() != x_seq.data_ptr()
    assert not torch.equal(op_saved[0], x_seq.detach())


# ---- forward-mode AD and torch.func -------------------------------------------------------------
def _tangents_like(tensors, seed=11):
    return tuple(random_weights_like(t, seed + i) for i, t in enumerate(tensors))


def _weighted_sum(outputs, weights):
    """A loss over every output with weights drawn beforehand (vmap forbids drawing them inside)."""
    return sum((out * weight).sum() for out, weight in zip(outputs, weights))


@pytest.mark.parametrize("spiking", (True, False), ids=("spiking", "smooth"))
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_forward_ad_tangents_match_the_reference(backend, device, options, spiking):
    x_seq, w, v_init, leaves = _inputs(device, torch.float32, options)
    primals = [leaf.detach() for leaf in leaves]
    tangents = _tangents_like(primals)

    def outputs_and_tangents(name):
        with fwAD.dual_level():
            x_seq, w, *v_init = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
            outputs = _call(name, x_seq, w, v_init[0] if v_init else None, options, spiking=spiking)
            return [fwAD.unpack_dual(out) for out in outputs]

    fused, reference = outputs_and_tangents(backend), outputs_and_tangents("torch")
    for (primal, tangent), (ref_primal, ref_tangent) in zip(fused, reference):
        assert tangent is not None, "the tangent was dropped"
        assert_membrane_close(primal, ref_primal)
        assert_grad_close(tangent, ref_tangent, torch.float32, summed_terms=10)
    assert fused[1].tangent.abs().max() > 0


def test_func_jvp_matches_the_reference(backend, device):
    options = OPTION_SETS["hard-decay-layer"]
    _, _, _, leaves = _inputs(device, torch.float32, options)
    primals = tuple(leaf.detach() for leaf in leaves)

    def run(name):
        return torch.func.jvp(lambda x_seq, w: _call(name, x_seq, w, None, options), primals, _tangents_like(primals))

    (fused_out, fused_tangent), (ref_out, ref_tangent) = run(backend), run("torch")
    assert torch.equal(fused_out[0], ref_out[0])
    for tangent, ref in zip(fused_tangent, ref_tangent):
        assert_grad_close(tangent, ref, torch.float32, summed_terms=10)
    assert fused_tangent[2].abs().max() > 0


@pytest.mark.parametrize("transform", ("grad", "jacrev", "jacfwd"))
def test_func_derivatives_match_autograd(backend, device, transform):
    """torch.func.grad / jacrev / jacfwd through plif_multistep equal ordinary autograd through
    the fused op."""
    options = OPTION_SETS["soft-nodecay-channel-vinit"]
    x_seq, w, v_init, leaves = _inputs(device, torch.float32, options)

    weights = _tangents_like(_call(backend, x_seq, w, v_init, options))

    def loss(x_seq, w, v_init):
        return _weighted_sum(_call(backend, x_seq, w, v_init, options), weights)

    expected = torch.autograd.grad(loss(x_seq, w, v_init), leaves)
    primals = [leaf.detach() for leaf in leaves]
    derivative = getattr(torch.func, transform)(loss, argnums=(0, 1, 2))(*primals)
    for actual, reference in zip(derivative, expected):
        assert_grad_close(actual, reference, torch.float32, summed_terms=40)


def test_func_hessian_equals_double_backward(backend, device):
    options = OPTION_SETS["hard-detach-channel"]
    x_seq, w, _, _ = _inputs(device, torch.float64, options)
    x_seq = x_seq.detach()

    weights = _tangents_like(_call(backend, x_seq, w, None, options))

    def loss(w):
        return _weighted_sum(_call(backend, x_seq, w, None, options, surrogate="soft_sign"), weights)

    hessian = torch.func.hessian(loss)(w.detach())
    (grad_w,) = torch.autograd.grad(loss(w), w, create_graph=True)
    rows = [torch.autograd.grad(grad_w.flatten()[i], w, retain_graph=True)[0] for i in range(w.numel())]
    assert_grad_close(
        hessian.reshape(w.numel(), -1), torch.stack(rows).reshape(w.numel(), -1), torch.float64, summed_terms=40
    )
    assert hessian.abs().max() > 0


def test_vmap_equals_one_call_per_sample(backend, device):
    options = OPTION_SETS["soft-nodecay-channel-vinit"]
    batch = make_seq((3, 4, 2, 5), torch.float32, device, seed=5, scale=0.9, shift=0.5)
    _, w, v_init, _ = _inputs(device, torch.float32, options)
    w, v_init = w.detach(), v_init.detach()

    def run(x_seq):
        return _call(backend, x_seq, w, v_init, options)

    batched = torch.func.vmap(run)(batch)
    for i, sample in enumerate(batch):
        one = run(sample)
        assert torch.equal(batched[0][i], one[0])
        assert_membrane_close(batched[1][i], one[1])
        assert_membrane_close(batched[2][i], one[2])


def test_only_transformed_calls_leave_the_fused_op(monkeypatch):
    """A dual level with no tangent on the inputs, and an ordinary call, stay on the fused op."""
    used = []
    real_forward_op = plif_backends.forward_op
    monkeypatch.setattr(plif_backends, "forward_op", lambda backend: used.append(backend) or real_forward_op(backend))
    x_seq = make_seq((3, 4), torch.float32)
    plif_multistep(x_seq, torch.tensor(0.2))
    with fwAD.dual_level():
        plif_multistep(x_seq, torch.tensor(0.2))
        assert used == ["cpu", "cpu"]
        dual_w = fwAD.make_dual(torch.tensor(0.2), torch.tensor(1.0))
        _, v_last, _ = plif_multistep(x_seq, dual_w)
        assert fwAD.unpack_dual(v_last).tangent.abs().max() > 0
    assert used == ["cpu", "cpu"]


@pytest.mark.parametrize("spiking", (True, False), ids=("spiking", "smooth"))
def test_compiled_transforms_match_eager_or_refuse(spiking):
    """Under torch.compile a transform reaches the reference too. Spiking, Dynamo cannot trace the
    spike's jvp: fullgraph=True raises an error that says so, and without it the call falls back
    to eager; smooth, it traces."""
    options = OPTION_SETS["hard-decay-layer"]
    x_seq, w, _, _ = _inputs("cpu", torch.float32, options)
    w, x_seq = w.detach(), x_seq.detach()
    weights = _tangents_like(_call("cpu", x_seq, w, None, options, spiking=spiking))

    def loss(x):
        return _weighted_sum(_call("cpu", x, w, None, options, spiking=spiking), weights)

    transforms = {
        "grad": lambda x: torch.func.grad(loss)(x),
        "jvp": lambda x: torch.func.jvp(loss, (x,), (weights[0],))[1],
        "vmap": lambda x: torch.func.vmap(lambda x: _call("cpu", x, w, None, options, spiking=spiking)[1], in_dims=1)(
            x
        ),
    }
    for transform in transforms.values():
        torch._dynamo.reset()
        if spiking:
            with pytest.raises(torch._dynamo.exc.Unsupported, match="torch.func transforms or forward-mode AD"):
                torch.compile(transform, fullgraph=True)(x_seq)
            torch._dynamo.reset()
            compiled = torch.compile(transform)(x_seq)
        else:
            compiled = torch.compile(transform, fullgraph=True)(x_seq)
        assert_grad_close(compiled, transform(x_seq), torch.float32, summed_terms=4)
