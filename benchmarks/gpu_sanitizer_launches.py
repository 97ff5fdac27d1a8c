"""A few representative launches of the fused CUDA kernels, forward and backward, for
`compute-sanitizer` (benchmarks/gpu_check.sh runs this file under memcheck and racecheck).

Each case takes a different path through the kernels: the vector path with a grid-stride loop
(large N), the scalar path with tails, a misaligned input and chunks shorter than T, the smooth
mode in float64, and the CuPy launcher of the same kernels; then the fused BatchNorm + PLIF
kernels in training (rows of a channel across blocks) and in eval mode (one neuron a row, a tail
block). Exits non-zero if a launch fails.
Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1: the caching allocator's segments would hide an
out-of-bounds access from memcheck.
"""

from __future__ import annotations

import argparse

import torch  # noqa: E402

import gpu_phase
import plif_cuda  # noqa: E402
from plif_cuda import backends  # noqa: E402

# (name, dtype, T, neurons, options, misaligned input)
CASES = [
    ("vector path fp32", torch.float32, 8, 1 << 20, {"store_v_seq": True}, False),
    ("vector path bf16, soft reset", torch.bfloat16, 5, 1 << 21, {"v_reset": None}, False),
    ("scalar path fp16, tail, misaligned x, T=37", torch.float16, 37, 3001, {"surrogate": "atan"}, True),
    ("smooth mode fp64", torch.float64, 9, 777, {"spiking": False, "surrogate": "atan", "store_v_seq": True}, False),
]
# (name, dtype, shape [T, N, C, *spatial], training)
BN_CASES = [
    ("fused BatchNorm + PLIF fp32, rows across blocks", torch.float32, (5, 3, 4, 20, 20), True),
    ("fused BatchNorm + PLIF bf16 eval, one neuron a row, a tail", torch.bfloat16, (4, 7, 300), False),
]


def run(name: str, backend: str, dtype, steps: int, neurons: int, options: dict, misaligned: bool) -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(steps * neurons + 1, generator=generator, device=device) * 1.5 + 0.4
    storage = values.to(dtype)
    # A contiguous view one element into its storage: no 16-byte alignment.
    x = (storage[1:] if misaligned else storage[:-1]).view(steps, neurons).requires_grad_()
    w = torch.zeros((neurons,), device=device, requires_grad=True)
    spikes, v_last, v_seq = plif_cuda.plif_multistep(x, w, backend=backend, **options)
    loss = spikes.float().sum() + v_last.float().sum()
    if v_seq is not None:
        loss = loss + v_seq.float().sum()
    loss.backward()
    torch.cuda.synchronize()
    print(
        f"ok  {backend:5s} {name}: T={steps} N={neurons} {dtype}, spikes {int(spikes.float().sum())}, "
        f"|grad x| {float(x.grad.float().abs().sum()):.4g}"
    )


def run_bn(name: str, dtype, shape: tuple, training: bool) -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    y = (torch.randn(shape, generator=generator, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    layer = plif_cuda.BatchNormPLIF(shape[2]).to(device).train(training)
    spikes = layer(y)
    spikes.float().sum().backward()
    torch.cuda.synchronize()
    print(
        f"ok  cuda  {name}: shape {list(shape)} {dtype}, spikes {int(spikes.float().sum())}, "
        f"|grad y| {float(y.grad.float().abs().sum()):.4g}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="stop before the first GPU call")
    args = parser.parse_args()
    gpu_phase.stop_unless_gpu(args.dry_run, "gpu_sanitizer_launches")
    launchers = [b for b in ("cuda", "cupy") if backends.unavailable_reason(b, torch.device("cuda")) is None]
    if "cuda" not in launchers:
        print(f"the cuda backend is unavailable: {backends.unavailable_reason('cuda', torch.device('cuda'))}")
        return 1
    for case in CASES:
        run(case[0], "cuda", *case[1:])
    if "cupy" in launchers:
        run(CASES[0][0], "cupy", *CASES[0][1:])
        run(CASES[2][0], "cupy", *CASES[2][1:])
    if not plif_cuda.batchnorm.fused_op_available("cuda"):
        print("the fused BatchNorm + PLIF CUDA kernels are unavailable")
        return 1
    for case in BN_CASES:
        run_bn(*case)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
