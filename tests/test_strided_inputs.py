"""Inputs the kernels read in place: a step broadcast over time (``y.expand(T, ...)``, time
stride 0), every other step (``x[::2]``), a slice or an index of the outermost step dimension.

The op must receive the caller's storage (checked on the op's own argument, as the dispatcher
hands it over, and on what autograd saves for the backward), and every result must be bit for
bit that of the contiguous copy the op used to make, forward and backward, in every dtype. The
GPU kernels' reading of the same layouts is tested under emulation in test_gpu_emulation.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import plif_cuda
from helpers import FLOAT_DTYPES, make_seq, op_options, random_weights_like
from plif_cuda import _C
from plif_cuda import ops as plif_ops
from plif_cuda.models import StaticImageSNN
from plif_cuda.reference import compute_dtype

T = 9  # above the 8 steps of a checkpoint chunk: half inputs recompute from x in two chunks
STEP = (2, 3, 37)


def _broadcast(y_step: torch.Tensor) -> torch.Tensor:
    return y_step.unsqueeze(0).expand(T, *y_step.shape)


# Each layout: (shape of the tensor the caller owns, the view of it the neuron gets).
LAYOUTS = {
    "broadcast": (STEP, _broadcast),
    "every_other_step": ((2 * T, *STEP), lambda big: big[::2]),
    "outer_step_slice": ((T, STEP[0] + 2, *STEP[1:]), lambda big: big[:, 1:-1]),
    "outer_step_index": ((T, 2, *STEP), lambda big: big[:, 1]),
}


class OpInputs(TorchDispatchMode):
    """Records the x argument of every plif_cuda forward and backward op call."""

    def __init__(self):
        super().__init__()
        self.forward_x = []
        self.backward_x = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.plif_cuda.multistep_forward.default, torch.ops.plif_cuda.multistep_forward_nvrtc.default):
            self.forward_x.append(args[0])
        elif func in (
            torch.ops.plif_cuda.multistep_backward.default,
            torch.ops.plif_cuda.multistep_backward_nvrtc.default,
        ):
            self.backward_x.append(args[4])
        return func(*args, **(kwargs or {}))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
    )


def _run(x_view, source, w, v_init, backend, **options):
    """Forward and backward from ``source`` (the leaf the caller owns) through ``x_view``."""
    spike_seq, v_last, v_seq = plif_cuda.plif_multistep(x_view, w, v_init, backend=backend, store_v_seq=True, **options)
    loss = sum(
        (out.float() * random_weights_like(out, seed).to(out.device)).sum()
        for seed, out in enumerate((spike_seq, v_last, v_seq))
    )
    grads = torch.autograd.grad(loss, (source, w, v_init))
    return (spike_seq, v_last, v_seq), grads


def _assert_bits_equal(actual, expected, name):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_in_place_and_bit_equal_to_the_contiguous_copy(layout, dtype, backend, device):
    shape, view_of = LAYOUTS[layout]
    acc = compute_dtype(dtype)
    source = make_seq(shape, dtype, device, seed=1, scale=1.5, shift=0.45).requires_grad_()
    w = torch.randn(STEP[0], 1, 1, generator=torch.Generator().manual_seed(2), dtype=acc).to(device)
    w.requires_grad_()
    v_init = (torch.randn(STEP, generator=torch.Generator().manual_seed(3), dtype=acc) * 0.3).to(device)
    v_init.requires_grad_()
    options = dict(v_reset=None, surrogate="atan", detach_reset=True)

    x_view = view_of(source)
    assert not x_view.is_contiguous()
    with OpInputs() as seen:
        outputs, grads = _run(x_view, source, w, v_init, backend, **options)
    (op_x,) = seen.forward_x
    assert _same_memory(op_x, x_view), "the op got a copy, not the caller's storage"
    if plif_ops.save_mode(x_view, True) == _C.SAVE_CHECKPOINTS:
        # Half inputs keep x for the backward, which recomputes H from it: in place too.
        (backward_x,) = seen.backward_x
        assert _same_memory(backward_x, x_view)

    copied = source.detach().clone().requires_grad_()
    expected_outputs, expected_grads = _run(view_of(copied).contiguous(), copied, w, v_init, backend, **options)
    assert outputs[0].any() and not outputs[0].all()
    for name, out, expected in zip(("spike_seq", "v_last", "v_seq"), outputs, expected_outputs):
        _assert_bits_equal(out, expected, name)
    for name, grad, expected in zip(("x", "w", "v_init"), grads, expected_grads):
        _assert_bits_equal(grad, expected, f"grad {name}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_saved_for_backward_is_the_caller_s_storage(dtype):
    """What autograd keeps between forward and backward: H for float32 (no input at all), x
    itself for half inputs, which for a broadcast input is the caller's one step, not T."""
    y = make_seq(STEP, dtype, seed=4).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spike_seq, _, _ = plif_cuda.plif_multistep(_broadcast(y), torch.tensor(0.2, requires_grad=True), backend="cpu")
    same_dtype = [t for t in saved if t.dtype == dtype and t.dim() == 1 + len(STEP)]
    if dtype == torch.float32:
        assert not any(t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for t in saved)
    else:
        (x_saved,) = same_dtype
        assert _same_memory(x_saved, _broadcast(y))
        assert x_saved.untyped_storage().nbytes() == y.numel() * y.element_size()
    spike_seq.sum().backward()
    assert y.grad is not None


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16), ids=str)
def test_second_order_gradients_through_a_broadcast_input(dtype):
    """create_graph=True runs the differentiable backward, which for half inputs first runs the
    forward op again on the x it kept (the caller's broadcast view): the same bits as from the
    contiguous copy."""
    y_values = make_seq(STEP, torch.float64, seed=8)
    results = []
    for copy in (False, True):
        y = y_values.to(dtype).requires_grad_()
        x_seq = _broadcast(y).contiguous() if copy else _broadcast(y)
        w = torch.tensor(0.3, requires_grad=True)
        spike_seq, v_last, _ = plif_cuda.plif_multistep(x_seq, w, backend="cpu", spiking=False, surrogate="atan")
        (grad_y,) = torch.autograd.grad((spike_seq.float() ** 2).sum() + v_last.sum(), y, create_graph=True)
        (grad_w,) = torch.autograd.grad((grad_y.float() ** 2).sum(), w)
        results.append((grad_y.detach(), grad_w))
    for in_place, copied in zip(*results):
        _assert_bits_equal(in_place, copied, "second order")


@pytest.mark.parametrize(
    "view_of",
    [
        lambda big: big[..., ::2],  # gaps inside a step
        lambda big: big.transpose(0, 1).contiguous().transpose(0, 1),  # time not outermost
        lambda big: big[:1, :1].expand(T, 4, 2, 12),  # a step dim broadcast as well as time
    ],
    ids=("gaps_in_a_step", "time_not_outermost", "step_dim_broadcast"),
)
def test_steps_with_gaps_are_still_copied_once(view_of):
    big = make_seq((T, 4, 2, 12), seed=5)
    x_view = view_of(big)
    with OpInputs() as seen:
        spikes, _, _ = plif_cuda.plif_multistep(x_view, torch.tensor(0.0), backend="cpu")
    (op_x,) = seen.forward_x
    assert op_x.is_contiguous() and op_x.untyped_storage().data_ptr() != big.untyped_storage().data_ptr()
    assert torch.equal(spikes, plif_cuda.plif_multistep(x_view.contiguous(), torch.tensor(0.0), backend="cpu")[0])


def test_op_refuses_steps_with_gaps_by_name():
    x = make_seq((T, 4, 12), seed=6)[..., ::2]
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match="every step of x must be contiguous"):
        torch.ops.plif_cuda.multistep_forward(
            x,
            one * 0.5,
            one * 0.0,
            **op_options(),
            store_v_seq=False,
            needs_backward=True,
        )


def test_static_image_network_passes_its_encoder_input_uncopied():
    """The paper's static-image network runs its first conv once and hands the neurons that one
    output broadcast over T: the op reads the conv's output itself."""
    model = StaticImageSNN(T=4, width=8, fc_width=16, backend="cpu")
    images = make_seq((2, 1, 28, 28), seed=7)
    conv_outputs = []
    model.first_conv.module.register_forward_hook(lambda module, args, out: conv_outputs.append(out))
    with OpInputs() as seen:
        model(images).sum().backward()
    (conv_output,) = conv_outputs
    encoder_x = seen.forward_x[0]
    assert encoder_x.shape[0] == 4 and encoder_x.stride(0) == 0
    assert encoder_x.untyped_storage().data_ptr() == conv_output.untyped_storage().data_ptr()
