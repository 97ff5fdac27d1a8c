"""The benchmark's traffic model (benchmarks/traffic.py) against the real op: every stream it
counts has the size of the tensor the op takes or returns, and the bytes it says autograd keeps
are what saved_tensors_hooks sees, for every dtype and save mode. On a GPU, the backward's share
rows of one-value gradients show up in the allocator's peak."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import plif_cuda
from plif_cuda import _C
from plif_cuda.reference import compute_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import traffic  # noqa: E402
from timing import saved_tensor_bytes  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SAVE_MODES = {"every-h": _C.SAVE_H, "checkpoints": _C.SAVE_CHECKPOINTS}
NEURON = dict(
    v_threshold=1.0, v_reset=0.0, decay_input=True, detach_reset=False, surrogate="sigmoid", alpha=4.0, spiking=True
)
NEURONS = 3 * 1024 + 5


def _inputs(T, N, dtype, per_neuron, device="cpu"):
    generator = torch.Generator().manual_seed(T)
    acc = compute_dtype(dtype)
    x = (torch.randn(T, N, generator=generator) + 0.8).to(device, dtype).requires_grad_()
    count = N if per_neuron else 1
    k = torch.full((count,), 0.4, dtype=acc, device=device)
    v_init = torch.zeros(count, dtype=acc, device=device)
    grad_spikes = torch.randn(T, N, generator=generator).to(device, dtype)
    return x, k, v_init, grad_spikes


@pytest.mark.parametrize("per_neuron", (False, True), ids=("one-k", "k-per-neuron"))
@pytest.mark.parametrize("steps", (1, 8, 9, 17))
@pytest.mark.parametrize("save_name", SAVE_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streams_and_saved_bytes_match_the_op(dtype, save_name, steps, per_neuron):
    save = SAVE_MODES[save_name]
    x, k, v_init, grad_spikes = _inputs(steps, NEURONS, dtype, per_neuron)
    counts = {"k_values": k.numel(), "v_init_values": v_init.numel()}
    outputs = {}

    def forward():
        outputs["forward"] = torch.ops.plif_cuda_internal.multistep_forward_saving(
            x, k, v_init, **NEURON, store_v_seq=False, save=save
        )
        return outputs["forward"]

    kept = saved_tensor_bytes(forward)["bytes"]
    spikes, v_last, _, h_seq = outputs["forward"]
    assert kept == traffic.saved_bytes(steps, NEURONS, dtype, save=save, **counts)

    fwd = traffic.forward_traffic(steps, NEURONS, dtype, save=save, **counts)
    assert dict(fwd.reads) == {"x": x.nbytes, "k": k.nbytes, "v_init": v_init.nbytes}
    assert dict(fwd.writes) == {"spikes": spikes.nbytes, "h_seq": h_seq.nbytes, "v_last": v_last.nbytes}

    saved_x = x.detach() if save == _C.SAVE_CHECKPOINTS else None
    grad_x, grad_k, grad_v_init = torch.ops.plif_cuda.multistep_backward(
        grad_spikes, None, None, h_seq, saved_x, k, v_init, x_dtype=dtype, **NEURON
    )
    bwd = traffic.backward_traffic(steps, NEURONS, dtype, save=save, device="cpu", **counts)
    assert dict(bwd.reads) == {
        "grad_spikes": grad_spikes.nbytes,
        "h_seq": h_seq.nbytes,
        "k": k.nbytes,
        "v_init": v_init.nbytes,
        **({"x": x.nbytes} if saved_x is not None else {}),
    }
    assert dict(bwd.writes) == {"grad_x": grad_x.nbytes, "grad_k": grad_k.nbytes, "grad_v_init": grad_v_init.nbytes}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_training_save_mode_is_the_ops(dtype):
    """The model's default save mode is the one plif_multistep picks: its saved bytes (one tau per
    layer, v_init one value) are what the public entry point keeps."""
    steps, shape = 9, (64, 48)
    x = torch.randn(steps, *shape).to(dtype).requires_grad_()
    w = torch.tensor(0.3, dtype=compute_dtype(dtype), requires_grad=True)
    kept = saved_tensor_bytes(lambda: plif_cuda.plif_multistep(x, w, backend="cpu"))["bytes"]
    assert kept == traffic.saved_bytes(steps, 64 * 48, dtype)
    expected_rows = {torch.float16: 1, torch.bfloat16: 1, torch.float32: steps, torch.float64: steps}[dtype]
    assert traffic.h_rows(steps, traffic.training_save_mode(dtype)) == expected_rows


def test_a_per_channel_tau_reaches_the_op_as_one_k_per_neuron():
    """The harness counts a per-channel tau as N values of k: what the op is given (and keeps),
    besides the sigmoid's own [C, 1] output."""
    steps, channels, per_channel = 8, 64, 40
    x = torch.randn(steps, channels, per_channel).requires_grad_()
    w = torch.zeros(channels, 1, requires_grad=True)
    kept = saved_tensor_bytes(lambda: plif_cuda.plif_multistep(x, w, backend="cpu"))["bytes"]
    N = channels * per_channel
    assert kept == traffic.saved_bytes(steps, N, torch.float32, k_values=N) + channels * 4


def test_half_inputs_at_eight_steps_write_no_h_and_read_x_back():
    """The figures issue 22 found wrong: no H stream for half inputs at T <= 8, v_last in 4 bytes,
    and on CUDA the share rows of the one-value gradients (16 B per neuron)."""
    N = 1 << 20
    fwd = traffic.forward_traffic(8, N, torch.float16)
    assert fwd.written("h_seq") == 0 and fwd.written("v_last") == 4 * N
    assert fwd.total == 8 * N * (2 + 2) + 4 * N + 8
    gpu = traffic.backward_traffic(8, N, torch.bfloat16, device="cuda")
    cpu = traffic.backward_traffic(8, N, torch.bfloat16, device="cpu")
    assert gpu.total - cpu.total == 16 * N
    assert cpu.read("x") == 8 * N * 2 and cpu.read("h_seq") == 0
    assert traffic.pass_traffic("fwdbwd", 8, N, torch.bfloat16).total == fwd.total + gpu.total


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="k_values"):
        traffic.forward_traffic(8, 100, torch.float32, k_values=7)
    with pytest.raises(ValueError, match="pass must be"):
        traffic.pass_traffic("sideways", 8, 100, torch.float32)
    with pytest.raises(ValueError, match="SAVE_NOTHING"):
        traffic.backward_traffic(8, 100, torch.float32, save=_C.SAVE_NOTHING)


@pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in plif_cuda.available_backends("cuda"),
    reason="needs a GPU and the compiled CUDA kernels (the CPU twin: the tests above)",
)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("per_neuron", (False, True), ids=("one-k", "k-per-neuron"))
def test_cuda_backward_allocates_the_share_rows_the_model_counts(dtype, per_neuron):
    """The CUDA backward's allocations beyond its outputs are the share rows the model counts:
    2 N a for one-value k and v_init, none per neuron (reductions' scratch: under 1 MiB)."""
    steps, N = 8, 1 << 20
    save = traffic.training_save_mode(dtype)
    x, k, v_init, grad_spikes = _inputs(steps, N, dtype, per_neuron, device="cuda")
    h_seq = torch.ops.plif_cuda.multistep_forward(
        x.detach(), k, v_init, **NEURON, store_v_seq=False, needs_backward=True
    )[3]
    saved_x = x.detach() if save == _C.SAVE_CHECKPOINTS else None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outputs = torch.ops.plif_cuda.multistep_backward(
        grad_spikes, None, None, h_seq, saved_x, k, v_init, x_dtype=dtype, **NEURON
    )
    torch.cuda.synchronize()
    beyond_outputs = torch.cuda.max_memory_allocated() - before - sum(t.nbytes for t in outputs)
    bwd = traffic.backward_traffic(steps, N, dtype, save=save, k_values=k.numel(), v_init_values=v_init.numel())
    shares = bwd.written("grad_k_shares") + bwd.written("grad_v_init_shares")
    assert shares == (0 if per_neuron else 2 * N * 4)
    assert shares <= beyond_outputs <= shares + (1 << 20)
