"""Minimum memory traffic of each pass: the bytes behind every GB/s figure of the harness.

The model counts each input of a pass read once and each output written once, for the
design every fused backend shares (forward saves H = the charged membrane, in float32,
as the only [T, N] tensor kept for backward; backward recomputes the rest from it).
It depends on the shapes and dtypes only, so every implementation of a row gets the same
byte count and the GB/s column compares their times on one scale.

With T steps, N neurons, ``s`` = bytes per element of the input dtype (4 fp32, 2 bf16/fp16),
``P`` = number of tau values (1 per layer, C per channel):

forward (training: the input requires grad, so H is stored):
    read  X [T, N] s            write spikes [T, N] s
    write H [T, N] 4 (fp32 even for half inputs)
    write v_last [N] s          read w [P] 4
backward (gradient arrives on the spikes only, as in a loss over the spikes):
    read  grad_spikes [T, N] s  read H [T, N] 4
    write grad_X [T, N] s       read w [P] 4, write grad_w [P] 4
forward+backward: the sum of the two (H is written once and read once).

Not counted: v_init (one value), the per-neuron grad_k partials a kernel may reduce on the
side (N values at most), and anything an implementation writes beyond this minimum (the
Python-loop implementations write many [N] temporaries per step: that is what they cost).
"""
from __future__ import annotations

import torch

H_BYTES = 4
PASSES = ("fwd", "bwd", "fwdbwd")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_bytes(T: int, N: int, dtype: torch.dtype, tau_values: int) -> int:
    s = element_size(dtype)
    return T * N * (s + s + H_BYTES) + N * s + tau_values * 4


def backward_bytes(T: int, N: int, dtype: torch.dtype, tau_values: int) -> int:
    s = element_size(dtype)
    return T * N * (s + H_BYTES + s) + tau_values * 8


def min_bytes(pass_name: str, T: int, N: int, dtype: torch.dtype, tau_values: int) -> int:
    if pass_name == "fwd":
        return forward_bytes(T, N, dtype, tau_values)
    if pass_name == "bwd":
        return backward_bytes(T, N, dtype, tau_values)
    if pass_name == "fwdbwd":
        return forward_bytes(T, N, dtype, tau_values) + backward_bytes(T, N, dtype, tau_values)
    raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")
