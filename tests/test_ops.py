"""The registered torch.library ops (opcheck, torch.compile) and backend selection."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import plif_cuda
from helpers import BACKEND_DEVICE, BACKENDS, make_seq
from plif_cuda import _C
from plif_cuda import backends as plif_backends
from plif_cuda import ops as plif_ops

OPCHECK_OPTION_SETS = {
    "hard-decay-sigmoid": dict(
        v_threshold=1.0, v_reset=0.0, decay_input=True, detach_reset=False, surrogate="sigmoid", alpha=4.0, spiking=True
    ),
    "soft-nodecay-atan-detach": dict(
        v_threshold=0.7, v_reset=None, decay_input=False, detach_reset=True, surrogate="atan", alpha=2.0, spiking=True
    ),
    "hard-smooth-erf": dict(
        v_threshold=1.0, v_reset=-0.5, decay_input=True, detach_reset=False, surrogate="erf", alpha=2.0, spiking=False
    ),
    "soft-superspike": dict(
        v_threshold=1.2,
        v_reset=None,
        decay_input=True,
        detach_reset=False,
        surrogate="super_spike",
        alpha=1.0,
        spiking=True,
    ),
}


def _op_inputs(device, dtype, per_neuron, requires_grad):
    x = make_seq((5, 3, 67), dtype, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shape = (3, 67) if per_neuron else (1,)
    k = torch.full(shape, 0.4, dtype=acc, device=device)
    v_init = torch.full(shape, 0.1, dtype=acc, device=device)
    if requires_grad:
        x.requires_grad_()
        k.requires_grad_()
        v_init.requires_grad_()
    return x, k, v_init


def _forward_keeping(backend, save, x, k, v_init, **options):
    """The forward that keeps ``save`` for the backward: the backend's op where that is the op's
    own choice, else the internal one that takes the save mode (CPU or the nvcc launcher)."""
    if save == plif_ops.save_mode(x, True):
        return plif_backends.forward_op(backend)(x, k, v_init, **options, needs_backward=True)
    return torch.ops.plif_cuda_internal.multistep_forward_saving(x, k, v_init, **options, save=save)


def test_the_forward_schema_says_what_the_neuron_needs():
    """At most 12 arguments: the tensors, then keyword-only the neuron's parameters and options,
    store_v_seq and whether a backward follows; no launcher, no save mode. Both launchers' ops
    have the one schema, and so have the backward ops."""
    for name in ("multistep_forward", "multistep_backward"):
        compiled = getattr(torch.ops.plif_cuda, name).default._schema
        nvrtc = getattr(torch.ops.plif_cuda, f"{name}_nvrtc").default._schema
        assert [(a.name, str(a.type), a.kwarg_only) for a in compiled.arguments] == [
            (a.name, str(a.type), a.kwarg_only) for a in nvrtc.arguments
        ]
    schema = torch.ops.plif_cuda.multistep_forward.default._schema
    names = [argument.name for argument in schema.arguments]
    assert len(names) <= 12
    assert names[:3] == ["x", "k", "v_init"] and not any(a.kwarg_only for a in schema.arguments[:3])
    assert all(a.kwarg_only for a in schema.arguments[3:])
    assert {"store_v_seq", "needs_backward", "surrogate", "v_reset"} <= set(names)
    assert not {"launcher", "save", "soft_reset"} & set(names)
    assert str(schema.arguments[names.index("v_reset")].type) == "Optional[float]"


def test_service_functions_are_not_public_ops():
    for name in ("multistep_forward", "multistep_backward", "multistep_forward_nvrtc", "multistep_backward_nvrtc"):
        assert hasattr(torch.ops.plif_cuda, name), name
    for service in ("nvrtc_launch_forward", "threads_per_block", "launch_blocks", "cpu_cache_bytes", "empty_cpu_cache"):
        assert not hasattr(torch.ops.plif_cuda, service), service
    assert hasattr(torch.ops.plif_cuda_internal, "nvrtc_launch_forward")
    assert _C.launch_blocks(1000, 2) == 2 and _C.cpu_cache_bytes() >= 0


def test_the_op_decides_what_to_keep():
    """Every dtype keeps H's checkpoint rows (and the backward then needs x), nothing without a
    backward; the h_seq output shows which."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x, k, v_init = _op_inputs("cpu", dtype, per_neuron=False, requires_grad=False)
        options = OPCHECK_OPTION_SETS["hard-decay-sigmoid"]
        kept = torch.ops.plif_cuda.multistep_forward(x, k, v_init, **options, store_v_seq=False, needs_backward=True)[3]
        nothing = torch.ops.plif_cuda.multistep_forward(
            x, k, v_init, **options, store_v_seq=False, needs_backward=False
        )[3]
        assert nothing.numel() == 0
        assert plif_ops.save_mode(x, True) == _C.SAVE_CHECKPOINTS
        assert kept.shape == (_C.checkpoint_rows(x.shape[0]), *x.shape[1:])
    assert plif_ops.save_mode(torch.empty(1), False) == _C.SAVE_NOTHING


def test_surrogates_go_by_name():
    """The op maps the names to its kernels' ids; Python's surrogates are the same set."""
    from plif_cuda.surrogate import DEFAULT_ALPHA

    assert set(_C.SURROGATES) == set(DEFAULT_ALPHA) and len(_C.SURROGATES) == len(DEFAULT_ALPHA)
    x, k, v_init = _op_inputs("cpu", torch.float32, per_neuron=False, requires_grad=False)
    options = dict(OPCHECK_OPTION_SETS["hard-decay-sigmoid"], spiking=False)
    primitives = {
        name: torch.ops.plif_cuda.multistep_forward(
            x, k, v_init, **dict(options, surrogate=name), store_v_seq=False, needs_backward=False
        )[0]
        for name in _C.SURROGATES
        if name != "super_spike"
    }
    for name, spikes in primitives.items():
        ref = plif_cuda.plif_multistep_ref(x, torch.logit(k), v_init, **dict(options, surrogate=name))[0]
        torch.testing.assert_close(spikes, ref, msg=name)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cupy"])
@pytest.mark.parametrize("store_v_seq", (True, False), ids=("v_seq", "no_v_seq"))
@pytest.mark.parametrize("options", OPCHECK_OPTION_SETS.values(), ids=OPCHECK_OPTION_SETS.keys())
@pytest.mark.parametrize(
    "dtype, per_neuron",
    [(torch.float32, False), (torch.float64, True), (torch.bfloat16, True)],
    ids=("f32-layer", "f64-neuron", "bf16-neuron"),
)
def test_opcheck_forward(backend, options, store_v_seq, dtype, per_neuron):
    x, k, v_init = _op_inputs(BACKEND_DEVICE[backend], dtype, per_neuron, requires_grad=True)
    torch.library.opcheck(
        plif_backends.forward_op(backend),
        (x, k, v_init),
        dict(options, store_v_seq=store_v_seq, needs_backward=True),
    )


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cupy"])
def test_opcheck_forward_without_saving(backend):
    x, k, v_init = _op_inputs(BACKEND_DEVICE[backend], torch.float32, True, requires_grad=False)
    options = OPCHECK_OPTION_SETS["hard-decay-sigmoid"]
    torch.library.opcheck(
        plif_backends.forward_op(backend), (x, k, v_init), dict(options, store_v_seq=True, needs_backward=False)
    )


@pytest.mark.parametrize("save", ("every-h", "checkpoints"))
def test_opcheck_forward_that_names_its_save_mode(save):
    x, k, v_init = _op_inputs("cpu", torch.float32, True, requires_grad=True)
    options = OPCHECK_OPTION_SETS["soft-nodecay-atan-detach"]
    torch.library.opcheck(
        torch.ops.plif_cuda_internal.multistep_forward_saving,
        (x, k, v_init),
        dict(options, store_v_seq=True, save=_C.SAVE_H if save == "every-h" else _C.SAVE_CHECKPOINTS),
    )


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cupy"])
@pytest.mark.parametrize("which_grads", ("all", "spikes_only", "v_last_only"))
@pytest.mark.parametrize("options", OPCHECK_OPTION_SETS.values(), ids=OPCHECK_OPTION_SETS.keys())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_opcheck_backward(backend, options, which_grads, dtype):
    device = BACKEND_DEVICE[backend]
    x, k, v_init = _op_inputs(device, dtype, per_neuron=True, requires_grad=False)
    save = plif_ops.save_mode(x, True)
    _, _, _, h_seq = _forward_keeping(backend, save, x, k, v_init, **options, store_v_seq=True)
    saved_x = x if save == _C.SAVE_CHECKPOINTS else None
    grad_spikes = make_seq(x.shape, dtype, device, seed=1)
    grad_v_last = make_seq(x.shape[1:], h_seq.dtype, device, seed=2)  # v_last is in the compute dtype
    grad_v_seq = make_seq(x.shape, dtype, device, seed=3)
    if which_grads == "spikes_only":
        grad_v_last = grad_v_seq = None
    elif which_grads == "v_last_only":
        grad_spikes = grad_v_seq = None
    torch.library.opcheck(
        plif_backends.backward_op(backend),
        (grad_spikes, grad_v_last, grad_v_seq, h_seq, saved_x, k, v_init),
        dict(options, x_dtype=dtype),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("neurons", (100, 3 * 1024 + 200), ids=("one_group", "blocks_and_a_tail"))
@pytest.mark.parametrize(
    "dtype, save",
    [
        (torch.float32, "every-h"),
        (torch.float32, "checkpoints"),
        (torch.float64, "every-h"),
        (torch.bfloat16, "checkpoints"),
    ],
    ids=("f32", "f32-checkpoints", "f64", "bf16-checkpoints"),
)
def test_one_value_gradients_are_the_sums_of_the_neurons_shares(backend, neurons, dtype, save):
    """Where k or v_init is one value, the backward op returns one value: the sum of what the same
    call returns per neuron when they are given per neuron (the same arithmetic, neuron by neuron)."""
    device = BACKEND_DEVICE[backend]
    save = _C.SAVE_H if save == "every-h" else _C.SAVE_CHECKPOINTS
    if device == "cuda" and save == _C.SAVE_CHECKPOINTS and dtype == torch.float32:
        pytest.skip("checkpoints are for half inputs on CUDA")
    options = OPCHECK_OPTION_SETS["hard-decay-sigmoid"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_seq((11, neurons), dtype, device)
    k_one = torch.full((1,), 0.4, dtype=acc, device=device)
    v_init_one = torch.full((1,), 0.1, dtype=acc, device=device)
    k_all, v_init_all = k_one.expand(neurons).contiguous(), v_init_one.expand(neurons).contiguous()
    _, _, _, h_seq = _forward_keeping(backend, save, x, k_one, v_init_one, **options, store_v_seq=False)
    saved_x = x if save == _C.SAVE_CHECKPOINTS else None
    grad_spikes = make_seq(x.shape, dtype, device, seed=1)
    grad_v_last = make_seq((neurons,), acc, device, seed=2)
    backward_op = plif_backends.backward_op(backend)

    def backward(k, v_init):
        return backward_op(grad_spikes, grad_v_last, None, h_seq, saved_x, k, v_init, x_dtype=dtype, **options)

    grad_x, shares_k, shares_v_init = backward(k_all, v_init_all)
    for k, v_init in ((k_one, v_init_one), (k_one, v_init_all), (k_all, v_init_one)):
        one_grad_x, grad_k, grad_v_init = backward(k, v_init)
        assert torch.equal(one_grad_x, grad_x)
        for grad, like, shares in ((grad_k, k, shares_k), (grad_v_init, v_init, shares_v_init)):
            assert grad.shape == like.shape
            if like.numel() == neurons:
                assert torch.equal(grad, shares)
            else:
                scale = shares.double().abs().sum().item()
                torch.testing.assert_close(grad.double(), shares.double().sum().reshape(1), rtol=0.0, atol=1e-6 * scale)
    torch.library.opcheck(
        backward_op,
        (grad_spikes, grad_v_last, None, h_seq, saved_x, k_one, v_init_one),
        dict(options, x_dtype=dtype),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("asked", [(True, False), (False, True), (False, False)], ids=("k", "v_init", "none"))
@pytest.mark.parametrize("per_neuron", (True, False), ids=("per_neuron", "shared"))
def test_gradients_not_asked_for_come_back_empty(backend, per_neuron, asked):
    """needs_grad_k / needs_grad_v_init False (autograd's needs_input_grad: a frozen tau, a fresh
    layer's v_init): that gradient comes back empty (on CUDA the kernels get a null pointer and
    spend nothing on it), the others as the call that asks for everything gives them."""
    device = BACKEND_DEVICE[backend]
    dtype = torch.float16
    options = OPCHECK_OPTION_SETS["hard-decay-sigmoid"]
    x, k, v_init = _op_inputs(device, dtype, per_neuron=per_neuron, requires_grad=False)
    _, _, _, h_seq = _forward_keeping(backend, _C.SAVE_CHECKPOINTS, x, k, v_init, **options, store_v_seq=False)
    grad_spikes = make_seq(x.shape, dtype, device, seed=1)
    arguments = (grad_spikes, None, None, h_seq, x, k, v_init)
    backward_op = plif_backends.backward_op(backend)
    everything = backward_op(*arguments, x_dtype=dtype, **options)
    needs = dict(needs_grad_k=asked[0], needs_grad_v_init=asked[1])
    some = backward_op(*arguments, x_dtype=dtype, **options, **needs)
    assert torch.equal(some[0], everything[0])
    for wanted, grad, full in zip(asked, some[1:], everything[1:]):
        if wanted:
            assert torch.equal(grad, full)
        else:
            assert grad.numel() == 0 and grad.dtype == full.dtype and grad.device == full.device
    torch.library.opcheck(backward_op, arguments, dict(options, x_dtype=dtype, **needs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", ("hard-decay-sigmoid", "soft-nodecay-atan-detach"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=("f32", "f64", "bf16"))
def test_a_membrane_gradient_of_zeros_gives_the_bits_of_an_absent_one(backend, options, dtype):
    """Training's usual call (dL/dS only) takes a copy of the CPU loop of its own, without the
    selects for absent gradients; given dL/dV[t] as zeros, the general loop must give the same bits."""
    device = BACKEND_DEVICE[backend]
    options = OPCHECK_OPTION_SETS[options]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_seq((9, 3 * 1024 + 200), dtype, device)
    k = torch.full((1,), 0.4, dtype=acc, device=device)
    v_init = torch.full((1,), 0.1, dtype=acc, device=device)
    _, _, _, h_seq = plif_backends.forward_op(backend)(x, k, v_init, **options, store_v_seq=False, needs_backward=True)
    saved_x = x if plif_ops.save_mode(x, True) == _C.SAVE_CHECKPOINTS else None
    grad_spikes = make_seq(x.shape, dtype, device, seed=1)

    def backward(grad_v_seq):
        return plif_backends.backward_op(backend)(
            grad_spikes, None, grad_v_seq, h_seq, saved_x, k, v_init, x_dtype=dtype, **options
        )

    absent, zeros = backward(None), backward(torch.zeros_like(x))
    assert torch.isfinite(absent[0].float()).all() and absent[0].abs().sum() > 0
    for got, want in zip(zeros, absent):
        assert torch.equal(got, want)


# ---- torch.compile ------------------------------------------------------------------------------
class SmallConvNet(nn.Module):
    """conv-BN-PLIF over a time-first sequence, as in the PLIF paper's networks."""

    def __init__(self, tau_shape):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.plif = plif_cuda.ParametricLIFNode(
            step_mode="m", tau_shape=tau_shape, detach_reset=True, surrogate_function="atan"
        )
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x_seq):
        T, N = x_seq.shape[:2]
        y = self.bn(self.conv(x_seq.flatten(0, 1)))
        spikes = self.plif(y.view(T, N, *y.shape[1:]))
        return self.fc(spikes.flatten(2)).mean(0)


def _train_step(model, x_seq, target):
    model.plif.reset()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x_seq), target)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    return loss.detach(), grads


@pytest.mark.parametrize(
    "channels_last, tau_shape",
    [(False, ()), (True, (8, 1, 1))],
    ids=("contiguous-layer_tau", "channels_last-channel_tau"),
)
def test_compile_fullgraph_trains_like_eager(channels_last, tau_shape):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SmallConvNet(tau_shape)
    with torch.no_grad():
        eager.conv.weight.mul_(3.0)  # enough drive that some neurons fire
    x_seq = torch.randn(4, 5, 2, 6, 6)
    target = torch.tensor([0, 1, 2, 1, 0])
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
        x_seq = x_seq.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x_seq.shape)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)

    eager_loss, eager_grads = _train_step(eager, x_seq, target)
    compiled_model.plif.reset()
    optimizer = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    compiled_loss = nn.functional.cross_entropy(compiled(x_seq), target)
    compiled_loss.backward()
    optimizer.step()

    assert eager.plif.v.gt(0).any(), "the test input should charge the membranes"
    torch.testing.assert_close(compiled_loss.detach(), eager_loss, rtol=1e-4, atol=1e-5)
    for name, p in compiled_model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled_model.plif.v, eager.plif.v, rtol=1e-4, atol=1e-5)


# ---- backend selection --------------------------------------------------------------------------
def _inputs():
    return make_seq((4, 3, 67), torch.float32, "cpu"), torch.tensor(0.2)


def test_cpu_backend_on_cpu():
    x_seq, w = _inputs()
    assert plif_backends.select("cpu", x_seq) == "cpu"
    assert "cpu" in plif_cuda.available_backends("cpu") and "torch" in plif_cuda.available_backends("cpu")
    spikes, v_last, _ = plif_cuda.plif_multistep(x_seq, w, backend="cpu")
    ref_spikes, ref_v_last, _ = plif_cuda.plif_multistep(x_seq, w, backend="torch")
    assert torch.equal(spikes, ref_spikes)
    torch.testing.assert_close(v_last, ref_v_last)


def test_auto_picks_the_fused_cpu_kernel(monkeypatch):
    x_seq, w = _inputs()
    assert plif_backends.select("auto", x_seq) == "cpu"
    used = []
    real_forward_op = plif_backends.forward_op
    monkeypatch.setattr(plif_backends, "forward_op", lambda backend: used.append(backend) or real_forward_op(backend))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = plif_cuda.plif_multistep(x_seq, w, backend="auto")
    assert used == ["cpu"]
    cpu = plif_cuda.plif_multistep(x_seq, w, backend="cpu")
    assert all(torch.equal(a, c) for a, c in zip(auto[:2], cpu[:2]))


def test_torch_backend_is_the_reference(monkeypatch):
    x_seq, w = _inputs()
    monkeypatch.setattr(plif_backends, "forward_op", lambda backend: pytest.fail("a fused op ran for 'torch'"))
    spikes, v_last, v_seq = plif_cuda.plif_multistep(x_seq, w, backend="torch", v_reset=None, store_v_seq=True)
    ref = plif_cuda.plif_multistep_ref(x_seq, w, v_reset=None, store_v_seq=True)
    assert torch.equal(spikes, ref[0]) and torch.equal(v_last, ref[1]) and torch.equal(v_seq, ref[2])


@pytest.mark.parametrize("backend", ("cuda", "cupy"))
def test_gpu_backends_refuse_cpu_tensors(backend):
    x_seq, w = _inputs()
    with pytest.raises(RuntimeError, match=rf"backend '{backend}' is not available: .+"):
        plif_cuda.plif_multistep(x_seq, w, backend=backend)
    assert backend not in plif_cuda.available_backends("cpu")


@pytest.mark.parametrize("simulate", ("extension_error", "unavailable_reason"))
def test_auto_falls_back_with_one_warning_when_extension_missing(simulate, monkeypatch):
    reason = "simulated: the compiled extension plif_cuda._C could not be imported"
    if simulate == "extension_error":
        monkeypatch.setattr(plif_ops, "_EXTENSION_ERROR", reason)
    else:
        real = plif_backends.unavailable_reason
        monkeypatch.setattr(
            plif_backends,
            "unavailable_reason",
            lambda backend, device: reason if backend == "cpu" else real(backend, device),
        )
    x_seq, w = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = plif_cuda.plif_multistep(x_seq, w)
        second = plif_cuda.plif_multistep(x_seq, w, store_v_seq=True)
        plif_cuda.ParametricLIFNode(step_mode="m")(x_seq)
    ours = [w for w in caught if "plif_cuda" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert issubclass(ours[0].category, RuntimeWarning)
    assert reason in str(ours[0].message) and "reference" in str(ours[0].message)
    reference = plif_cuda.plif_multistep(x_seq, w, backend="torch")
    assert torch.equal(first[0], reference[0]) and torch.equal(second[1], reference[1])
    with pytest.raises(RuntimeError, match="simulated"):
        plif_cuda.plif_multistep(x_seq, w, backend="cpu")
