"""Every line of the CUDA kernels run on the CPU: csrc/plif_kernels.cuh compiled by the host
compiler under an emulation of the launch (tests/gpu_emulation/emulated_launch.cpp), with the grid
the extension's launcher picks, the alignment of every vector access checked, and the results
compared bit for bit with the fused CPU kernel.

The cases cover both memory paths of the kernels (vector accesses, picked for large N on aligned
tensors, and the scalar one for small N, tails and misaligned tensors), T below, at and above
the steps a chunk loads ahead and not a multiple of them, every option, surrogate and dtype,
absent gradients, and x read with its steps any distance apart (one step broadcast over time,
slices), compared with the CPU kernel on its contiguous copy. The host picks the forward's path
with its grid (csrc/plif_launch.h, forward_shape): the vector path where it keeps at least as many
bytes in flight as one neuron per thread, from about twice the resident threads on; to reach it with
a few thousand neurons, the emulated device keeps only one or two blocks resident. Only the spiking
mode takes it. The half types' backward has a lanes path too (backward_shape): two neurons per
thread, one 4-byte word of both per step and stream, wherever N and x's step are even and the
streams on 4-byte words (spiking mode); every other backward takes one neuron per thread.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

import plif_cuda  # noqa: F401  (loads the compiled ops)
from helpers import NEURON_OPTIONS, REPO_ROOT, SURROGATE_CASES, build_emulation_library, op_options
from plif_cuda import _C
from plif_cuda.reference import compute_dtype

pytestmark = pytest.mark.gpu_emulation

SOURCE = REPO_ROOT / "tests" / "gpu_emulation" / "emulated_launch.cpp"
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES = tuple(DTYPE_CODES)
# Integer views for bit-for-bit comparison (NaN payloads and signed zeros included).
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# Resident blocks of the emulated device: an H200 at four 256-thread blocks per multiprocessor
# (scalar path for every N here), and devices small enough for the vector path.
H200_BLOCKS = 132 * 4
T_LONG = 37  # prime: no chunk size divides it, and above the deepest chunk (32 steps)


@pytest.fixture(scope="session")
def emulation(tmp_path_factory):
    """The emulation library, built once per session (a few seconds)."""
    lib = build_emulation_library(tmp_path_factory, SOURCE)
    pointer, i64, f64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_double, ctypes.c_int
    tail = [i64, i64, i64, i64, i64, f64, f64, f64, i32, i32, i64, ctypes.c_char_p, i32]
    lib.plif_emulate_forward.argtypes = [i32] + [pointer] * 7 + tail
    lib.plif_emulate_backward.argtypes = [i32] + [pointer] * 10 + tail
    lib.plif_emulate_vector_load.argtypes = [pointer, ctypes.c_char_p, i32]
    lib.plif_emulated_barriers.argtypes = []
    for fn in (lib.plif_emulate_forward, lib.plif_emulate_backward, lib.plif_emulate_vector_load):
        fn.restype = i64
    lib.plif_emulated_barriers.restype = i64
    return lib


def _call(fn, *args) -> int:
    error = ctypes.create_string_buffer(256)
    count = fn(*args, error, len(error))
    assert count >= 0, error.value.decode()
    return count


def _ptr(t: torch.Tensor | None):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _placed(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t``'s values in a contiguous tensor whose data starts ``offset`` elements into a fresh
    allocation: 0 is 16-byte aligned, 1 is not."""
    flat = torch.empty(t.numel() + offset + 8, dtype=t.dtype)
    placed = flat[offset : offset + t.numel()].view(t.shape)
    placed.copy_(t)
    return placed


def _empty_placed(shape, dtype, offset: int) -> torch.Tensor:
    return _placed(torch.full(shape, float("nan"), dtype=dtype), offset)


def _placed_steps(x: torch.Tensor, step: int, offset: int) -> torch.Tensor:
    """``x`` ([T, N]) as a view whose steps lie ``step`` elements apart (0: one step read at every
    time step), starting ``offset`` elements into a fresh allocation whose gaps hold NaN."""
    steps, neurons = x.shape
    flat = torch.full((max(steps - 1, 0) * step + neurons + offset + 8,), float("nan"), dtype=x.dtype)
    placed = flat.as_strided(x.shape, (step, 1), offset)
    if step == 0:
        placed[:1].copy_(x[:1])
    else:
        placed.copy_(x)
    return placed


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, name: str):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    same = actual.contiguous().view(BITS[actual.dtype]) == expected.contiguous().view(BITS[expected.dtype])
    if not bool(same.all()):
        index = int((~same).flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int((~same).sum())} of {same.numel()} values differ from the CPU kernel; "
            f"first at flat index {index}: {actual.flatten()[index]} vs {expected.flatten()[index]}"
        )


def _flags(options) -> int:
    return (
        (_C.FLAG_SOFT_RESET if options["v_reset"] is None else 0)
        | (_C.FLAG_DECAY_INPUT if options["decay_input"] else 0)
        | (_C.FLAG_DETACH_RESET if options["detach_reset"] else 0)
        | (_C.FLAG_SPIKING if options["spiking"] else 0)
    )


def _kernel_scalars(options, save=_C.SAVE_H):
    """v_threshold, v_reset, alpha, surrogate id, flags: the kernels' scalar block after the sizes."""
    checkpoints = _C.FLAG_H_CHECKPOINTS if save == _C.SAVE_CHECKPOINTS else 0
    v_reset = 0.0 if options["v_reset"] is None else options["v_reset"]
    surrogate = _C.SURROGATES.index(options["surrogate"])
    return options["v_threshold"], v_reset, options["alpha"], surrogate, _flags(options) | checkpoints


def forward_lanes(dtype) -> int:
    return 16 // dtype.itemsize


def is_half(dtype) -> bool:
    """The half types, whose backward takes two neurons per thread where it can."""
    return dtype.itemsize == 2


def run_case(
    lib,
    dtype,
    steps,
    neurons,
    options,
    resident_blocks,
    *,
    offset=0,
    x_offset=None,
    per_neuron=True,
    store_v_seq=True,
    grads=("spikes", "v_last", "v_seq"),
    seed=0,
    save=_C.SAVE_H,
    x_step=None,
) -> tuple[int, int]:
    """Forward and backward through the CPU op and through the emulated kernels, on inputs and
    outputs placed ``offset`` elements into their allocations (x and grad_spikes ``x_offset``);
    asserts every output bit-equal (a shared k's and v_init's gradient, summed in another
    partition, to rounding). ``save``: what the compared forward keeps (every H, or checkpoints);
    the backward, on CPU and GPU alike, recomputes H from x and the checkpoints. ``x_step``:
    elements between the emulated x's steps (None: N, contiguous; 0: one step broadcast over
    time); the CPU op gets the contiguous copy. Returns the vector accesses of the emulated forward and backward."""
    x_offset = offset if x_offset is None else x_offset
    x_step = neurons if x_step is None else x_step
    generator = torch.Generator().manual_seed(seed)
    acc = compute_dtype(dtype)
    x = (torch.randn(steps, neurons, generator=generator, dtype=torch.float64) * 1.5 + 0.4).to(dtype)
    if x_step == 0:
        x = x[:1].expand(steps, neurons).contiguous()
    count = neurons if per_neuron else 1
    k = torch.sigmoid(torch.randn(count, generator=generator, dtype=torch.float64) * 0.6).to(acc)
    v_init = (torch.randn(count, generator=generator, dtype=torch.float64) * 0.5).to(acc)
    ops = torch.ops.plif_cuda

    spikes, v_last, v_seq, h_seq = torch.ops.plif_cuda_internal.multistep_forward_saving(
        x, k, v_init, **options, store_v_seq=store_v_seq, save=save
    )
    em_x = _placed_steps(x, x_step, x_offset)
    em = {
        "spikes": _empty_placed(x.shape, dtype, offset),
        "v_last": _empty_placed(v_last.shape, v_last.dtype, offset),
        "v_seq": _empty_placed(x.shape, dtype, offset) if store_v_seq else None,
        "h_seq": _empty_placed(h_seq.shape, acc, offset),
    }
    stride = 1 if per_neuron else 0
    # Named, so that they live until the kernels have run.
    em_k, em_v_init = _placed(k, offset), _placed(v_init, offset)
    # Both kernels' arguments after the tensors: k's and v_init's strides, the sizes, the options.
    scalars = (stride, stride, steps, neurons, x_step, *_kernel_scalars(options, save), resident_blocks)
    forward_tensors = (em_x, em_k, em_v_init, em["spikes"], em["v_last"], em["v_seq"], em["h_seq"])
    forward_vectors = _call(lib.plif_emulate_forward, DTYPE_CODES[dtype], *map(_ptr, forward_tensors), *scalars)
    assert_bits_equal(em["spikes"], spikes, "spikes")
    assert_bits_equal(em["v_last"], v_last, "v_last")
    assert_bits_equal(em["h_seq"], h_seq, "h_seq")
    if store_v_seq:
        assert_bits_equal(em["v_seq"], v_seq, "v_seq")

    upstream = {
        name: torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)
        for name, out in (("spikes", spikes), ("v_last", v_last), ("v_seq", x))
    }
    grad_spikes = upstream["spikes"] if "spikes" in grads else None
    grad_v_last = upstream["v_last"] if "v_last" in grads else None
    grad_v_seq = upstream["v_seq"] if "v_seq" in grads else None
    if save != _C.SAVE_CHECKPOINTS:
        h_seq = torch.ops.plif_cuda_internal.multistep_forward_saving(
            x, k, v_init, **options, store_v_seq=False, save=_C.SAVE_CHECKPOINTS
        )[3]
    grad_x, grad_k, grad_v_init = ops.multistep_backward(
        grad_spikes, grad_v_last, grad_v_seq, h_seq, x, k, v_init, x_dtype=dtype, **options
    )

    em_inputs = [
        None if t is None else _placed(t, at)
        for t, at in ((grad_spikes, x_offset), (grad_v_last, offset), (grad_v_seq, offset), (h_seq, offset))
    ]
    em_inputs.append(em_x)
    em_grad_x = _empty_placed(x.shape, dtype, offset)
    em_grad_k = _empty_placed((count,), acc, offset)
    em_grad_v_init = _empty_placed((count,), acc, offset)
    backward_tensors = (*em_inputs, em_k, em_v_init, em_grad_x, em_grad_k, em_grad_v_init)
    backward_scalars = (*scalars[:5], *_kernel_scalars(options, _C.SAVE_CHECKPOINTS), resident_blocks)
    backward_vectors = _call(
        lib.plif_emulate_backward, DTYPE_CODES[dtype], *map(_ptr, backward_tensors), *backward_scalars
    )
    assert_bits_equal(em_grad_x, grad_x, "grad_x")
    if per_neuron:
        assert_bits_equal(em_grad_k, grad_k, "grad_k")
        assert_bits_equal(em_grad_v_init, grad_v_init, "grad_v_init")
    else:
        # Where k and v_init are one value, their gradients are the sums of the neurons' shares,
        # which the CPU kernel sums per block of neurons and the GPU kernels per thread block: each
        # within rounding of the shares' sum, which the same call with k and v_init given per
        # neuron returns (bit for bit the same arithmetic per neuron).
        _, shares_k, shares_v_init = ops.multistep_backward(
            grad_spikes,
            grad_v_last,
            grad_v_seq,
            h_seq,
            x,
            k.expand(neurons).contiguous(),
            v_init.expand(neurons).contiguous(),
            x_dtype=dtype,
            **options,
        )
        for name, shares, totals in (
            ("grad_k", shares_k, (grad_k, em_grad_k)),
            ("grad_v_init", shares_v_init, (grad_v_init, em_grad_v_init)),
        ):
            scale = shares.double().abs().sum().item()
            for total in totals:
                assert total.shape == (1,), name
                torch.testing.assert_close(
                    total.double(), shares.double().sum().reshape(1), rtol=0.0, atol=1e-6 * scale + 1e-30
                )
    return forward_vectors, backward_vectors


# (resident blocks, neurons): the scalar path on an H200-sized grid with a tail in every dtype's
# lanes, and the vector path, with a grid-stride loop, on a device keeping two blocks resident.
GEOMETRIES = [
    pytest.param(H200_BLOCKS, 1000, id="scalar"),
    pytest.param(2, 2 * 256 * 8 * 2, id="vector"),
]


@pytest.mark.parametrize("resident_blocks, neurons", GEOMETRIES)
@pytest.mark.parametrize("options", NEURON_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_option_bit_equal_to_the_cpu_kernel(emulation, dtype, options, resident_blocks, neurons):
    forward_vectors, backward_vectors = run_case(
        emulation, dtype, T_LONG, neurons, op_options(**options), resident_blocks
    )
    vector = resident_blocks != H200_BLOCKS
    # Every N here is even and every tensor aligned: the half types' backward takes its lanes path.
    assert (forward_vectors > 0) == vector and (backward_vectors > 0) == is_half(dtype)


@pytest.mark.parametrize("surrogate, spiking", SURROGATE_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_every_surrogate_bit_equal_on_both_paths(emulation, dtype, surrogate, spiking):
    options = op_options(surrogate=surrogate, alpha=1.7, spiking=spiking)
    run_case(emulation, dtype, T_LONG, 600, options, H200_BLOCKS, seed=1)
    forward_vectors, _ = run_case(emulation, dtype, T_LONG, 4096, options, 1, seed=2)
    assert (forward_vectors > 0) == spiking


@pytest.mark.parametrize("steps", (1, 2, 3, 4, 5, 13, 33), ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_time_steps_around_the_chunk_sizes(emulation, dtype, steps):
    options = op_options(v_reset=None, surrogate="piecewise_quadratic")
    run_case(emulation, dtype, steps, 100, options, H200_BLOCKS, seed=steps)
    run_case(emulation, dtype, steps, 2048, options, 1, seed=steps)


@pytest.mark.parametrize("neurons", (1, 3, 4095, 4097, 4100), ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neuron_counts_with_tails_take_the_scalar_path(emulation, dtype, neurons):
    # One resident block (256 threads), T = 9: the vector path is chosen where N is a multiple of
    # the lanes and fills the block at that many neurons per thread; 4100 is a multiple of 4
    # (float32's lanes) and 2 (float64's).
    forward_vectors, backward_vectors = run_case(emulation, dtype, 9, neurons, op_options(), 1, seed=neurons)
    lanes = forward_lanes(dtype)
    assert (forward_vectors > 0) == (neurons == 4100 and lanes <= 4)
    assert (backward_vectors > 0) == (neurons == 4100 and is_half(dtype))


# (dtype, neurons, vector path chosen) on a device keeping 2 blocks (512 threads) resident, T = 8,
# where one neuron per thread keeps 512 x 8 steps x 2 B = 8 KiB in flight (float32: 16 KiB) and
# the vector path N / LANES threads x 4 steps x 16 B. The old rule, inside the kernel, took the
# vector path only from N = LANES x 512 on (4096 half neurons): these are the sizes of 2^20 half
# neurons on an H100, which it ran one neuron per thread.
PATH_CHOICES = [
    pytest.param(torch.float16, 2048, True, id="float16-4x_threads-vector"),
    pytest.param(torch.bfloat16, 1024, True, id="bfloat16-2x_threads-tie-vector"),
    pytest.param(torch.float16, 768, False, id="float16-1.5x_threads-scalar"),
    pytest.param(torch.float32, 1024, True, id="float32-2x_threads-tie-vector"),
    pytest.param(torch.float32, 1020, False, id="float32-below_2x_threads-scalar"),
]


@pytest.mark.parametrize("dtype, neurons, vector", PATH_CHOICES)
def test_the_host_picks_the_path_from_n_over_lanes(emulation, dtype, neurons, vector):
    forward_vectors, _ = run_case(emulation, dtype, 8, neurons, op_options(), 2, seed=neurons)
    # Every vector access moves 16 bytes: x's loads and the spikes, H and V rows' stores.
    assert (forward_vectors > 0) == vector


def test_forward_shape_on_an_h100():
    """The rule both launchers follow, for an H100 (132 multiprocessors x 4 forward blocks of 256
    threads: 135168 resident threads), T = 8: expectations worked out by hand."""
    resident, aligned = 132 * 4, (4096, 8192, 0, 12288)
    spiking = _C.FLAG_SPIKING
    vector = _C.FLAG_VECTOR_PATH
    # 2^20 half neurons: 131072 threads x 64 B (8.4 MB) beat 135168 x 16 B (2.2 MB): 512 blocks.
    assert _C.forward_shape(8, 2**20, 2**20, 2, spiking, resident, *aligned) == (512, vector)
    # 2^18: 32768 threads x 64 B (2.10 MB) against 135168 x 16 B (2.16 MB): one neuron per thread.
    assert _C.forward_shape(8, 2**18, 2**18, 2, spiking, resident, *aligned) == (resident, 0)
    # float32, 2^20: 262144 threads wanted, capped at the resident 528 blocks either way.
    assert _C.forward_shape(8, 2**20, 2**20, 4, spiking, resident, *aligned) == (resident, vector)
    # Not on 16-byte words (x, or x's steps), N not whole vectors, or the smooth mode: scalar.
    assert _C.forward_shape(8, 2**20, 2**20, 2, spiking, resident, 4098, 8192, 0, 0) == (resident, 0)
    assert _C.forward_shape(8, 2**20, 2**20 + 4, 2, spiking, resident, *aligned) == (resident, 0)
    assert _C.forward_shape(8, 2**20 + 4, 2**20 + 4, 2, spiking, resident, *aligned) == (resident, 0)
    assert _C.forward_shape(8, 2**20, 2**20, 2, 0, resident, *aligned) == (resident, 0)
    # One step broadcast over time (x_step 0) is on words at every step.
    assert _C.forward_shape(8, 2**20, 0, 2, spiking, resident, *aligned) == (512, vector)


def test_backward_shape_on_an_h100():
    """The backward's rule (132 multiprocessors x 2 backward blocks: 264), worked out by hand: the
    half types take two neurons per thread wherever they can, the wider types one."""
    resident, aligned = 132 * 2, (4096, 8192, 0, 12288)
    spiking, lanes = _C.FLAG_SPIKING, _C.FLAG_VECTOR_PATH
    assert _C.backward_shape(2**20, 2**20, 2, spiking, resident, *aligned) == (resident, lanes)
    assert _C.backward_shape(1000, 1000, 2, spiking, resident, *aligned) == (2, lanes)  # 500 threads
    assert _C.backward_shape(1000, 1000, 4, spiking, resident, *aligned) == (4, 0)
    assert _C.backward_shape(1000, 1000, 8, spiking, resident, *aligned) == (4, 0)
    # N or x's step odd, a stream off its 4-byte word, or the smooth mode: one neuron per thread.
    assert _C.backward_shape(1001, 1001, 2, spiking, resident, *aligned) == (4, 0)
    assert _C.backward_shape(1000, 1001, 2, spiking, resident, *aligned) == (4, 0)
    assert _C.backward_shape(1000, 1000, 2, spiking, resident, 4096, 8192, 0, 12290) == (4, 0)
    assert _C.backward_shape(1000, 1000, 2, 0, resident, *aligned) == (4, 0)


@pytest.mark.parametrize("offsets", [(1, 1), (3, 3), (0, 1), (1, 0)], ids=lambda o: f"others{o[0]}-x{o[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_tensors_take_the_scalar_path(emulation, dtype, offsets):
    # Offsets in elements: 1 and 3 leave every dtype off its 16-byte alignment. One misaligned
    # stream is enough to take the whole launch down the scalar path.
    offset, x_offset = offsets
    forward_vectors, backward_vectors = run_case(
        emulation, dtype, 11, 4096, op_options(), 1, offset=offset, x_offset=x_offset
    )
    assert forward_vectors == 0 and backward_vectors == 0


@pytest.mark.parametrize(
    "grads", [("spikes",), ("v_last",), ("v_seq",), ("spikes", "v_seq"), ()], ids=lambda g: "+".join(g) or "none"
)
@pytest.mark.parametrize("resident_blocks", (H200_BLOCKS, 1), ids=("scalar", "vector"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_absent_gradients(emulation, dtype, grads, resident_blocks):
    # Without grad_spikes the backward's chunks load H's rows in its place (and drop the values),
    # read as gradients of the input dtype.
    run_case(emulation, dtype, 10, 1024, op_options(), resident_blocks, grads=grads, store_v_seq="v_seq" in grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_tau_and_v_init_without_v_seq(emulation, dtype):
    run_case(emulation, dtype, 10, 2048, op_options(detach_reset=True), 1, per_neuron=False, store_v_seq=False)


@pytest.mark.parametrize("asked", [("k", "v_init"), ("k",), ("v_init",), ()], ids=lambda a: "+".join(a) or "none")
@pytest.mark.parametrize("per_neuron", (True, False), ids=("per_neuron", "shared"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_gradients_nobody_asks_for_cost_nothing(emulation, dtype, per_neuron, asked):
    """A null grad_k (grad_v_init) is a gradient nobody asked for (v_init's for a fresh layer, a
    frozen tau's): the backward stores none of it, and for a shared one sums no shares, takes no
    barrier and writes no partials; grad_x and the asked-for gradients are what the CPU kernel
    gives. (A store through the null pointer would end the test process.)"""
    steps, neurons, resident_blocks = 10, 1500, 2
    options = op_options()
    generator = torch.Generator().manual_seed(7)
    acc = compute_dtype(dtype)
    x = torch.randn(steps, neurons, generator=generator).to(dtype)
    count = neurons if per_neuron else 1
    k = torch.sigmoid(torch.randn(count, generator=generator)).to(acc)
    v_init = (torch.randn(count, generator=generator) * 0.5).to(acc)
    _, _, _, h_seq = torch.ops.plif_cuda_internal.multistep_forward_saving(
        x, k, v_init, **options, store_v_seq=False, save=_C.SAVE_CHECKPOINTS
    )
    grad_spikes = torch.randn(steps, neurons, generator=generator).to(dtype)
    grad_x, grad_k, grad_v_init = torch.ops.plif_cuda.multistep_backward(
        grad_spikes, None, None, h_seq, x, k, v_init, x_dtype=dtype, **options
    )
    em_grad_x = torch.full_like(x, float("nan"))
    em_grad = {name: torch.full((count,), float("nan"), dtype=acc) for name in ("k", "v_init")}
    stride = 1 if per_neuron else 0
    tensors = (grad_spikes, None, None, h_seq, x, k, v_init, em_grad_x)
    tensors += tuple(em_grad[name] if name in asked else None for name in ("k", "v_init"))
    scalars = (stride, stride, steps, neurons, neurons, *_kernel_scalars(options, _C.SAVE_CHECKPOINTS))
    _call(emulation.plif_emulate_backward, DTYPE_CODES[dtype], *map(_ptr, tensors), *scalars, resident_blocks)
    assert_bits_equal(em_grad_x, grad_x, "grad_x")
    for name, expected in (("k", grad_k), ("v_init", grad_v_init)):
        if name not in asked:
            continue
        if per_neuron:
            assert_bits_equal(em_grad[name], expected, f"grad_{name}")
        else:
            torch.testing.assert_close(em_grad[name], expected, rtol=1e-5, atol=1e-4)  # summed in another order
    # Each asked-for shared parameter: two barriers per thread of each of the 2 blocks (the block's
    # partial sum); nothing else in the backward waits.
    shared_asked = 0 if per_neuron else len(asked)
    assert emulation.plif_emulated_barriers() == shared_asked * 2 * resident_blocks * 256


def test_a_misaligned_vector_access_is_reported(emulation):
    buffer = torch.zeros(16)
    assert _call(emulation.plif_emulate_vector_load, buffer.data_ptr()) == 1
    error = ctypes.create_string_buffer(256)
    assert emulation.plif_emulate_vector_load(buffer[1:].data_ptr(), error, len(error)) == -1
    assert b"misaligned 16-byte vector access" in error.value


@pytest.mark.parametrize(
    "neurons, resident_blocks, blocks",
    [
        (0, 528, 1),
        (1, 528, 1),
        (256, 528, 1),
        (257, 528, 2),
        (3000, 7, 7),
        (10**9, 528, 528),
        (5000, 0, 1),  # an occupancy of 0 (the kernel cannot launch): one block, and the launch reports why
    ],
    ids=lambda v: str(v),
)
def test_grid_rule_of_both_launchers(neurons, resident_blocks, blocks):
    # The one rule (csrc/plif_launch.h) that the nvcc launcher, the NVRTC one (through _C.launch_blocks)
    # and the emulation above launch with: one thread per neuron, capped at the resident blocks.
    assert _C.THREADS_PER_BLOCK == 256
    assert _C.launch_blocks(neurons, resident_blocks) == blocks


# ---- checkpoints (half inputs keep x and every eighth H; the backward recomputes the rest) -----
CHECKPOINT_STEPS = (1, 7, 8, 9, 16, 17, T_LONG)


@pytest.mark.parametrize("resident_blocks, neurons", GEOMETRIES)
@pytest.mark.parametrize("options", NEURON_OPTIONS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_checkpoints_every_option_bit_equal_to_the_cpu_kernel(emulation, dtype, options, resident_blocks, neurons):
    """The forward stores the checkpoint rows only; the backward recomputes H from x in
    registers, two neurons per thread (4-byte words: N is even, the tensors aligned), and equals
    the CPU kernel."""
    _, backward_vectors = run_case(
        emulation, dtype, T_LONG, neurons, op_options(**options), resident_blocks, save=_C.SAVE_CHECKPOINTS
    )
    assert backward_vectors > 0


@pytest.mark.parametrize("steps", CHECKPOINT_STEPS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_checkpoints_at_every_sequence_length(emulation, dtype, steps):
    options = op_options(v_reset=None, surrogate="piecewise_quadratic")
    run_case(emulation, dtype, steps, 300, options, H200_BLOCKS, seed=steps, save=_C.SAVE_CHECKPOINTS)
    run_case(emulation, dtype, steps, 2048, options, 1, seed=steps, offset=1, save=_C.SAVE_CHECKPOINTS)


@pytest.mark.parametrize("surrogate, spiking", SURROGATE_CASES)
def test_checkpoints_every_surrogate(emulation, surrogate, spiking):
    run_case(
        emulation,
        torch.bfloat16,
        20,
        700,
        op_options(surrogate=surrogate, alpha=1.7, spiking=spiking),
        H200_BLOCKS,
        seed=3,
        save=_C.SAVE_CHECKPOINTS,
    )


@pytest.mark.parametrize(
    "grads", [("spikes",), ("v_last",), ("v_seq",), ("spikes", "v_seq"), ()], ids=lambda g: "+".join(g) or "none"
)
def test_checkpoints_absent_gradients(emulation, grads):
    run_case(
        emulation,
        torch.float16,
        19,
        1024,
        op_options(),
        1,
        grads=grads,
        store_v_seq="v_seq" in grads,
        per_neuron=False,
        save=_C.SAVE_CHECKPOINTS,
    )


# ---- x read in place: steps any distance apart (a broadcast over time, a slice) -----------------
# Elements between x's steps, as a function of N and the dtype's lanes: one step broadcast over
# time (y.expand(T, ...)), every other step of a longer sequence (x[::2]), a slice of wider rows
# that keeps every step on a 16-byte word, and one that does not.
X_STEPS = [
    pytest.param(lambda neurons, lanes: 0, id="broadcast"),
    pytest.param(lambda neurons, lanes: 2 * neurons, id="every_other_step"),
    pytest.param(lambda neurons, lanes: neurons + lanes, id="aligned_slice"),
    pytest.param(lambda neurons, lanes: neurons + 1, id="misaligned_slice"),
]


@pytest.mark.parametrize("x_step_of", X_STEPS)
@pytest.mark.parametrize("resident_blocks, neurons", GEOMETRIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_steps_bit_equal_to_the_contiguous_copy(emulation, dtype, resident_blocks, neurons, x_step_of):
    """The kernels read x's steps where they are: the results are those of its contiguous copy,
    and the vector path is taken whenever every step starts on a 16-byte word (the half types'
    backward lanes path: a 4-byte word)."""
    lanes = forward_lanes(dtype)
    x_step = x_step_of(neurons, lanes)
    forward_vectors, backward_vectors = run_case(
        emulation, dtype, T_LONG, neurons, op_options(detach_reset=True), resident_blocks, seed=5, x_step=x_step
    )
    assert (forward_vectors > 0) == (resident_blocks != H200_BLOCKS and x_step % lanes == 0)
    assert (backward_vectors > 0) == (is_half(dtype) and x_step % 2 == 0)


@pytest.mark.parametrize("x_step_of", X_STEPS)
@pytest.mark.parametrize("steps", (1, 9, T_LONG), ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_checkpoints_recompute_from_strided_steps(emulation, dtype, steps, x_step_of):
    """From checkpoints the backward reads x again: in place too, at the same step."""
    x_step = x_step_of(300, forward_lanes(dtype))
    options = op_options(v_reset=None, surrogate="atan")
    run_case(emulation, dtype, steps, 300, options, H200_BLOCKS, seed=steps, x_step=x_step, save=_C.SAVE_CHECKPOINTS)
    run_case(
        emulation,
        dtype,
        steps,
        2048,
        options,
        1,
        seed=steps,
        x_step=x_step_of(2048, forward_lanes(dtype)),
        save=_C.SAVE_CHECKPOINTS,
    )
