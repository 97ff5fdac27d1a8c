"""The anchors' own GPU configurations, ours beside SpikingJelly's, forward+backward time and
peak memory (torch.cuda.max_memory_allocated), written as JSON:

- SpikingJelly's Triton tutorial: a neuron on x of shape [T, 64, 65536], float16, T in
  {4, 8, 16, 32} (published on an RTX 4090: Triton 0.86 ms at T=8, 3.37 ms at T=32).
- The Open Neuromorphic framework benchmark: Linear(n, n) + neuron, batch 16, T=500,
  n=16384, float32 (published there: SpikingJelly CuPy LIF 118 ms / 5.55 GiB, Norse with
  torch.compile 110 ms / 5.06 GiB).

Each SpikingJelly path (its Triton and native CUDA kernels, chosen through its
SJ_<NEURON>_CUDA_IMPLEMENTATION variables, read at import) runs in a subprocess of its own.

    python benchmarks/anchors.py [--dry-run] [--out anchors.json] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch  # noqa: E402

import gpu_phase

TUTORIAL_SHAPE, TUTORIAL_STEPS = (64, 65536), (4, 8, 16, 32)
OPEN_NEUROMORPHIC = dict(steps=500, batch=16, features=16384)
NEURONS = ("plif", "lif")
IMPLEMENTATIONS = ("plif_cuda", "spikingjelly-triton", "spikingjelly-cuda")


def make_neuron(implementation: str, neuron: str) -> torch.nn.Module:
    if implementation == "plif_cuda":
        import plif_cuda

        layer = plif_cuda.ParametricLIFNode if neuron == "plif" else plif_cuda.LIFNode
        return layer(init_tau=2.0, step_mode="m") if neuron == "plif" else layer(tau=2.0, step_mode="m")
    from spikingjelly.activation_based import neuron as sj_neuron

    if neuron == "plif":
        return sj_neuron.ParametricLIFNode(init_tau=2.0, step_mode="m")
    return sj_neuron.LIFNode(tau=2.0, step_mode="m")


def time_case(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict:
    """Median forward+backward milliseconds over ``repeats`` timed calls after two warm-ups, and
    the peak memory allocated during one call (inputs and parameters included)."""
    leaves = [x, *model.parameters()]
    grad_out = None

    def call():
        nonlocal grad_out
        for module in model.modules():
            if hasattr(module, "reset"):
                module.reset()
        for leaf in leaves:  # fresh gradients: no accumulation kernels in the figure
            leaf.grad = None
        out = model(x)
        if grad_out is None:
            grad_out = torch.ones_like(out)
        out.backward(grad_out)

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"ms": times[len(times) // 2], "ms_min": times[0], "peak_gib": peak / 2**30}


def run_cases(implementation: str, repeats: int) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for neuron in NEURONS:
        for steps in TUTORIAL_STEPS:
            x = torch.randn(steps, *TUTORIAL_SHAPE, device=device, dtype=torch.float16).requires_grad_()
            model = make_neuron(implementation, neuron).to(device)
            rows.append(
                {
                    "case": "triton-tutorial",
                    "neuron": neuron,
                    "T": steps,
                    "dtype": "float16",
                    **time_case(model, x, repeats),
                }
            )
            del x, model
        case = OPEN_NEUROMORPHIC
        linear = torch.nn.Linear(case["features"], case["features"])
        model = torch.nn.Sequential(_TimeFolded(linear), make_neuron(implementation, neuron)).to(device)
        x = torch.randn(case["steps"], case["batch"], case["features"], device=device).requires_grad_()
        rows.append(
            {
                "case": "open-neuromorphic",
                "neuron": neuron,
                "T": case["steps"],
                "dtype": "float32",
                **time_case(model, x, max(3, repeats // 3)),
            }
        )
        del x, model
        torch.cuda.empty_cache()
    return rows


class _TimeFolded(torch.nn.Module):
    """A per-step layer applied to [T, N, ...] by folding T into the batch."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.flatten(0, 1)).view(*x.shape[:2], -1)


def child(implementation: str, repeats: int) -> None:
    """Runs one implementation's cases and prints them as one JSON line."""
    try:
        rows = run_cases(implementation, repeats)
        print(json.dumps({"implementation": implementation, "rows": rows}))
    except Exception as error:
        print(json.dumps({"implementation": implementation, "error": f"{type(error).__name__}: {error}"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="stop before the first GPU call")
    parser.add_argument("--out", help="write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.repeats)
        return 0
    for implementation in IMPLEMENTATIONS:  # every module the children import, before any GPU call
        for neuron in NEURONS:
            make_neuron(implementation, neuron)
    gpu_phase.stop_unless_gpu(args.dry_run, "anchors")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "implementations": []}
    for implementation in IMPLEMENTATIONS:
        env = dict(os.environ)
        if implementation.startswith("spikingjelly-"):
            path = implementation.removeprefix("spikingjelly-")
            env.update(SJ_PLIF_CUDA_IMPLEMENTATION=path, SJ_LIF_CUDA_IMPLEMENTATION=path)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--child", implementation, "--repeats", str(args.repeats)],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = (
            json.loads(lines[-1]) if lines else {"implementation": implementation, "error": done.stderr.strip()[-2000:]}
        )
        result["seconds"] = round(time.perf_counter() - start, 1)
        results["implementations"].append(result)
        print(json.dumps(result))
        if args.out:  # after every implementation, so that a cut run keeps what it measured
            with open(args.out, "w") as file:
                json.dump(results, file, indent=1)
    return 0 if all("error" not in r for r in results["implementations"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
