"""The fused CUDA kernels against the reference, and what only CUDA has: graph capture, side
streams, a second device, large launches, half types. The device-generic tests run for every
launcher of the one op (helpers.BACKENDS): "cuda", the kernels nvcc compiled into the
extension, "cupy", the same kernels compiled at run time through NVRTC, and "cpu", their twin
that runs everywhere, so that no assertion here is one nobody has seen pass. The tests of what
only CUDA has run on a GPU alone; the kernels they launch also run on the CPU under an emulated
launch (tests/test_gpu_emulation.py), bit-equal to the CPU kernel.

Each GPU launcher skips without a GPU or where it cannot run (benchmarks/gpu_check.sh runs this
file on a GPU machine). Reference runs are on the same device; half inputs are compared with the
reference computed in float32 on the same (rounded) values, so the only difference is the final
rounding of the outputs to the half format.
"""

from __future__ import annotations

import pytest
import torch

import plif_cuda
from helpers import (
    FLOAT_DTYPES,
    GPU_BACKENDS,
    GRAD_TOLERANCE,
    MEMBRANE_TOLERANCE,
    NEURON_OPTIONS,
    SURROGATE_CASES,
    assert_grad_close,
    make_seq,
    op_options,
    strided_leaf,
)
from plif_cuda import backends, ops
from plif_cuda.reference import compute_dtype

CUDA = torch.device("cuda")
# T, B, C, H, W: 210 neurons per step, fewer than one 256-thread block and not a multiple of it.
SHAPE = (8, 2, 3, 5, 7)


def forward_backward(x, w, v_init, backend, upstream, **options):
    """plif_multistep on fresh leaves, then backward with the given upstream gradients.

    Returns (spike_seq, v_last, v_seq) and the gradients {"x", "w", "v_init"} of the leaves
    (only those that are tensors). ``upstream`` holds one gradient per output, in any dtype:
    each is cast to its output's dtype.
    """
    x_leaf = strided_leaf(x)
    w_leaf = w.detach().clone().requires_grad_()
    v_leaf = v_init.detach().clone().requires_grad_() if isinstance(v_init, torch.Tensor) else v_init
    outputs = plif_cuda.plif_multistep(x_leaf, w_leaf, v_leaf, backend=backend, **options)
    used = [(out, grad.to(out.dtype)) for out, grad in zip(outputs, upstream) if out is not None]
    torch.autograd.backward([out for out, _ in used], [grad for _, grad in used])
    grads = {"x": x_leaf.grad, "w": w_leaf.grad}
    if isinstance(v_leaf, torch.Tensor):
        grads["v_init"] = v_leaf.grad
    return outputs, grads


def make_upstream(device, shape, dtype, seed):
    """Gradients for (spike_seq, v_last, v_seq), rounded to ``dtype`` so that the fused run and
    the float32 reference receive the same values; drawn on the CPU, so that every launcher gets
    the same ones."""
    return (
        make_seq(shape, dtype, device, seed=seed, scale=1.0, shift=0.0),
        make_seq(shape[1:], dtype, device, seed=seed + 1, scale=1.0, shift=0.0),
        make_seq(shape, dtype, device, seed=seed + 2, scale=1.0, shift=0.0),
    )


def assert_matches_reference(backend, x, w, v_init=None, seed=0, **options):
    """The fused run equals the reference: spikes exactly (when spiking), membranes and
    gradients within the dtype's tolerance."""
    dtype = x.dtype
    upstream = make_upstream(x.device, x.shape, dtype, seed + 100)
    (spikes, v_last, v_seq), grads = forward_backward(x, w, v_init, backend, upstream, **options)
    x_ref = x.to(compute_dtype(dtype))
    (ref_spikes, ref_v_last, ref_v_seq), ref_grads = forward_backward(x_ref, w, v_init, "torch", upstream, **options)

    assert spikes.dtype == dtype and v_last.dtype == dtype
    assert spikes.device == x.device
    rtol, atol = MEMBRANE_TOLERANCE[dtype]
    if options.get("spiking", True):
        assert torch.equal(spikes, ref_spikes.to(dtype)), "spikes differ from the reference"
    else:
        torch.testing.assert_close(spikes, ref_spikes.to(dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(v_last, ref_v_last.to(dtype), rtol=rtol, atol=atol)
    if options.get("store_v_seq", False):
        torch.testing.assert_close(v_seq, ref_v_seq.to(dtype), rtol=rtol, atol=atol)
    else:
        assert v_seq is None

    rtol, atol = GRAD_TOLERANCE[dtype]
    torch.testing.assert_close(grads["x"], ref_grads["x"].to(dtype), rtol=rtol, atol=atol)
    # w and v_init are in the compute dtype on both sides.
    assert grads["w"].dtype == ref_grads["w"].dtype
    assert_grad_close(grads["w"], ref_grads["w"], compute_dtype(dtype), summed_terms=x.numel() // max(1, w.numel()))
    if "v_init" in grads:
        assert grads["v_init"].dtype == ref_grads["v_init"].dtype
        summed = x[0].numel() // max(1, v_init.numel())
        assert_grad_close(grads["v_init"], ref_grads["v_init"], compute_dtype(dtype), summed_terms=summed)


def tau_weight(device, shape, seed, dtype=torch.float32):
    """w with k = sigmoid(w) spread over (0.2, 0.8)."""
    return make_seq(shape, dtype, device, seed=seed, scale=0.6, shift=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_backend_prefers_the_compiled_kernels():
    x = torch.zeros(2, 3, device=CUDA)
    expected = "cuda" if ops.extension_has_cuda() else "cupy"
    assert backends.select("auto", x) == expected
    assert expected in plif_cuda.available_backends(CUDA)


@pytest.mark.parametrize("spiking", (True, False), ids=("spiking", "smooth"))
@pytest.mark.parametrize("options", NEURON_OPTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_matches_reference_for_every_option(backend, device, dtype, options, spiking):
    x = make_seq(SHAPE, dtype, device, seed=1)
    w = tau_weight(device, (), seed=2)
    assert_matches_reference(backend, x, w, **options, surrogate="atan", spiking=spiking, store_v_seq=spiking)


@pytest.mark.parametrize("surrogate, spiking", SURROGATE_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_cuda_matches_reference_for_every_surrogate(backend, device, dtype, surrogate, spiking):
    x = make_seq(SHAPE, dtype, device, seed=3)
    assert_matches_reference(
        backend, x, tau_weight(device, (), seed=4), surrogate=surrogate, alpha=1.7, spiking=spiking
    )


W_SHAPES = [
    pytest.param((), id="per_layer"),
    pytest.param((3, 1, 1), id="per_channel"),
    pytest.param((3, 5, 7), id="per_neuron"),
    pytest.param((2, 3, 5, 7), id="per_neuron_and_batch"),
]
V_INIT_KINDS = ("none", "scalar_tensor", "per_neuron")


def make_v_init(device, kind: str, dtype: torch.dtype):
    if kind == "none":
        return None
    if kind == "scalar_tensor":
        return torch.tensor(0.25, device=device, dtype=compute_dtype(dtype))
    return make_seq(SHAPE[1:], compute_dtype(dtype), device, seed=6, scale=0.5, shift=0.0)


@pytest.mark.parametrize("v_init_kind", V_INIT_KINDS)
@pytest.mark.parametrize("w_shape", W_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_matches_reference_for_w_and_v_init_shapes(backend, device, dtype, w_shape, v_init_kind):
    x = make_seq(SHAPE, dtype, device, seed=5)
    w = tau_weight(device, w_shape, seed=7, dtype=compute_dtype(dtype))
    assert_matches_reference(backend, x, w, make_v_init(device, v_init_kind, dtype), v_reset=None, store_v_seq=True)


@pytest.mark.parametrize("neurons", (1, 255, 257, 1000))
def test_cuda_neuron_counts_around_the_block_size(backend, device, neurons):
    x = make_seq((5, neurons), torch.float32, device, seed=8)
    assert_matches_reference(backend, x, tau_weight(device, (neurons,), seed=9), store_v_seq=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_large_neuron_count_uses_the_grid_stride_loop(backend):
    # 2^24 neurons: far more than one wave of resident threads on any GPU, so most threads scan
    # several neurons. T is small to keep the reference cheap.
    neurons = 1 << 24
    x = make_seq((3, neurons), torch.float32, CUDA, seed=10)
    w = tau_weight(CUDA, (neurons,), seed=11)
    upstream = make_upstream(CUDA, x.shape, x.dtype, seed=12)
    (spikes, v_last, _), grads = forward_backward(x, w, None, backend, upstream)
    (ref_spikes, ref_v_last, _), ref_grads = forward_backward(x, w, None, "torch", upstream)
    assert torch.equal(spikes, ref_spikes)
    torch.testing.assert_close(v_last, ref_v_last, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["x"], ref_grads["x"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["w"], ref_grads["w"], rtol=1e-4, atol=1e-5)


def test_cuda_zero_time_steps_and_zero_neurons(backend, device):
    w = torch.tensor(0.0, device=device)
    spikes, v_last, _ = plif_cuda.plif_multistep(torch.zeros(0, 4, device=device), w, 0.5, backend=backend)
    assert spikes.shape == (0, 4)
    assert torch.equal(v_last, torch.full((4,), 0.5, device=device))
    spikes, v_last, _ = plif_cuda.plif_multistep(torch.zeros(3, 0, device=device), w, backend=backend)
    assert spikes.shape == (3, 0) and v_last.shape == (0,)


def seq_channels_last(x: torch.Tensor) -> torch.Tensor:
    """[T, B, C, H, W] as a conv on the flattened [T*B, C, H, W] sequence leaves it in channels-last."""
    return x.reshape(-1, *x.shape[2:]).contiguous(memory_format=torch.channels_last).view(x.shape)


def sliced(x: torch.Tensor) -> torch.Tensor:
    """Every other element along W of a wider tensor: not dense, so the op needs a copy."""
    wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
    view = wide[..., ::2]
    view.copy_(x)
    return view


def time_not_outermost(x: torch.Tensor) -> torch.Tensor:
    """Dense, but with the batch dim outside the time dim in memory."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("layout", (seq_channels_last, sliced, time_not_outermost), ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_cuda_strided_inputs_match_contiguous(backend, device, dtype, layout):
    x = make_seq(SHAPE, dtype, device, seed=13)
    x_strided = layout(x)
    assert not x_strided.is_contiguous() and torch.equal(x_strided, x)
    w = tau_weight(device, (3, 1, 1), seed=14)
    upstream = make_upstream(device, x.shape, dtype, seed=15)
    options = {"v_reset": None, "store_v_seq": True}
    outputs, grads = forward_backward(x_strided, w, None, backend, upstream, **options)
    expected_outputs, expected_grads = forward_backward(x, w, None, backend, upstream, **options)
    for name, out, expected in zip(("spike_seq", "v_last", "v_seq"), outputs, expected_outputs):
        assert torch.equal(out, expected), f"{name} differs from the contiguous run"
    assert torch.equal(grads["x"], expected_grads["x"])
    # The per-channel sums run over the neurons in another order: equal up to rounding.
    torch.testing.assert_close(grads["w"], expected_grads["w"], rtol=1e-5, atol=1e-5)
    if layout is seq_channels_last:
        # Dense layouts are used in place and the outputs keep them (no copy either way).
        assert outputs[0].stride() == x_strided.stride()
        assert outputs[2].stride() == x_strided.stride()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay_forward_and_backward(backend):
    shape = (6, 1000)
    x = make_seq(shape, torch.float32, CUDA, seed=16).requires_grad_()
    w = torch.zeros((), device=CUDA, requires_grad=True)
    grad_spikes, grad_v_last, _ = make_upstream(CUDA, shape, torch.float32, seed=17)

    def step():
        spikes, v_last, _ = plif_cuda.plif_multistep(x, w, backend=backend)
        torch.autograd.backward([spikes, v_last], [grad_spikes, grad_v_last])
        return spikes, v_last

    # Warm up on a side stream before capture, as torch.cuda.graphs requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad, w.grad = None, None
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad, w.grad = None, None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_spikes, static_v_last = step()

    for seed in (18, 19):
        new_x = make_seq(shape, torch.float32, CUDA, seed=seed)
        with torch.no_grad():
            x.copy_(new_x)
            w.fill_(seed / 40)
        graph.replay()
        upstream = (grad_spikes, grad_v_last, torch.zeros(shape, device=CUDA))
        (spikes, v_last, _), grads = forward_backward(new_x, w, None, backend, upstream)
        assert torch.equal(static_spikes, spikes)
        assert torch.equal(static_v_last, v_last)
        assert torch.equal(x.grad, grads["x"])
        assert torch.equal(w.grad, grads["w"])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_runs_on_the_current_stream(backend):
    # The input is written on a side stream after a long sleep there. A kernel launched on any
    # other stream would run before the write and read zeros.
    shape = (4, 4096)
    source = make_seq(shape, torch.float32, CUDA, seed=20)
    w = torch.tensor(0.3, device=CUDA)
    expected_spikes, expected_v_last, _ = plif_cuda.plif_multistep(source, w, backend=backend)
    assert expected_spikes.any(), "the test input must make some neurons fire"

    x = torch.zeros(shape, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(source)
        spikes, v_last, _ = plif_cuda.plif_multistep(x, w, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(spikes, expected_spikes)
    assert torch.equal(v_last, expected_v_last)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_forward_and_backward_on_a_side_stream_equal_the_default_stream(backend):
    x = make_seq(SHAPE, torch.float32, CUDA, seed=21)
    w = tau_weight(CUDA, (3, 1, 1), seed=22)
    upstream = make_upstream(CUDA, SHAPE, torch.float32, seed=23)
    expected_outputs, expected_grads = forward_backward(x, w, None, backend, upstream, store_v_seq=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outputs, grads = forward_backward(x, w, None, backend, upstream, store_v_seq=True)
    torch.cuda.current_stream().wait_stream(side)
    for out, expected in zip(outputs, expected_outputs):
        assert torch.equal(out, expected)
    for name in expected_grads:
        assert torch.equal(grads[name], expected_grads[name]), f"gradient of {name} differs"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_second_device_while_the_first_is_current(backend):
    second = torch.device("cuda", 1)
    x = make_seq(SHAPE, torch.float32, CUDA, seed=24)
    w = tau_weight(CUDA, (3, 5, 7), seed=25)
    upstream = make_upstream(CUDA, SHAPE, torch.float32, seed=26)
    expected_outputs, expected_grads = forward_backward(x, w, None, backend, upstream)
    with torch.cuda.device(0):
        outputs, grads = forward_backward(x.to(second), w.to(second), None, backend, [g.to(second) for g in upstream])
    assert outputs[0].device == second and grads["x"].device == second and grads["w"].device == second
    for out, expected in zip(outputs[:2], expected_outputs[:2]):
        assert torch.equal(out.cpu(), expected.cpu())
    for name in expected_grads:
        assert torch.equal(grads[name].cpu(), expected_grads[name].cpu()), f"gradient of {name} differs"


@pytest.mark.parametrize("w_shape", ((), (64, 1)), ids=("per_layer", "per_channel"))
def test_cuda_w_gradient_is_bitwise_reproducible(backend, device, w_shape):
    shape = (4, 64, 4096)
    x = make_seq(shape, torch.float32, device, seed=27)
    w = tau_weight(device, w_shape, seed=28)
    upstream = make_upstream(device, shape, torch.float32, seed=29)
    first = forward_backward(x, w, None, backend, upstream)[1]["w"]
    for _ in range(3):
        again = forward_backward(x, w, None, backend, upstream)[1]["w"]
        assert torch.equal(again, first)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_cuda_keeps_one_sequence_for_backward(backend, device, dtype):
    x = make_seq(SHAPE, dtype, device, seed=30, scale=1.0, shift=0.0).requires_grad_()
    w = torch.zeros((), device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        plif_cuda.plif_multistep(x, w, backend=backend)
    sequences = [t for t in saved if t.numel() >= x.numel()]
    assert len(sequences) == 1, [tuple(t.shape) for t in saved]
    (kept,) = sequences
    assert kept.dtype == dtype
    assert kept.data_ptr() == x.data_ptr(), "the input itself is kept (and checkpoints past T=8)"


def test_cuda_opcheck(backend, device):
    x = make_seq((5, 3, 7), torch.float32, device, seed=31)
    k = torch.sigmoid(tau_weight(device, (21,), seed=32))
    v_init = torch.zeros(1, device=device)
    options = op_options()
    torch.library.opcheck(
        backends.forward_op(backend), (x, k, v_init), dict(options, spiking=True, store_v_seq=True, needs_backward=True)
    )


@pytest.mark.parametrize("argument", ("w", "v_init"))
def test_cuda_refuses_parameters_on_another_device(backend, device, argument):
    x = torch.zeros(3, 4, device=device)
    tensors = {"w": torch.zeros((), device=device), "v_init": torch.zeros(4, device=device)}
    elsewhere = "cpu" if device.type == "cuda" else "meta"
    tensors[argument] = tensors[argument].to(elsewhere)
    with pytest.raises(ValueError, match=f"{argument} is on {elsewhere}"):
        plif_cuda.plif_multistep(x, tensors["w"], tensors["v_init"], backend=backend)


@pytest.mark.skipif(
    any(backends.unavailable_reason(b, CUDA) for b in ("cuda", "cupy")), reason="needs both GPU launchers"
)
@pytest.mark.parametrize("spiking", (True, False), ids=("spiking", "smooth"))
@pytest.mark.parametrize("options", NEURON_OPTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_launchers_give_the_same_bits(dtype, options, spiking):
    """Both launchers run the same kernels with the same parameter block: every output and
    gradient is bit-equal."""
    x = make_seq((11, 5, 9), dtype, CUDA, seed=33)
    acc = compute_dtype(dtype)
    k = torch.sigmoid(tau_weight(CUDA, (45,), seed=34, dtype=acc))
    v_init = make_seq((1,), acc, CUDA, seed=35, scale=1.0, shift=0.0)
    neuron = op_options(**options, surrogate="atan", alpha=1.7, spiking=spiking)
    compiled = backends.forward_op("cuda")(x, k, v_init, **neuron, store_v_seq=True, needs_backward=True)
    nvrtc = backends.forward_op("cupy")(x, k, v_init, **neuron, store_v_seq=True, needs_backward=True)
    for a, b in zip(compiled, nvrtc):
        assert torch.equal(a, b)
    grads = (
        make_seq(x.shape, dtype, CUDA, seed=36, scale=1.0, shift=0.0),
        make_seq(x.shape[1:], acc, CUDA, seed=37, scale=1.0, shift=0.0),
        make_seq(x.shape, dtype, CUDA, seed=38, scale=1.0, shift=0.0),
    )
    # Where the op kept H's checkpoint rows, the backward recomputes H from them and x.
    saved_x = x if compiled[3].shape[0] != x.shape[0] else None
    compiled = backends.backward_op("cuda")(*grads, compiled[3], saved_x, k, v_init, x_dtype=dtype, **neuron)
    nvrtc = backends.backward_op("cupy")(*grads, nvrtc[3], saved_x, k, v_init, x_dtype=dtype, **neuron)
    for a, b in zip(compiled, nvrtc):
        assert torch.equal(a, b)
