"""Network-level figure: one training step of a small spiking convnet, per neuron layer.

The net (built here, on purpose independent of any model code of the package):
    [T, B, 1, 28, 28] static image repeated over T
    -> conv 3x3 (32) - BatchNorm - PLIF - maxpool 2
    -> conv 3x3 (32) - BatchNorm - PLIF - maxpool 2
    -> flatten - linear (10), averaged over T -> cross-entropy
Convolutions and BatchNorm run on the [T*B, ...] view (one call for all steps); the neuron
layers run all T steps at once (step_mode 'm'). A training step is zero_grad, forward,
loss, backward and an SGD step, with the neuron state reset before it.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

import plif_cuda
from timing import measure

CHANNELS = 32
IMAGE = 28
CLASSES = 10


class SpikingConvNet(nn.Module):
    def __init__(self, make_neuron):
        super().__init__()
        self.conv1 = nn.Conv2d(1, CHANNELS, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(CHANNELS)
        self.neuron1 = make_neuron()
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(CHANNELS)
        self.neuron2 = make_neuron()
        self.classifier = nn.Linear(CHANNELS * (IMAGE // 4) ** 2, CLASSES)

    @staticmethod
    def _per_step(module, x_seq):
        steps, batch = x_seq.shape[:2]
        y = module(x_seq.flatten(0, 1))
        return y.reshape(steps, batch, *y.shape[1:])

    def forward(self, x_seq):
        x = self._per_step(lambda x: self.bn1(self.conv1(x)), x_seq)
        x = self._per_step(lambda x: nn.functional.max_pool2d(x, 2), self.neuron1(x))
        x = self._per_step(lambda x: self.bn2(self.conv2(x)), x)
        x = self._per_step(lambda x: nn.functional.max_pool2d(x, 2), self.neuron2(x))
        return self.classifier(x.flatten(2)).mean(0)

    def reset(self):
        self.neuron1.reset()
        self.neuron2.reset()


def neuron_factories(device: torch.device, with_spikingjelly: bool):
    """(name, make_neuron or None, why missing, dtype) for each neuron layer and dtype compared."""
    fused = ("plif_cuda (auto)", lambda: plif_cuda.ParametricLIFNode(step_mode="m"), None)
    reference = ("plif_cuda backend='torch'", lambda: plif_cuda.ParametricLIFNode(step_mode="m", backend="torch"), None)
    factories = [
        (*fused, torch.float32),
        (*reference, torch.float32),
        (*fused, torch.bfloat16),
        (*reference, torch.bfloat16),
    ]
    if with_spikingjelly:
        try:
            neuron = importlib.import_module("spikingjelly.activation_based.neuron")
            factories.append(
                ("SpikingJelly ParametricLIFNode", lambda: neuron.ParametricLIFNode(step_mode="m"), None, torch.float32)
            )
        except Exception as error:
            factories.append(
                (
                    "SpikingJelly ParametricLIFNode",
                    None,
                    f"spikingjelly is not importable ({type(error).__name__}: {error})",
                    torch.float32,
                )
            )
    return factories


def neuron_saved_bytes_per_step(net: SpikingConvNet, x_seq: torch.Tensor) -> float:
    """Bytes the neuron layers keep for backward during one forward, per neuron-step (distinct
    storages saved while a neuron layer runs; what the layers around them keep is not counted)."""
    inside = []
    neuron_steps = []
    storages: dict[int, int] = {}

    def enter(module, args):
        inside.append(module)
        neuron_steps.append(args[0].numel())

    def leave(module, args, output):
        inside.pop()

    def pack(tensor):
        if inside:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    neurons = (net.neuron1, net.neuron2)
    handles = [m.register_forward_pre_hook(enter) for m in neurons] + [m.register_forward_hook(leave) for m in neurons]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            net.reset()
            net(x_seq)
    finally:
        for handle in handles:
            handle.remove()
    return sum(storages.values()) / sum(neuron_steps)


def training_step_rows(
    device: torch.device,
    *,
    T: int,
    batch: int,
    warmup: int,
    repeats: int,
    budget_s: float,
    with_spikingjelly: bool,
    progress,
) -> list[dict]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = [torch.rand(batch, 1, IMAGE, IMAGE, generator=generator).to(device) for _ in range(4)]
    inputs = [image.unsqueeze(0).expand(T, *image.shape) for image in images]
    labels = [torch.randint(0, CLASSES, (batch,), generator=generator).to(device) for _ in range(4)]
    rows = []
    for name, make_neuron, why_missing, dtype in neuron_factories(device, with_spikingjelly):
        dtype_name = str(dtype).removeprefix("torch.")
        row = {
            "layer": name,
            "dtype": dtype_name,
            "device": device.type,
            "T": T,
            "batch": batch,
            "image": [1, IMAGE, IMAGE],
        }
        if make_neuron is None:
            rows.append({**row, "status": "missing", "reason": why_missing})
            progress(f"network {name}: missing ({why_missing})")
            continue
        torch.manual_seed(0)
        net = SpikingConvNet(make_neuron).to(device, dtype)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        typed_inputs = [x.to(dtype) for x in inputs]

        def step(i):
            net.reset()
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(typed_inputs[i]).float(), labels[i])
            loss.backward()
            optimizer.step()
            return loss

        try:
            timing = measure(
                lambda i: i,
                step,
                len(inputs),
                device,
                warmup=warmup,
                repeats=repeats,
                budget_s=budget_s,
                min_repeats=min(3, repeats),
            )
        except Exception as error:
            rows.append({**row, "status": "error", "reason": f"{type(error).__name__}: {error}"})
            progress(f"network {name}: error {error}")
            continue
        saved = neuron_saved_bytes_per_step(net, typed_inputs[0])
        rows.append({**row, "status": "ok", **timing.as_dict(), "neuron_saved_bytes_per_neuron_step": saved})
        progress(
            f"network {name} {dtype_name}: {timing.median_ms:.1f} ms per training step (IQR {timing.iqr_ms:.1f}), "
            f"neuron layers keep {saved:.2f} B per neuron-step"
        )
    references = {r["dtype"]: r for r in rows if r["layer"] == "plif_cuda backend='torch'" and r["status"] == "ok"}
    for row in rows:
        reference = references.get(row["dtype"])
        if reference is not None and row["status"] == "ok":
            row["speedup_vs_reference_layer"] = reference["median_ms"] / row["median_ms"]
    return rows
