"""The GPU check's first figures: one forward+backward per dtype on both GPU launchers (the nvcc
kernels and the CuPy/NVRTC ones) against the CPU op on the same inputs. Spikes must be equal; the
membranes and gradients within each dtype's tolerance (the backward's exp differs: a polynomial
on the CPU, expf on the GPU). Every case runs even when one fails; exit 1 if any failed.

    python benchmarks/gpu_smoke.py [--dry-run] [--out smoke.txt]
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch  # noqa: E402

import gpu_phase
import plif_cuda  # noqa: E402
from plif_cuda import backends  # noqa: E402
from tests.helpers import MEMBRANE_TOLERANCE  # noqa: E402  (every output, against the CPU op's)

STEPS, NEURONS = 8, 3 * 4096 + 5  # a tail after whole vector groups


def inputs(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(STEPS, NEURONS, generator=generator) * 1.5 + 0.4).to(dtype)
    w = torch.randn(NEURONS, generator=generator) * 0.6
    upstream = [
        torch.randn(STEPS, NEURONS, generator=generator).to(dtype),
        torch.randn(NEURONS, generator=generator).to(dtype),
    ]
    return x, w, upstream


def forward_backward(x, w, upstream, backend: str, device: str):
    x = x.to(device).requires_grad_()
    w = w.to(device).requires_grad_()
    spikes, v_last, _ = plif_cuda.plif_multistep(x, w, v_reset=None, backend=backend)
    torch.autograd.backward([spikes, v_last], [g.to(device) for g in upstream])
    return {"spikes": spikes, "v_last": v_last, "grad x": x.grad, "grad w": w.grad}


def compare(dtype, got: dict, expected: dict) -> str:
    if not torch.equal(got["spikes"].cpu(), expected["spikes"]):
        raise AssertionError(f"spikes differ at {int((got['spikes'].cpu() != expected['spikes']).sum())} places")
    worst = []
    for name in ("v_last", "grad x", "grad w"):
        actual, wanted = got[name].cpu(), expected[name]
        rtol, atol = MEMBRANE_TOLERANCE[actual.dtype]
        torch.testing.assert_close(actual, wanted, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        error = ((actual.double() - wanted.double()).abs() / (wanted.double().abs() + atol)).max().item()
        worst.append(f"{name} {error:.1e}")
    return "spikes equal; worst relative error " + ", ".join(worst)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="stop before the first GPU call")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    cases = [(dtype, backend) for dtype in MEMBRANE_TOLERANCE for backend in ("cuda", "cupy")]
    expected = {dtype: forward_backward(*inputs(dtype), "cpu", "cpu") for dtype in MEMBRANE_TOLERANCE}
    gpu_phase.stop_unless_gpu(args.dry_run, "gpu_smoke")
    lines, failures = [f"GPU: {torch.cuda.get_device_name()}; T={STEPS}, N={NEURONS}, soft reset, tau per neuron"], 0
    for dtype, backend in cases:
        label = f"{backend:5s} {str(dtype).removeprefix('torch.'):9s}"
        reason = backends.unavailable_reason(backend, torch.device("cuda"))
        if reason is not None:
            lines.append(f"FAIL {label} unavailable: {reason}")
            failures += 1
            continue
        try:
            start = time.perf_counter()
            got = forward_backward(*inputs(dtype), backend, "cuda")
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            lines.append(f"ok   {label} {compare(dtype, got, expected[dtype])} (first call {seconds * 1e3:.0f} ms)")
        except Exception as error:
            failures += 1
            lines.append(f"FAIL {label} {type(error).__name__}: {error}".splitlines()[0])
            traceback.print_exc()
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        with open(args.out, "w") as file:
            file.write(report)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
