"""What a forward keeps for the backward (issue 13): half inputs keep themselves and every
eighth H (SAVE_CHECKPOINTS), at most 2.5 bytes per neuron-step, and the backward recomputes the
rest; gradients equal those from every H bit for bit."""

from __future__ import annotations

import pytest
import torch

import plif_cuda
from helpers import NEURON_OPTIONS, SURROGATE_CASES, assert_grad_close, op_options, printed_by_fresh_interpreter
from plif_cuda import _C
from plif_cuda.reference import compute_dtype

HALF_DTYPES = (torch.float16, torch.bfloat16)


def saved_bytes(forward) -> int:
    """Bytes autograd keeps for backward, once per distinct storage (as the benchmark counts)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


def _inputs(T, N, dtype, per_neuron, seed=0):
    generator = torch.Generator().manual_seed(seed)
    acc = compute_dtype(dtype)
    x = (torch.randn(T, N, generator=generator, dtype=torch.float64) * 1.5 + 0.4).to(dtype)
    count = N if per_neuron else 1
    k = torch.sigmoid(torch.randn(count, generator=generator, dtype=torch.float64) * 0.6).to(acc)
    v_init = (torch.randn(count, generator=generator, dtype=torch.float64) * 0.5).to(acc)
    grads = (
        torch.randn(T, N, generator=generator).to(dtype),
        torch.randn(N, generator=generator).to(acc),
        torch.randn(T, N, generator=generator).to(dtype),
    )
    return x, k, v_init, grads


def _both_modes(x, k, v_init, options, grads):
    """Forward and backward op from every H and from the checkpoints; returns both result pairs."""
    results = []
    for save in (_C.SAVE_H, _C.SAVE_CHECKPOINTS):
        forward = torch.ops.plif_cuda_internal.multistep_forward_saving(
            x, k, v_init, **options, store_v_seq=True, save=save
        )
        saved_x = x if save == _C.SAVE_CHECKPOINTS else None
        backward = torch.ops.plif_cuda.multistep_backward(
            *grads, forward[3], saved_x, k, v_init, x_dtype=x.dtype, **options
        )
        results.append((forward, backward))
    return results


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("steps", (1, 8, 9, 16, 100))
def test_half_inputs_keep_at_most_2_5_bytes_per_neuron_step(dtype, steps):
    x = torch.randn(steps, 4, 300).to(dtype).requires_grad_()
    w = torch.tensor(0.2, requires_grad=True)
    kept = saved_bytes(lambda: plif_cuda.plif_multistep(x, w, backend="cpu"))
    # x itself (2 B) and one fp32 H per 8 steps, but none for the last chunk.
    expected = x.numel() * 2 + _C.checkpoint_rows(steps) * 1200 * 4
    per_neuron = 4 * 4 + 4  # k (one value) and v_init, not per step
    assert expected <= kept <= expected + per_neuron, kept
    assert kept / x.numel() <= 2.5 + per_neuron / x.numel()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_full_precision_keeps_h(dtype):
    x = torch.randn(9, 1200, dtype=dtype, requires_grad=True)
    kept = saved_bytes(lambda: plif_cuda.plif_multistep(x, torch.tensor(0.2, dtype=dtype), backend="cpu"))
    assert x.numel() * x.element_size() <= kept <= x.numel() * x.element_size() + 64


@pytest.mark.parametrize("surrogate, spiking", SURROGATE_CASES)
@pytest.mark.parametrize("options", NEURON_OPTIONS)
@pytest.mark.parametrize("dtype", HALF_DTYPES + (torch.float32,), ids=str)
def test_checkpoints_give_the_gradients_of_every_h_bit_for_bit(dtype, options, surrogate, spiking):
    """Whole blocks of the CPU kernel, a lane group and single neurons; T not a multiple of 8."""
    x, k, v_init, grads = _inputs(19, 2 * 1024 + 128 + 5, dtype, per_neuron=True)
    scalars = op_options(**options, surrogate=surrogate, spiking=spiking)
    (forward_h, backward_h), (forward_c, backward_c) = _both_modes(x, k, v_init, scalars, grads)
    assert torch.equal(forward_h[0], forward_c[0]) and torch.equal(forward_h[1], forward_c[1])
    assert torch.equal(forward_c[3], forward_h[3][_C.CHECKPOINT_STEPS - 1 :: _C.CHECKPOINT_STEPS][:2])
    for from_h, from_checkpoints in zip(backward_h, backward_c):
        assert torch.equal(from_h, from_checkpoints)


@pytest.mark.parametrize("steps", (1, 7, 8, 9, 24, 25))
@pytest.mark.parametrize("per_neuron", (True, False), ids=("neuron", "layer"))
def test_checkpoints_at_every_sequence_length(steps, per_neuron):
    x, k, v_init, grads = _inputs(steps, 1024 + 3, torch.bfloat16, per_neuron, seed=steps)
    scalars = op_options(v_reset=-0.3)
    (_, backward_h), (forward_c, backward_c) = _both_modes(x, k, v_init, scalars, grads)
    assert forward_c[3].shape == (_C.checkpoint_rows(steps), 1024 + 3)
    for from_h, from_checkpoints in zip(backward_h, backward_c):
        assert torch.equal(from_h, from_checkpoints)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_a_thousand_steps_stay_within_the_bound(dtype):
    """Long sequences: the memory bound holds (no per-chunk state piles up) and the gradients
    equal those from every H, and the reference's."""
    steps, neurons = 1000, 3 * 64
    x = (torch.randn(steps, neurons, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.3).to(dtype)
    x.requires_grad_()
    w = torch.full((neurons,), -1.0, requires_grad=True)
    outputs = {}
    kept = saved_bytes(lambda: outputs.setdefault("fused", plif_cuda.plif_multistep(x, w, backend="cpu")))
    assert kept <= 2.5 * steps * neurons + 2 * 4 * neurons
    spikes, v_last, _ = outputs["fused"]
    grads = torch.autograd.grad(spikes.float().sum() + v_last.float().sum(), [x, w])
    ref_spikes, ref_v_last, _ = plif_cuda.plif_multistep(x, w, backend="torch")
    ref_grads = torch.autograd.grad(ref_spikes.float().sum() + ref_v_last.float().sum(), [x, w])
    assert torch.equal(spikes, ref_spikes)
    assert_grad_close(grads[0], ref_grads[0], dtype)
    assert_grad_close(grads[1], ref_grads[1], torch.float32, summed_terms=steps)


def test_modifying_the_input_in_place_before_backward_is_an_error():
    """The input is what the backward recomputes from: changing it must not go unnoticed."""
    x = torch.randn(9, 50).bfloat16().requires_grad_()
    y = x * 1.0
    spikes, _, _ = plif_cuda.plif_multistep(y, torch.tensor(0.0), backend="cpu")
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        spikes.float().sum().backward()


def test_second_derivatives_from_checkpoints_equal_those_from_every_h():
    """create_graph: the backward recomputes every H as a differentiable function of x."""
    x = (torch.randn(12, 40, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.6).bfloat16().requires_grad_()
    results = []
    for save in (_C.SAVE_H, _C.SAVE_CHECKPOINTS):
        w = torch.tensor(0.4, requires_grad=True)
        k = torch.sigmoid(w).reshape(1)
        options = op_options(spiking=False)  # smooth: a non-zero second order
        spikes = torch.ops.plif_cuda_internal.multistep_forward_saving(
            x, k, torch.zeros(1), **options, store_v_seq=False, save=save
        )[0]
        (grad_w,) = torch.autograd.grad(spikes.float().pow(2).sum(), [w], create_graph=True)
        (second,) = torch.autograd.grad(grad_w, [w])
        results.append((grad_w.detach(), second))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=0)
    assert results[0][1] != 0


_LEAN_PASS_LARGER_THAN_THE_CACHE = """
import torch, plif_cuda
from plif_cuda import _C
T, N = 19, (1 << 20) // 16 + 4099  # past the 1 MiB cache it is told of: streaming stores
g = torch.Generator().manual_seed(0)
x = (torch.randn(T, N, generator=g) + 0.5).bfloat16()
k, v_init = torch.full((N,), 0.3), torch.zeros(1)
grads = (torch.randn(T, N, generator=g).bfloat16(), None, None)
options = dict(v_threshold=1.0, v_reset=0.0, decay_input=True, detach_reset=False, surrogate="sigmoid", alpha=4.0,
               spiking=True)
results = []
for save in (_C.SAVE_H, _C.SAVE_CHECKPOINTS):
    forward = torch.ops.plif_cuda_internal.multistep_forward_saving(x, k, v_init, **options, store_v_seq=False,
                                                                    save=save)
    saved_x = x if save == _C.SAVE_CHECKPOINTS else None
    results.append(torch.ops.plif_cuda.multistep_backward(*grads, forward[3], saved_x, k, v_init, x_dtype=x.dtype,
                                                          **options))
assert all(torch.equal(a, b) for a, b in zip(*results))
print("ok")
"""


def test_checkpoints_past_the_last_level_cache():
    assert printed_by_fresh_interpreter(_LEAN_PASS_LARGER_THAN_THE_CACHE, PLIF_CPU_LLC_MB="1") == "ok"


NEURON = op_options()


def test_backward_op_checks_the_checkpoint_shape():
    x = torch.randn(17, 6).half()
    k = torch.full((1,), 0.5)
    with pytest.raises(RuntimeError, match=r"h_seq must hold the checkpoint rows of x: shape \[2, 6\]"):
        torch.ops.plif_cuda.multistep_backward(None, None, None, torch.zeros(3, 6), x, k, k, x_dtype=x.dtype, **NEURON)
    with pytest.raises(RuntimeError, match="x must have dtype"):
        torch.ops.plif_cuda.multistep_backward(
            None, None, None, torch.zeros(2, 6), x.float(), k, k, x_dtype=x.dtype, **NEURON
        )
