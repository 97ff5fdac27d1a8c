"""BatchNorm + PLIF fused (plif_cuda.BatchNormPLIF) against nn.BatchNorm + plif_cuda's PLIF, in one run.

Rows: the bytes autograd keeps per neuron-step for the pair; the pair's forward+backward time
(float32, T=8, inputs past the last-level cache); the training step of the paper's Fashion-MNIST
network (and, with --cifar, the CIFAR-10 one) fused by fuse_bn_plif against unfused: its time,
what autograd keeps, and the peak memory of one step (peak_of_first_step says how it is taken).
Cases alternate within each round, so the ratio compares like with like under the machine's load.

    python benchmarks/bn_plif.py [--size N C H W] [--rounds R] [--cifar] [--spikingjelly] [--no-peak]
                                 [--device cuda] [--json PATH]

--spikingjelly adds each network written in SpikingJelly's layers, fused against SpikingJelly's
own; --device cuda runs every row on the GPU and checks the fused layer there against the CPU op
(exit status 1 where it differs; --dry-run stops before the first GPU call, for the GPU check's
dry run).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gpu_phase  # noqa: E402  (puts this checkout's plif_cuda, built in place, first on sys.path)
import plif_cuda  # noqa: E402
from plif_cuda import models  # noqa: E402
from timing import saved_tensor_bytes  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "unknown"


class UnfusedPair(nn.Module):
    """nn.BatchNorm2d on the time-folded batch, then plif_cuda's multi-step PLIF."""

    def __init__(self, channels: int, surrogate: str):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.neuron = plif_cuda.ParametricLIFNode(step_mode="m", surrogate_function=surrogate, detach_reset=True)

    def forward(self, y_seq):
        z = self.bn(y_seq.flatten(0, 1)).unflatten(0, y_seq.shape[:2])
        return self.neuron(z)


def fused_pair(channels: int, surrogate: str) -> nn.Module:
    return plif_cuda.BatchNormPLIF(channels, surrogate_function=surrogate, detach_reset=True)


def pair_step(layer, y, grad):
    spikes = layer(y)
    spikes.backward(grad)
    models.reset_states(layer)


def kept_bytes_per_neuron_step(layer, y) -> float:
    saved = saved_tensor_bytes(lambda: layer(y))
    models.reset_states(layer)
    # The pair's input is saved by the unfused BatchNorm and the fused layer alike, and counts.
    return saved["bytes"] / y.numel()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(cases: dict, rounds: int, device: torch.device) -> dict:
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def pair_rows(size, T: int, rounds: int, surrogate: str, device: torch.device, dtype: torch.dtype) -> dict:
    N, C, H, W = size
    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(T, N, C, H, W, generator=gen) * 2 + 0.5).to(device, dtype).requires_grad_()
    grad = torch.randn(T, N, C, H, W, generator=gen).to(device, dtype)
    unfused = UnfusedPair(C, surrogate).to(device)
    fused = fused_pair(C, surrogate).to(device)
    for layer in (unfused, fused):
        pair_step(layer, y, grad)  # warm-up
    kept = {"unfused": kept_bytes_per_neuron_step(unfused, y), "fused": kept_bytes_per_neuron_step(fused, y)}
    medians = time_rounds(
        {"unfused": lambda: pair_step(unfused, y, grad), "fused": lambda: pair_step(fused, y, grad)}, rounds, device
    )
    return {
        "shape": [T, N, C, H, W],
        "dtype": str(dtype).removeprefix("torch."),
        "tensor_mib": y.numel() * y.element_size() / 2**20,
        "kept_bytes_per_neuron_step": kept,
        "fwd_bwd_ms": medians,
        "speedup": medians["unfused"] / medians["fused"],
    }


def network_input(model: nn.Module, batch: int, device: torch.device):
    """A batch of static images the network takes (its first conv's channels; 32 x 32 for colour,
    28 x 28 for grey) and labels for them."""
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    channels = first_conv.in_channels
    side = 32 if channels == 3 else 28
    x = torch.rand(batch, channels, side, side, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    return x, labels


def training_step(model: nn.Module, x, labels):
    def run():
        rate = model(x)
        F.mse_loss(rate, F.one_hot(labels, 10).float()).backward()
        models.reset_states(model)

    return run


def network_rows(name: str, build, batch: int, rounds: int, device: torch.device, peak: bool = False) -> dict:
    torch.manual_seed(0)
    unfused = build().to(device)
    fused = plif_cuda.fuse_bn_plif(copy.deepcopy(unfused))
    x, labels = network_input(unfused, batch, device)
    for model in (unfused, fused):
        training_step(model, x, labels)()
    kept = {}
    for label, model in (("unfused", unfused), ("fused", fused)):
        kept[label] = saved_tensor_bytes(lambda model=model: model(x))["bytes"] / 2**20
        models.reset_states(model)
    medians = time_rounds(
        {"unfused": training_step(unfused, x, labels), "fused": training_step(fused, x, labels)}, rounds, device
    )
    row = {
        "network": name,
        "batch": batch,
        "step_ms": medians,
        "speedup": medians["unfused"] / medians["fused"],
        "kept_mib": kept,
    }
    if peak:
        row["peak_mib"] = {case: peak_step_mib(name, case, batch, device) for case in ("unfused", "fused")}
    return row


def resident_mib(field: str) -> float:
    """VmRSS or VmHWM of this process, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_of_first_step(name: str, case: str, batch: int, device: torch.device) -> float:
    """What one training step of a fresh network adds to the memory at its peak, MiB: on a GPU the
    allocator's peak over what was allocated before; on a CPU the process's peak resident memory
    (VmHWM) over its resident memory before the step, in a process that has run nothing else."""
    torch.manual_seed(0)
    model = NETWORKS[name]().to(device)
    if case == "fused":
        model = plif_cuda.fuse_bn_plif(model)
    x, labels = network_input(model, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        training_step(model, x, labels)()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = resident_mib("VmRSS")
    training_step(model, x, labels)()
    return resident_mib("VmHWM") - before


def peak_step_mib(name: str, case: str, batch: int, device: torch.device) -> float:
    """peak_of_first_step in a process of its own (a CPU process's peak cannot be reset)."""
    command = [sys.executable, __file__, "--peak-of", name, case, "--batch", str(batch), "--device", str(device)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def spikingjelly_static_image(
    in_channels: int = 1,
    image_size: int = 28,
    width: int = 128,
    convs_per_stage: int = 1,
    T: int = 8,
    fc_width: int = 2048,
) -> nn.Module:
    """The paper's static-image network (models.StaticImageSNN's layers, without dropout) written with
    SpikingJelly's layers: multi-step, its PLIF neurons with the paper's ATan and detach_reset, the
    input ``[N, C, H, W]`` repeated over T. The defaults are the Fashion-MNIST network; CIFAR-10's is
    ``(3, 32, 256, 3)``."""
    from spikingjelly.activation_based import layer, neuron, surrogate

    def plif():
        return neuron.ParametricLIFNode(surrogate_function=surrogate.ATan(), detach_reset=True, step_mode="m")

    body = []
    channels = in_channels
    for _ in range(2):
        for _ in range(convs_per_stage):
            conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
            body += [layer.SeqToANNContainer(conv, nn.BatchNorm2d(width)), plif()]
            channels = width
        body.append(layer.MaxPool2d(2, 2, step_mode="m"))
    body += [
        layer.Flatten(step_mode="m"),
        layer.Linear(width * (image_size // 4) ** 2, fc_width, bias=False, step_mode="m"),
        plif(),
        layer.Linear(fc_width, 100, bias=False, step_mode="m"),
        plif(),
    ]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.T = T
            self.body = nn.Sequential(*body)

        def forward(self, x):
            rate = self.body(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)).mean(0)
            return F.avg_pool1d(rate.unsqueeze(1), 10, 10).squeeze(1)

    return Net()


# The networks of the rows, by name.
NETWORKS = {
    "fashion_mnist": lambda: models.StaticImageSNN(),
    "cifar10": lambda: models.StaticImageSNN(in_channels=3, image_size=32, width=256, convs_per_stage=3),
    "fashion_mnist_spikingjelly": lambda: spikingjelly_static_image(),
    "cifar10_spikingjelly": lambda: spikingjelly_static_image(3, 32, 256, 3),
}


# The GPU's gradients against the CPU op's: float32 rounding apart (largest difference over the largest value).
GRADIENT_TOLERANCE = 1e-5


def fused_layer_results(where: torch.device, surrogate: str) -> dict:
    """One training forward+backward of the fused layer on ``where``, from fixed values: what
    matches_cpu compares."""
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(8, 16, 32, 16, 16, generator=gen) * 2 + 0.5
    grad = torch.randn(y.shape, generator=gen)
    torch.manual_seed(0)
    layer = plif_cuda.BatchNormPLIF(32, surrogate_function=surrogate, tau_shape=(32, 1, 1)).to(where)
    with torch.no_grad():
        layer.bn.bias.fill_(0.6)
    y_where = y.to(where).requires_grad_()
    spikes = layer(y_where)
    spikes.backward(grad.to(where))
    return {
        "spikes": spikes.detach().cpu(),
        "running_var": layer.bn.running_var.cpu(),
        "grads": [t.cpu() for t in (y_where.grad, layer.bn.weight.grad, layer.w.grad)],
    }


def matches_cpu(device: torch.device, surrogate: str, cpu: dict) -> dict:
    """The fused layer on ``device`` against the CPU op's results ``cpu`` (fused_layer_results):
    spikes and running statistics bit for bit (no exp in the spiking forward; the statistics in
    float64 in one order), gradients within GRADIENT_TOLERANCE (a GPU's exp may differ from the
    CPU's in the last place, and so the surrogate's slope)."""
    other = fused_layer_results(device, surrogate)
    report = {
        "spikes_equal": bool(torch.equal(cpu["spikes"], other["spikes"])),
        "running_var_equal": bool(torch.equal(cpu["running_var"], other["running_var"])),
        "grad_max_relative_difference": [
            float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30))) for a, b in zip(other["grads"], cpu["grads"])
        ],
        "fused_kernel_on_device": plif_cuda.batchnorm.fused_op_available(device.type),
    }
    report["passed"] = (
        report["spikes_equal"]
        and report["running_var_equal"]
        and report["fused_kernel_on_device"]
        and max(report["grad_max_relative_difference"]) <= GRADIENT_TOLERANCE
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=4, default=[32, 64, 32, 32], metavar=("N", "C", "H", "W"))
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--surrogate", default="atan")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the pair's input and gradient"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--network-rounds", type=int, default=5)
    parser.add_argument("--cifar", action="store_true", help="also the CIFAR-10 network (slow on CPU)")
    parser.add_argument(
        "--spikingjelly", action="store_true", help="also the networks written in SpikingJelly's layers"
    )
    parser.add_argument("--no-peak", action="store_true", help="leave out the networks' peak memory")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then also the check against the CPU op)")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--dry-run", action="store_true", help="with --device cuda: stop before the first GPU call")
    parser.add_argument("--peak-of", nargs=2, metavar=("NETWORK", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.peak_of:
        print(peak_of_first_step(*args.peak_of, args.batch, device))
        return 0
    cpu_results = None
    if device.type != "cpu":
        cpu_results = fused_layer_results(torch.device("cpu"), args.surrogate)
        gpu_phase.stop_unless_gpu(args.dry_run, "bn_plif")

    names = ["fashion_mnist"] + (["cifar10"] if args.cifar else [])
    if args.spikingjelly:
        names += [name + "_spikingjelly" for name in names]
    report = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "load_before": load_average(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "pair": pair_rows(args.size, args.T, args.rounds, args.surrogate, device, getattr(torch, args.dtype)),
        "networks": [
            network_rows(name, NETWORKS[name], args.batch, args.network_rounds, device, peak=not args.no_peak)
            for name in names
        ],
    }
    if cpu_results is not None:
        report["matches_cpu"] = matches_cpu(device, args.surrogate, cpu_results)
    report["load_after"] = load_average()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0 if report.get("matches_cpu", {"passed": True})["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
