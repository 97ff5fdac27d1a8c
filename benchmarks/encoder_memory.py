"""Memory of one training step of the paper's static-image network (plif_cuda.models.StaticImageSNN),
with its encoder input read in place or copied T times, as plif_cuda did before the kernels took a
time stride.

The network runs its first conv+BN once per image and hands its encoder neurons that output
broadcast over T (``expand``, time stride 0). "in place": the op reads it where it is. "copied":
``plif_cuda.functional._to_op_layout`` is wrapped to make the contiguous [T, ...] copy it used to
make. Each measurement runs in a fresh interpreter, one training step (zero_grad, forward, loss,
backward, SGD step), and reports:
  - peak: the process's peak resident memory during the step minus its resident memory before it
    (glibc told to return every allocation above 128 KiB to the system when freed, so that the
    resident size follows the live tensors; the CPU op's output cache never holds more than the
    op's own peak of live outputs, so it does not raise this peak);
  - saved: bytes of distinct storage that autograd holds for the backward at the end of the forward.

    python benchmarks/encoder_memory.py [--batch 32] [--width 128] [--T 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

DTYPES = ("float32", "bfloat16")
MODES = ("in_place", "copied")


def _resident_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure_one(mode: str, dtype_name: str, batch: int, width: int, steps: int) -> dict:
    """One step in this interpreter (call in a fresh one: the peak is the process's)."""
    import torch

    from plif_cuda import functional, models

    torch.manual_seed(0)
    if mode == "copied":
        in_place = functional._to_op_layout

        def copying(x_seq):
            x_op, order = in_place(x_seq)
            return x_op.contiguous(), order

        functional._to_op_layout = copying
    dtype = getattr(torch, dtype_name)
    model = models.StaticImageSNN(T=steps, width=width, backend="cpu").to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.rand(batch, 1, 28, 28, dtype=dtype)
    labels = torch.randint(0, 10, (batch,))

    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    before = _resident_kib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    models.reset_states(model)
    optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rates = model(images)
    loss = torch.nn.functional.mse_loss(rates.float(), torch.nn.functional.one_hot(labels, 10).float())
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak <= peak_before:
        raise RuntimeError("the step stayed below the process's earlier peak: raise --batch to measure it")
    with torch.no_grad():
        first = model.first_conv.module(images)
    return {
        "mode": mode,
        "dtype": dtype_name,
        "peak_mib": (peak - before) / 1024,
        "saved_mib": sum(saved.values()) / 2**20,
        "encoder_input_mib": steps * first.numel() * first.element_size() / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.batch, args.width, args.T)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    print(
        f"StaticImageSNN, batch {args.batch}, width {args.width}, T {args.T}, 28x28 images; "
        f"{args.repeats} fresh processes per case (MiB)"
    )
    for dtype_name in DTYPES:
        for mode in MODES:
            runs = []
            for _ in range(args.repeats):
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--batch",
                        str(args.batch),
                        "--width",
                        str(args.width),
                        "--T",
                        str(args.T),
                        "--one",
                        mode,
                        dtype_name,
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(done.stdout))
            peaks = sorted(run["peak_mib"] for run in runs)
            runs_text = ", ".join(f"{p:.1f}" for p in peaks)
            print(
                f"{dtype_name:9s} {mode:9s} peak {peaks[len(peaks) // 2]:7.1f} (runs {runs_text})"
                f"  saved for backward {runs[0]['saved_mib']:7.1f}"
                f"  encoder input x T {runs[0]['encoder_input_mib']:6.1f}"
            )


if __name__ == "__main__":
    main()
