"""The PLIF paper's network families (Fang et al., ICCV 2021), built on the fused layer.

Both families are multi-step throughout: activations are time-first ``[T, N, ...]``.
Stateless layers (conv, batch-norm, pooling, linear) run once on the time steps folded
into the batch (``[T*N, ...]``); the spiking neurons run all T steps in one fused call.

- ``StaticImageSNN``: images ``[N, C, H, W]``. The first conv+BN is applied once and its
  output repeated over T, as in the paper: the image is the same at every step, so this
  layer computes the same thing T times otherwise. The repetition is a broadcast
  (``expand``, time stride 0) that the neurons' kernels read in place: no ``[T, ...]`` copy.
  Its neurons are the encoder that turns the analog image into spikes.
- ``EventFrameSNN``: event frames ``[T, N, 2, H, W]`` (one channel per polarity); every
  layer runs on every step.

Layout (the paper's notation): ``{{c<width>k3s1-BN-neuron} * convs_per_stage - pool k2s2} * depth
- dropout - FC<fc_width>-neuron - dropout - FC<classes*voting>-neuron - voting``. The voting
layer averages the output neurons in groups of ``voting`` (avg-pool 1d), one group per class;
the mean over T of that is the firing rate, the network's output in ``[0, 1]``.

The neurons keep their membrane across calls (as SpikingJelly's do): call
``reset_states(model)`` after each batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .module import LIFNode, ParametricLIFNode

NEURONS = ("plif", "lif")
POOLINGS = ("max", "avg")
TAU_GRANULARITIES = ("layer", "channel")


def reset_states(model: nn.Module) -> None:
    """Reset the membrane of every neuron in ``model`` (call it between batches).

    Like SpikingJelly's ``functional.reset_net``: every submodule with a ``reset()`` method.
    """
    for module in model.modules():
        reset = getattr(module, "reset", None)
        if callable(reset):
            reset()


def neuron_layers(model: nn.Module) -> dict[str, ParametricLIFNode]:
    """The spiking neurons of ``model`` by their qualified names, in network order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ParametricLIFNode)}


def learned_taus(model: nn.Module) -> dict[str, float]:
    """Mean tau of each neuron layer (the one tau, for per-layer tau)."""
    return {name: float(torch.as_tensor(layer.tau).mean()) for name, layer in neuron_layers(model).items()}


class SeqToBatch(nn.Module):
    """Runs a stateless module on ``[T, N, ...]`` by folding T into the batch."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.module = modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        y = self.module(x_seq.flatten(0, 1))
        return y.unflatten(0, x_seq.shape[:2])


class SeqDropout(nn.Module):
    """Dropout whose mask is drawn once per sample and shared by all T time steps.

    A fresh mask at every step would let each neuron fire through on some step; the paper
    (and SpikingJelly's multi-step ``Dropout``) keep one mask over time.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x_seq
        mask = F.dropout(torch.ones_like(x_seq[0]), self.p, training=True)
        return x_seq * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class VotingLayer(nn.Module):
    """``[T, N, classes * voting]`` spikes -> ``[N, classes]`` firing rates."""

    def __init__(self, voting: int):
        super().__init__()
        self.voting = voting

    def forward(self, spike_seq: torch.Tensor) -> torch.Tensor:
        rate = spike_seq.mean(0)
        return F.avg_pool1d(rate.unsqueeze(1), self.voting, self.voting).squeeze(1)

    def extra_repr(self) -> str:
        return f"voting={self.voting}"


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class SpikingConvNet(nn.Module):
    """Shared body of the two families; use ``StaticImageSNN`` or ``EventFrameSNN``.

    Args:
        in_channels, image_size, num_classes: the input images and the labels.
        T: time steps (for event frames, the T of the input; checked at forward).
        depth: conv stages, each ending in a 2x2 pooling (the image side halves each time).
        width: conv channels.
        convs_per_stage: conv-BN-neuron blocks per stage (1 for MNIST in the paper, 3 for CIFAR-10).
        fc_width: neurons of the hidden fully connected layer.
        voting: output neurons per class.
        neuron: "plif" (learnable tau) or "lif" (tau fixed at ``init_tau``).
        pooling: "max" (the paper's choice) or "avg".
        tau_granularity: "layer" (one tau per layer, the paper) or "channel" (one per conv
            channel / per FC neuron).
        init_tau: the starting tau (the fixed tau for "lif").
        surrogate: surrogate gradient name (see ``plif_cuda.surrogate``); "atan" in the paper.
        detach_reset: as in the paper, True.
        backend: the neurons' backend ("auto", "cpu", "cuda", "cupy", "torch").
        dropout: dropout before each FC layer, one mask for all time steps.
        batch_norm: False drops the BN layers (conv with bias instead).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        T: int = 8,
        depth: int = 2,
        width: int = 128,
        convs_per_stage: int = 1,
        fc_width: int = 2048,
        voting: int = 10,
        neuron: str = "plif",
        pooling: str = "max",
        tau_granularity: str = "layer",
        init_tau: float = 2.0,
        surrogate: str = "atan",
        detach_reset: bool = True,
        backend: str = "auto",
        dropout: float = 0.5,
        batch_norm: bool = True,
        repeat_first_block: bool,
    ):
        super().__init__()
        for value, name in (
            (in_channels, "in_channels"),
            (image_size, "image_size"),
            (num_classes, "num_classes"),
            (T, "T"),
            (depth, "depth"),
            (width, "width"),
            (convs_per_stage, "convs_per_stage"),
            (fc_width, "fc_width"),
            (voting, "voting"),
        ):
            _check_positive_int(value, name)
        _check_choice(neuron, "neuron", NEURONS)
        _check_choice(pooling, "pooling", POOLINGS)
        _check_choice(tau_granularity, "tau_granularity", TAU_GRANULARITIES)
        if image_size < 2**depth:
            raise ValueError(f"image_size {image_size} is too small for depth {depth}: each stage halves the side")
        self.T = T
        self.num_classes = num_classes
        self.repeat_first_block = repeat_first_block
        # Every neuron layer's options: which neuron and its tau, then how it fires and runs.
        neuron_options = dict(neuron=neuron, tau_granularity=tau_granularity, init_tau=init_tau)
        neuron_options.update(surrogate=surrogate, detach_reset=detach_reset, backend=backend)
        pool = nn.MaxPool2d if pooling == "max" else nn.AvgPool2d

        def conv_bn(channels_in):
            conv = nn.Conv2d(channels_in, width, kernel_size=3, padding=1, bias=not batch_norm)
            return [conv, nn.BatchNorm2d(width)] if batch_norm else [conv]

        # The first conv(+BN) is kept apart so that static images can run it once.
        self.first_conv = SeqToBatch(*conv_bn(in_channels))
        self.first_neuron = make_neuron(width, conv=True, **neuron_options)
        body = []
        channels = width
        for stage in range(depth):
            blocks = convs_per_stage - 1 if stage == 0 else convs_per_stage
            for _ in range(blocks):
                body += [SeqToBatch(*conv_bn(channels)), make_neuron(width, conv=True, **neuron_options)]
            body.append(SeqToBatch(pool(2, 2)))
        self.body = nn.Sequential(*body)
        features = width * (image_size // 2**depth) ** 2  # pooling floors odd sides
        self.head = nn.Sequential(
            SeqToBatch(nn.Flatten()),
            SeqDropout(dropout),
            SeqToBatch(nn.Linear(features, fc_width, bias=False)),
            make_neuron(fc_width, conv=False, **neuron_options),
            SeqDropout(dropout),
            SeqToBatch(nn.Linear(fc_width, num_classes * voting, bias=False)),
            make_neuron(num_classes * voting, conv=False, **neuron_options),
        )
        self.vote = VotingLayer(voting)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The first block's spikes ``[T, N, width, H, W]``."""
        if self.repeat_first_block:
            if x.dim() != 4:
                raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
            current = self.first_conv.module(x)
            current_seq = current.unsqueeze(0).expand(self.T, *current.shape)
        else:
            if x.dim() != 5:
                raise ValueError(f"expected event frames [T, N, 2, H, W], got shape {tuple(x.shape)}")
            current_seq = self.first_conv(x)
        return self.first_neuron(current_seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Firing rate of each class, ``[N, num_classes]``, in [0, 1]."""
        return self.vote(self.head(self.body(self.encode(x))))


def make_neuron(
    channels: int,
    *,
    conv: bool,
    neuron: str,
    tau_granularity: str,
    init_tau: float,
    surrogate: str,
    detach_reset: bool,
    backend: str,
) -> ParametricLIFNode:
    """One multi-step neuron layer with hard reset to 0 and threshold 1 (the paper's settings).

    ``tau_granularity`` shapes a PLIF layer's ``w``; a LIF layer's tau is one constant."""
    if tau_granularity == "channel":
        tau_shape = (channels, 1, 1) if conv else (channels,)
    else:
        tau_shape = ()
    options = dict(surrogate_function=surrogate, detach_reset=detach_reset, step_mode="m", backend=backend)
    if neuron == "plif":
        return ParametricLIFNode(init_tau=init_tau, tau_shape=tau_shape, **options)
    return LIFNode(tau=init_tau, **options)


class StaticImageSNN(SpikingConvNet):
    """The paper's network for static images (MNIST, Fashion-MNIST, CIFAR-10).

    Input ``[N, C, H, W]``; the first conv+BN runs once and is repeated over ``T`` steps.
    Defaults are the paper's MNIST network; CIFAR-10 used ``width=256, convs_per_stage=3``.
    See ``SpikingConvNet`` for the arguments.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **kwargs):
        super().__init__(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, repeat_first_block=True, **kwargs
        )


class EventFrameSNN(SpikingConvNet):
    """The paper's network for neuromorphic data (N-MNIST, CIFAR10-DVS, DVS128 Gesture).

    Input event frames ``[T, N, 2, H, W]``. See ``SpikingConvNet`` for the arguments.
    """

    def __init__(self, in_channels: int = 2, image_size: int = 34, num_classes: int = 10, T: int = 10, **kwargs):
        super().__init__(
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
            T=T,
            repeat_first_block=False,
            **kwargs,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5 and x.shape[0] != self.T:
            raise ValueError(f"expected {self.T} time steps (the model's T), got input of shape {tuple(x.shape)}")
        return super().forward(x)
