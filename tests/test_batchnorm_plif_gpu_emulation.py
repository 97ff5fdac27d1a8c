"""The fused BatchNorm + PLIF GPU kernels (csrc/plif_bn_kernels.cuh) run on the CPU under an emulated
launch (tests/gpu_emulation/bn_emulated_launch.cpp) and compared bit for bit with the CPU op.

Cases: every dtype, a conv layer's shape (rows of one channel spanning blocks, and not), a fully
connected one (one neuron per row), a tail block, one step broadcast over time, T long enough for
the backward's chunks, tau per layer and per channel, training and eval, spiking and smooth, with
and without a gradient on the last membrane.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

import plif_cuda  # noqa: F401  (loads the compiled ops)
from helpers import REPO_ROOT, build_emulation_library
from plif_cuda import _C
from plif_cuda.batchnorm import fused_op_available
from plif_cuda.reference import compute_dtype
from plif_cuda.surrogate import resolve_surrogate
from test_gpu_emulation import BITS, DTYPE_CODES

pytestmark = [
    pytest.mark.gpu_emulation,
    pytest.mark.skipif(not fused_op_available(), reason="the compiled extension lacks the fused ops"),
]

SOURCE = REPO_ROOT / "tests" / "gpu_emulation" / "bn_emulated_launch.cpp"


@pytest.fixture(scope="session")
def emulation(tmp_path_factory):
    lib = build_emulation_library(tmp_path_factory, SOURCE)
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_double, ctypes.c_int
    options = [f64, f64, f64, i32, i32]
    lib.bn_emulate_forward.argtypes = (
        [i32, p, i64, i64, i64, i64, i64, p, p, p, p, f64, p, i32, p, i64] + options + [p, p, p, ctypes.c_char_p, i32]
    )
    lib.bn_emulate_backward.argtypes = (
        [i32, p, p, p, i64, i64, i64, i64, i64, p, p, i32, p, i64, i32] + options + [p, p, p, p, ctypes.c_char_p, i32]
    )
    lib.bn_emulate_forward.restype = lib.bn_emulate_backward.restype = i32
    return lib


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _call(fn, *args):
    error = ctypes.create_string_buffer(256)
    assert fn(*args, error, len(error)) == 0, error.value.decode()


def _geometry(y):
    neurons = y[0].numel()
    spatial = 1
    for size in y.shape[3:]:
        spatial *= size
    step = y.stride(0) if y.shape[0] > 1 else neurons
    return y.shape[0], step, neurons, y.shape[2], spatial


def _bits_equal(a, b):
    return torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))


CASES = {
    "conv": (5, 3, 4, 20, 20),  # 400 positions a row: rows span blocks (of 128 neurons)
    "conv_wide_rows": (3, 2, 3, 40, 40),  # 1600 a row: a row over many blocks
    "fc": (4, 7, 300),  # one neuron a row, a tail block
    "long": (37, 2, 3, 5, 5),  # T above the backward's chunk of 8, not a multiple of it; rows within a block
}
OPTIONS = [
    dict(surrogate="atan", detach_reset=True),
    dict(surrogate="sigmoid", v_reset=None, decay_input=False),
    dict(surrogate="erf", spiking=False, v_threshold=0.7, v_reset=-0.1),
]


def _flags(options):
    return (
        (_C.FLAG_SOFT_RESET if options.get("v_reset", 0.0) is None else 0)
        | (_C.FLAG_DECAY_INPUT if options.get("decay_input", True) else 0)
        | (_C.FLAG_DETACH_RESET if options.get("detach_reset", False) else 0)
        | (_C.FLAG_SPIKING if options.get("spiking", True) else 0)
    )


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("mode", ["training", "eval", "broadcast"])
@pytest.mark.parametrize("tau", ["layer", "channel"])
def test_kernels_equal_the_cpu_op(emulation, dtype, case, options, mode, tau):
    shape = CASES[case]
    gen = torch.Generator().manual_seed(11)
    acc = compute_dtype(dtype)
    channels = shape[2]
    y = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.4).to(dtype)
    if mode == "broadcast":
        y = y[:1].expand(shape)
    weight = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=gen, dtype=torch.float64) * 0.3 + 0.5
    running = None
    if mode == "eval":
        running = (torch.randn(channels, generator=gen, dtype=torch.float64), torch.rand(channels, generator=gen) + 1)
        running = tuple(t.double() for t in running)
    k = torch.sigmoid(torch.randn(1 if tau == "layer" else channels, generator=gen, dtype=torch.float64)).to(acc)
    v_init = (torch.rand(shape[1:], generator=gen, dtype=torch.float64) * 0.5).to(acc)
    surrogate, alpha = resolve_surrogate(options["surrogate"], None)
    neuron = dict(
        v_threshold=options.get("v_threshold", 1.0),
        v_reset=options.get("v_reset", 0.0),
        decay_input=options.get("decay_input", True),
        detach_reset=options.get("detach_reset", False),
        surrogate=surrogate,
        alpha=alpha,
        spiking=options.get("spiking", True),
    )
    spikes, v_last, terms = torch.ops.plif_cuda.bn_plif_forward(
        y, weight, bias, *(running or (None, None)), k, v_init, eps=1e-5, **neuron
    )
    geometry = _geometry(y)
    ours = (
        torch.empty(shape, dtype=dtype),
        torch.empty(shape[1:], dtype=acc),
        torch.empty(5, channels, dtype=torch.float64),
    )
    v_reset = 0.0 if neuron["v_reset"] is None else neuron["v_reset"]
    scalars = (neuron["v_threshold"], v_reset, alpha, _C.SURROGATES.index(surrogate), _flags(options))
    _call(
        emulation.bn_emulate_forward, DTYPE_CODES[dtype], y.data_ptr(), *geometry, _ptr(weight), _ptr(bias),
        _ptr(running and running[0]), _ptr(running and running[1]), 1e-5, k.data_ptr(), int(k.numel() == 1),
        v_init.data_ptr(), 1, *scalars, *(t.data_ptr() for t in ours),
    )  # fmt: skip
    assert _bits_equal(ours[2], terms)
    assert _bits_equal(ours[0], spikes)
    assert _bits_equal(ours[1], v_last)

    grad_spikes = torch.randn(shape, generator=gen).to(dtype)
    grad_v_last = torch.randn(shape[1:], generator=gen).to(acc)
    batch = mode != "eval"
    grad_y, grad_weight, grad_bias, grad_k, grad_v_init = torch.ops.plif_cuda.bn_plif_backward(
        grad_spikes,
        grad_v_last,
        y,
        terms,
        k,
        v_init,
        batch_statistics=batch,
        need_grad_y=True,
        need_grad_v_init=True,
        **neuron,
    )
    emulated = torch.empty(shape, dtype=dtype), torch.empty(3, channels, dtype=torch.float64)
    emulated_grad_v_init = torch.empty(shape[1:], dtype=acc)
    layer_grad_k = torch.empty(1, dtype=torch.float64)
    _call(
        emulation.bn_emulate_backward, DTYPE_CODES[dtype], grad_spikes.data_ptr(), grad_v_last.data_ptr(),
        y.data_ptr(), *geometry, terms.data_ptr(), k.data_ptr(), int(k.numel() == 1), v_init.data_ptr(), 1,
        int(batch), *scalars, emulated[0].data_ptr(), emulated[1].data_ptr(), emulated_grad_v_init.data_ptr(),
        layer_grad_k.data_ptr(),
    )  # fmt: skip
    assert _bits_equal(emulated[0], grad_y)
    assert _bits_equal(emulated[1][0], grad_bias)
    assert _bits_equal(emulated[1][1], grad_weight)
    assert _bits_equal(emulated_grad_v_init, grad_v_init)
    assert _bits_equal((emulated[1][2] if tau == "channel" else layer_grad_k).to(acc), grad_k)
