"""What a forward keeps for the backward (issues 13 and 23): every dtype keeps its input and every
eighth H (SAVE_CHECKPOINTS): at most 2.5 bytes per neuron-step for the half types, 4.5 for float32;
the backward recomputes the rest. Its gradients equal those from every H bit for bit, but dL/dk,
whose dH/dk the checkpoints' backward takes from X exactly where every H gives it with cancellation
(tests/test_exact_tau_gradient.py)."""

from __future__ import annotations

import pytest
import torch

import plif_cuda
from helpers import NEURON_OPTIONS, SURROGATE_CASES, assert_grad_close, op_options, printed_by_fresh_interpreter
from plif_cuda import _C
from plif_cuda.reference import compute_dtype

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Bytes per neuron-step kept for a backward at most: the input and a checkpoint H per 8 steps.
KEPT_BOUND = {torch.float16: 2.5, torch.bfloat16: 2.5, torch.float32: 4.5, torch.float64: 9.0}


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


@pytest.mark.parametrize("dtype", tuple(KEPT_BOUND), ids=str)
@pytest.mark.parametrize("steps", (1, 8, 9, 16, 100))
def test_every_dtype_keeps_its_input_and_the_checkpoints(dtype, steps):
    x = torch.randn(steps, 4, 300).to(dtype).requires_grad_()
    acc_bytes = torch.tensor([], dtype=compute_dtype(dtype)).element_size()
    w = torch.tensor(0.2, dtype=compute_dtype(dtype), requires_grad=True)
    kept = saved_bytes(lambda: plif_cuda.plif_multistep(x, w, backend="cpu"))
    # x itself and one compute-dtype H per 8 steps, but none for the last chunk.
    expected = x.numel() * x.element_size() + _C.checkpoint_rows(steps) * 1200 * acc_bytes
    per_neuron = 4 * acc_bytes + acc_bytes  # k (one value) and v_init, not per step
    assert expected <= kept <= expected + per_neuron, kept
    assert kept / x.numel() <= KEPT_BOUND[dtype] + per_neuron / x.numel()


@pytest.mark.parametrize("surrogate, spiking", SURROGATE_CASES)
@pytest.mark.parametrize("options", NEURON_OPTIONS)
@pytest.mark.parametrize("dtype", tuple(KEPT_BOUND), ids=str)
def test_checkpoints_give_the_gradients_of_every_h(dtype, options, surrogate, spiking):
    """Whole blocks of the CPU kernel, a lane group and single neurons; T not a multiple of 8."""
    x, k, v_init, grads = _inputs(19, 2 * 1024 + 128 + 5, dtype, per_neuron=True)
    scalars = op_options(**options, surrogate=surrogate, spiking=spiking)
    (forward_h, backward_h), (forward_c, backward_c) = _both_modes(x, k, v_init, scalars, grads)
    assert torch.equal(forward_h[0], forward_c[0]) and torch.equal(forward_h[1], forward_c[1])
    assert torch.equal(forward_c[3], forward_h[3][_C.CHECKPOINT_STEPS - 1 :: _C.CHECKPOINT_STEPS][:2])
    assert_same_gradients(backward_h, backward_c, scalars["decay_input"])


def assert_same_gradients(from_h, from_checkpoints, decay_input):
    """dL/dx and dL/dv_init bit for bit; dL/dk too where dH/dk = -(V[t-1] - V_r) (no decay_input),
    else within the cancellation of (H - V[t-1]) / k, the form from every H."""
    assert torch.equal(from_h[0], from_checkpoints[0]) and torch.equal(from_h[2], from_checkpoints[2])
    if decay_input:
        scale = from_checkpoints[1].abs().max().item()
        torch.testing.assert_close(from_h[1], from_checkpoints[1], rtol=1e-4, atol=1e-5 * scale)
    else:
        assert torch.equal(from_h[1], from_checkpoints[1])


@pytest.mark.parametrize("steps", (1, 7, 8, 9, 24, 25))
@pytest.mark.parametrize("per_neuron", (True, False), ids=("neuron", "layer"))
def test_checkpoints_at_every_sequence_length(steps, per_neuron):
    x, k, v_init, grads = _inputs(steps, 1024 + 3, torch.bfloat16, per_neuron, seed=steps)
    scalars = op_options(v_reset=-0.3)
    (_, backward_h), (forward_c, backward_c) = _both_modes(x, k, v_init, scalars, grads)
    assert forward_c[3].shape == (_C.checkpoint_rows(steps), 1024 + 3)
    assert_same_gradients(backward_h, backward_c, scalars["decay_input"])


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
(grad_x_h, grad_k_h, grad_v_init_h), (grad_x_c, grad_k_c, grad_v_init_c) = results
assert torch.equal(grad_x_h, grad_x_c) and torch.equal(grad_v_init_h, grad_v_init_c)
torch.testing.assert_close(grad_k_h, grad_k_c, rtol=1e-4, atol=1e-5 * grad_k_c.abs().max().item())
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
