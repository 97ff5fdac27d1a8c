"""The fused op (``plif_multistep``) against the reference over every option, dtype and layout."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    AWKWARD_STEP_SHAPES,
    FLOAT_DTYPES,
    NEURON_OPTIONS,
    RESETS,
    SMOOTH_SURROGATES,
    SURROGATE_CASES,
    SURROGATES,
    TIME_STEPS,
    assert_grad_close,
    assert_membrane_close,
    distance_to_threshold,
    make_seq,
    outputs_loss,
    run_with_grads,
)
from plif_cuda import backends as plif_backends
from plif_cuda import plif_multistep
from plif_cuda.reference import compute_dtype


def reference(x_seq, w, v_init, **options):
    return plif_multistep(x_seq, w, v_init, backend="torch", **options)


def fused(backend):
    def call(x_seq, w, v_init, **options):
        return plif_multistep(x_seq, w, v_init, backend=backend, **options)

    return call


def param_dtype(dtype):
    """The dtype a layer's w and v_init have for input ``dtype`` (the compute dtype)."""
    return compute_dtype(dtype)


def compare_with_reference(backend, x_seq, w, v_init, x_view=None, **options):
    """Run the fused backend and the reference on the same inputs and compare everything."""
    dtype = x_seq.dtype
    (spikes, v_last, v_seq), grads = run_with_grads(fused(backend), x_seq, w, v_init, x_view, **options)
    (ref_spikes, ref_v_last, ref_v_seq), ref_grads = run_with_grads(reference, x_seq, w, v_init, x_view, **options)
    if x_view is not None:
        x_seq = x_view(x_seq)

    for out, ref in ((spikes, ref_spikes), (v_last, ref_v_last)):
        assert out.dtype == dtype and out.shape == ref.shape and out.device == x_seq.device
    if options.get("spiking", True):
        assert torch.equal(spikes, ref_spikes), "spikes differ from the reference"
    else:
        assert_membrane_close(spikes, ref_spikes)
    assert_membrane_close(v_last, ref_v_last)
    if options.get("store_v_seq", False):
        assert v_seq.dtype == dtype
        assert_membrane_close(v_seq, ref_v_seq)
    else:
        assert v_seq is None and ref_v_seq is None

    neurons_per_w = x_seq.shape[0] * x_seq[0].numel() // max(1, w.numel()) if isinstance(w, torch.Tensor) else 1
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient reached {name}"
        assert grads[name].shape == ref_grads[name].shape
        assert grads[name].dtype == ref_grads[name].dtype
        summed = neurons_per_w if name == "w" else x_seq.shape[0] if name == "v_init" else 1
        assert_grad_close(grads[name], ref_grads[name], dtype, summed_terms=summed)
    return spikes, v_last, v_seq


# ---- every option ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("surrogate, spiking", SURROGATE_CASES)
@pytest.mark.parametrize("options", NEURON_OPTIONS)
def test_every_option_matches_reference(backend, device, dtype, options, surrogate, spiking):
    # 3 * 67 neurons: one lane group of the CPU kernel (128 neurons) and a 73-neuron tail.
    x_seq = make_seq((17, 3, 67), dtype, device, seed=SURROGATES.index(surrogate))
    w = torch.tensor(0.3, dtype=param_dtype(dtype), device=device)
    v_init = 0.2 * make_seq((3, 67), param_dtype(dtype), device, seed=7)
    compare_with_reference(backend, x_seq, w, v_init, **options, spiking=spiking, surrogate=surrogate, store_v_seq=True)


@pytest.mark.parametrize("spiking", (True, False), ids=("spiking", "smooth"))
@pytest.mark.parametrize("reset", RESETS.values(), ids=RESETS.keys())
def test_without_stored_sequence(backend, device, spiking, reset):
    x_seq = make_seq((5, 2, 67), torch.float32, device)
    w = torch.tensor(-0.4, device=device)
    compare_with_reference(backend, x_seq, w, None, **reset, spiking=spiking, store_v_seq=False)


@pytest.mark.parametrize("alpha", (0.5, 3.0))
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_non_default_alpha(backend, device, surrogate, alpha):
    x_seq = make_seq((6, 70), torch.float64, device)
    w = torch.tensor(0.1, dtype=torch.float64, device=device)
    compare_with_reference(backend, x_seq, w, None, surrogate=surrogate, alpha=alpha, store_v_seq=True)


def test_non_default_threshold(backend, device):
    x_seq = make_seq((9, 3, 67), torch.float32, device, scale=0.8, shift=0.2)
    w = torch.tensor(0.5, device=device)
    for v_reset in (0.1, None):
        compare_with_reference(backend, x_seq, w, None, v_threshold=0.45, v_reset=v_reset, store_v_seq=True)


# ---- shapes of w and v_init, T, dtypes ---------------------------------------------------------
STEP_SHAPE = (2, 3, 11)  # batch 2, 3 channels, 11 positions: 66 neurons, under one 128-lane group
W_SHAPES = {"layer": (), "channel": (3, 1), "neuron": (3, 11)}
V_INITS = {"none": None, "float": 0.3, "tensor": "per-neuron"}


@pytest.mark.parametrize("T", TIME_STEPS)
@pytest.mark.parametrize("v_init_kind", V_INITS.keys())
@pytest.mark.parametrize("w_kind", W_SHAPES.keys())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("decay_input, v_reset", [(True, 0.0), (False, None)], ids=["decay-hard", "nodecay-soft"])
def test_w_and_v_init_shapes(backend, device, dtype, w_kind, v_init_kind, T, decay_input, v_reset):
    acc = param_dtype(dtype)
    x_seq = make_seq((T, *STEP_SHAPE), dtype, device, seed=T)
    generator = torch.Generator().manual_seed(3)
    w = (torch.randn(W_SHAPES[w_kind], generator=generator, dtype=torch.float64) * 0.8).to(device=device, dtype=acc)
    v_init = V_INITS[v_init_kind]
    if v_init == "per-neuron":
        v_init = 0.3 * make_seq(STEP_SHAPE, acc, device, seed=11)
    _, v_last, _ = compare_with_reference(
        backend,
        x_seq,
        w,
        v_init,
        decay_input=decay_input,
        v_reset=v_reset,
        store_v_seq=True,
        surrogate="atan",
    )
    assert v_last.shape == STEP_SHAPE


@pytest.mark.parametrize("step_shape", AWKWARD_STEP_SHAPES, ids=str)
@pytest.mark.parametrize("T", TIME_STEPS)
def test_awkward_sizes(backend, device, step_shape, T):
    x_seq = make_seq((T, *step_shape), torch.float32, device, seed=len(step_shape) + T)
    w = torch.tensor(0.0, device=device)
    compare_with_reference(backend, x_seq, w, None, store_v_seq=True, detach_reset=True)


# The CPU kernel walks blocks of 1024 neurons (8 groups of 128 lanes) in parallel, then the
# remaining whole groups, then single neurons: 2 blocks + 1 group + 5 neurons runs all three paths.
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sizes_spanning_blocks_groups_and_tail(backend, device, surrogate, dtype):
    x_seq = make_seq((5, 2 * 1024 + 128 + 5), dtype, device, seed=7)
    w = torch.randn(2 * 1024 + 128 + 5, device=device, dtype=param_dtype(dtype))
    compare_with_reference(backend, x_seq, w, 0.2, surrogate=surrogate, store_v_seq=True)


def test_long_sequence(backend, device):
    x_seq = make_seq((128, 130), torch.float32, device, scale=1.0, shift=0.3)
    compare_with_reference(backend, x_seq, torch.tensor(1.0, device=device), None, store_v_seq=True, v_reset=None)


def test_half_w_parameter(backend, device):
    """A layer converted with .half() has a half ``w``; k is still computed in float32 inside."""
    x_seq = make_seq((4, 3, 67), torch.float16, device)
    w = torch.tensor(0.7, dtype=torch.float16, device=device)
    compare_with_reference(backend, x_seq, w, None, store_v_seq=True)


# ---- layouts ------------------------------------------------------------------------------------
LAYOUT_SHAPES = {
    "sliced": (5, 3, 67),
    "transposed": (5, 2, 9, 13),
    "channels_last": (5, 6, 5, 7),
    "channels_last_3d": (4, 6, 3, 5, 7),
    "seq_channels_last": (3, 2, 6, 5, 7),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUT_SHAPES.keys())
@pytest.mark.parametrize("w_kind", ("layer", "channel"))
def test_layouts(backend, device, dtype, layout, w_kind):
    shape = LAYOUT_SHAPES[layout]
    x_seq = make_seq(shape, dtype, device, layout=layout)
    dense = layout != "sliced"
    assert not x_seq.is_contiguous()
    # The channel dimension is the first step dim for 4D/5D inputs, the second for [T, N, C, ...].
    channel_dim = 1 if layout == "seq_channels_last" else 0
    step_rank = len(shape) - 1
    if w_kind == "layer":
        w_shape = ()
    else:
        w_shape = [1] * (step_rank - channel_dim)
        w_shape[0] = shape[1 + channel_dim]
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(w_shape, generator=generator, dtype=torch.float64).to(device=device, dtype=param_dtype(dtype))
    spikes, v_last, v_seq = compare_with_reference(backend, x_seq, w, None, store_v_seq=True, v_reset=-0.5)
    if dense:
        # Outputs keep the input's memory format: the same strides, no hidden copy to row-major.
        assert spikes.stride() == x_seq.stride()
        assert v_seq.stride() == x_seq.stride()
        assert v_last.stride() == x_seq[0].stride()
    if layout == "channels_last":
        assert spikes.is_contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        assert spikes.is_contiguous(memory_format=torch.channels_last_3d)


def test_expanded_input(backend, device):
    """A broadcast (stride-0) input: the same current for every neuron of a row."""
    x_seq = make_seq((6, 3, 1), torch.float32, device)
    compare_with_reference(
        backend, x_seq, torch.tensor(0.2, device=device), None, x_view=lambda x: x.expand(6, 3, 70), store_v_seq=True
    )


# ---- special values -----------------------------------------------------------------------------
@pytest.mark.parametrize("reset", RESETS.values(), ids=RESETS.keys())
def test_nan_input_behaves_as_reference(backend, device, reset):
    x_seq = make_seq((5, 2, 67), torch.float32, device)
    x_seq[1, 0, 3] = float("nan")
    x_seq[3, 1, 66] = float("nan")
    x_seq[0, 1, 10] = float("inf")
    w = torch.tensor(0.0, device=device)
    (spikes, v_last, v_seq), grads = run_with_grads(fused(backend), x_seq, w, None, **reset, store_v_seq=True)
    (ref_spikes, ref_v_last, ref_v_seq), ref_grads = run_with_grads(
        reference, x_seq, w, None, **reset, store_v_seq=True
    )
    assert torch.equal(spikes, ref_spikes)
    assert torch.equal(v_last.isnan(), ref_v_last.isnan()) and v_last.isnan().any()
    assert_membrane_close(v_last, ref_v_last)
    assert_membrane_close(v_seq, ref_v_seq)
    assert torch.equal(grads["x"].isnan(), ref_grads["x"].isnan())
    assert_grad_close(grads["x"], ref_grads["x"], torch.float32)


@pytest.mark.parametrize("store_v_seq", (False, True))
def test_zero_time_steps(backend, device, store_v_seq):
    x_seq = torch.empty((0, 3, 5), device=device, requires_grad=True)
    w = torch.tensor(0.0, device=device, requires_grad=True)
    v_init = torch.full((3, 5), 0.25, device=device, requires_grad=True)
    spikes, v_last, v_seq = plif_multistep(x_seq, w, v_init, backend=backend, store_v_seq=store_v_seq)
    assert spikes.shape == (0, 3, 5) and spikes.dtype == x_seq.dtype
    assert torch.equal(v_last, v_init.detach())
    assert (v_seq is not None) == store_v_seq
    if store_v_seq:
        assert v_seq.shape == (0, 3, 5)
    v_last.sum().backward()
    assert torch.equal(v_init.grad, torch.ones_like(v_init))
    assert w.grad is None or torch.all(w.grad == 0)


def test_zero_neurons(backend, device):
    x_seq = torch.empty((4, 0, 3), device=device)
    spikes, v_last, v_seq = plif_multistep(x_seq, torch.tensor(0.0, device=device), backend=backend, store_v_seq=True)
    assert spikes.shape == (4, 0, 3) and v_last.shape == (0, 3) and v_seq.shape == (4, 0, 3)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_meta_tensors_give_output_shapes(layout):
    shape = (4, 2, 5, 7) if layout == "contiguous" else (4, 6, 5, 7)
    x_seq = torch.empty(shape, device="meta")
    if layout == "channels_last":
        x_seq = x_seq.contiguous(memory_format=torch.channels_last)
    w = torch.zeros((shape[1], 1, 1), device="meta", requires_grad=True)
    spikes, v_last, v_seq = plif_multistep(x_seq, w, store_v_seq=True)
    assert spikes.device.type == "meta"
    assert spikes.shape == shape and v_seq.shape == shape and v_last.shape == shape[1:]
    assert spikes.dtype == x_seq.dtype
    if layout == "channels_last":
        assert spikes.stride() == x_seq.stride()
    half = plif_multistep(x_seq.half(), torch.zeros((), device="meta"))
    assert half[0].dtype == torch.float16 and half[1].dtype == torch.float16 and half[2] is None


# ---- what backward keeps ------------------------------------------------------------------------
def _record_forward_calls(monkeypatch):
    calls = []
    real_forward_op = plif_backends.forward_op

    def recording_forward_op(backend):
        op = real_forward_op(backend)

        def call(*args, **kwargs):
            calls.append(kwargs)
            return op(*args, **kwargs)

        return call

    monkeypatch.setattr(plif_backends, "forward_op", recording_forward_op)
    return calls


def _recorded_inputs(device, monkeypatch):
    """Inputs that require gradients, the list the forward op's calls go to, and a context that
    collects what autograd saves into ``packed``."""
    calls = _record_forward_calls(monkeypatch)
    x_seq = make_seq((6, 3, 67), torch.float32, device).requires_grad_()
    w = torch.tensor(0.0, device=device, requires_grad=True)
    packed = []
    saving = torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t)
    return x_seq, w, calls, packed, saving


def test_no_grad_saves_nothing(backend, device, monkeypatch):
    x_seq, w, calls, packed, saving = _recorded_inputs(device, monkeypatch)
    with saving:
        with torch.no_grad():
            spikes, v_last, _ = plif_multistep(x_seq, w, backend=backend)
        # Nothing requires a gradient: no graph, so nothing to keep either.
        plif_multistep(x_seq.detach(), w.detach(), backend=backend)
    assert packed == []
    assert spikes.grad_fn is None and v_last.grad_fn is None
    assert [call["needs_backward"] for call in calls] == [False] * 2, "nothing to save without a gradient"


def test_backward_keeps_one_sequence_tensor(backend, device, monkeypatch):
    """For backward, at most one [T, ...] tensor (H) plus per-neuron tensors is kept."""
    x_seq, w, calls, packed, saving = _recorded_inputs(device, monkeypatch)
    with saving:
        spikes, v_last, v_seq = plif_multistep(x_seq, w, backend=backend, store_v_seq=True)
    assert calls[0]["needs_backward"] is True
    sequence_sized = [t for t in packed if t.numel() >= x_seq.numel()]
    assert len(sequence_sized) == 1, [tuple(t.shape) for t in packed]
    assert all(t.numel() <= x_seq[0].numel() for t in packed if t.numel() < x_seq.numel())
    outputs_loss(spikes, v_last, v_seq).backward()
    assert x_seq.grad is not None and w.grad is not None


# ---- determinism --------------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic_mode", (False, True), ids=("default", "use_deterministic_algorithms"))
def test_w_gradient_is_bitwise_reproducible(backend, device, deterministic_mode):
    # Enough neurons (and channels) that the CPU kernel splits the work over several threads.
    x_seq = make_seq((3, 4, 16, 33, 31), torch.float32, device, scale=1.0, shift=0.5)
    w = torch.zeros((16, 1, 1), device=device)
    w_layer = torch.tensor(0.3, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        results = []
        for _ in range(3):
            _, grads = run_with_grads(fused(backend), x_seq, w, None, store_v_seq=True)
            _, layer_grads = run_with_grads(fused(backend), x_seq, w_layer, None)
            results.append((grads["w"], grads["x"], layer_grads["w"]))
    finally:
        torch.use_deterministic_algorithms(previous)
    for grad_w, grad_x, grad_w_layer in results[1:]:
        assert torch.equal(grad_w, results[0][0])
        assert torch.equal(grad_x, results[0][1])
        assert torch.equal(grad_w_layer, results[0][2])


# ---- float64 gradcheck --------------------------------------------------------------------------
GRADCHECK_RESETS = {"hard": -0.2, "soft": None}


def _gradcheck_inputs(device, seed, v_reset, margin=None, options=None):
    """Small float64 inputs; with ``margin``, redrawn until every H stays ``margin`` away from the
    threshold (so that finite differences never cross a spike discontinuity)."""
    for attempt in range(200):
        x_seq = make_seq((3, 2, 3), torch.float64, device, seed=seed * 1000 + attempt, scale=0.9, shift=0.5)
        generator = torch.Generator().manual_seed(seed * 1000 + attempt)
        w = (torch.randn((3,), generator=generator, dtype=torch.float64) * 0.5).to(device)
        v_init = (torch.randn((2, 3), generator=generator, dtype=torch.float64) * 0.3).to(device)
        if margin is None or distance_to_threshold(x_seq, w, v_init, v_reset, **options) > margin:
            return x_seq.requires_grad_(), w.requires_grad_(), v_init.requires_grad_()
    raise AssertionError("could not draw gradcheck inputs away from the threshold")


@pytest.mark.parametrize("decay_input", (True, False), ids=("decay", "nodecay"))
@pytest.mark.parametrize("v_reset", GRADCHECK_RESETS.values(), ids=GRADCHECK_RESETS.keys())
@pytest.mark.parametrize("surrogate", SMOOTH_SURROGATES)
def test_gradcheck_smooth_mode(backend, device, surrogate, v_reset, decay_input):
    inputs = _gradcheck_inputs(device, seed=SURROGATES.index(surrogate), v_reset=v_reset)

    options = dict(v_reset=v_reset, decay_input=decay_input, surrogate=surrogate, spiking=False, store_v_seq=True)

    def all_outputs(x_seq, w, v_init):
        return plif_multistep(x_seq, w, v_init, backend=backend, **options)

    assert torch.autograd.gradcheck(all_outputs, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("decay_input", (True, False), ids=("decay", "nodecay"))
@pytest.mark.parametrize("v_reset", GRADCHECK_RESETS.values(), ids=GRADCHECK_RESETS.keys())
@pytest.mark.parametrize("surrogate", ("sigmoid", "atan", "super_spike"))
def test_gradcheck_spiking_membranes(backend, device, surrogate, v_reset, decay_input):
    """With detach_reset the membranes are piecewise smooth in every input, and exactly
    differentiable away from the threshold: the surrogate only enters through the spikes."""
    options = dict(decay_input=decay_input)
    inputs = _gradcheck_inputs(device, seed=5, v_reset=v_reset, margin=1e-3, options=options)
    spikes, _, _ = plif_multistep(*[t.detach() for t in inputs], v_reset=v_reset, backend=backend, **options)
    assert spikes.any() and not spikes.all(), "inputs should make some neurons fire and some not"

    def membranes(x_seq, w, v_init):
        _, v_last, v_seq = plif_multistep(
            x_seq,
            w,
            v_init,
            v_reset=v_reset,
            detach_reset=True,
            surrogate=surrogate,
            store_v_seq=True,
            backend=backend,
            **options,
        )
        return v_last, v_seq

    assert torch.autograd.gradcheck(membranes, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
