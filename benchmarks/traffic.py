"""Memory traffic of each pass of the fused op: the bytes behind every GB/s figure of the harness.

One definition, by save mode, of what the fused op's kernels read and write and what autograd
keeps for its backward; tests/test_traffic.py checks every stream against the tensors the real
op takes, returns and saves. Every implementation of a row gets the same byte count, so the GB/s
column compares their times on one scale.

With T steps, N neurons, ``s`` = bytes per element of the input dtype (4 fp32, 2 bf16/fp16,
8 fp64), ``a`` = bytes of the compute dtype (8 for fp64, 4 otherwise), ``R`` = rows of H the
forward writes: T with SAVE_H (fp32, fp64), (T-1)//8 with SAVE_CHECKPOINTS (fp16, bf16: 0 at
T <= 8), and ``P``, ``Q`` = values of k and v_init as the op takes them (1, or N: a per-channel
tau reaches the op expanded to one k per neuron):

forward (training: the input requires grad):
    read  x [T, N] s,  k P a,  v_init Q a
    write spikes [T, N] s,  H R rows of N a,  v_last [N] a
backward (gradient on the spikes only, as from a loss over the spikes):
    read  grad_spikes [T, N] s,  H R rows of N a,  x [T, N] s (SAVE_CHECKPOINTS only: it
          recomputes each chunk's H from x and the checkpoint row before it),  k P a,  v_init Q a
    write grad_x [T, N] s,  grad_k P a,  grad_v_init Q a
    on CUDA, where k (v_init) is one value: the kernel writes every neuron's share [N] a, which
    the op then reads back to sum (plif_ops.cpp): + 2 N a each, 16 B per neuron for fp32
forward+backward: the sum of the two.
kept for the backward (autograd's saved tensors): H's R rows, x (SAVE_CHECKPOINTS), k, v_init.

Not counted: the torch kernels around the op (sigmoid of the tau parameter, the fill of v_init,
a per-channel tau's expansion to N and the sum of its gradient back), and what an
implementation moves beyond this (the Python-loop implementations write many [N] temporaries
per step: that is what they cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plif_cuda import _C
from plif_cuda import ops as plif_ops
from plif_cuda.reference import compute_dtype

PASSES = ("fwd", "bwd", "fwdbwd")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def training_save_mode(dtype: torch.dtype) -> int:
    """The save mode of a differentiable forward of ``dtype`` input: the op's own choice."""
    return plif_ops.save_mode(torch.empty((), dtype=dtype), needs_grad=True)


def h_rows(T: int, save: int) -> int:
    """Rows of N values of H that the forward writes and the backward reads."""
    if save == _C.SAVE_H:
        return T
    if save == _C.SAVE_CHECKPOINTS:
        return _C.checkpoint_rows(T)
    if save == _C.SAVE_NOTHING:
        return 0
    raise ValueError(f"save must be one of SAVE_NOTHING, SAVE_H, SAVE_CHECKPOINTS, got {save!r}")


def gpu_sums_shares(device: str, values: int, N: int) -> bool:
    """Whether the CUDA backward writes per-neuron shares of a one-value gradient and sums them
    afterwards (plif_ops.cpp: ``gpu_sums_k`` / ``gpu_sums_v_init``)."""
    return device == "cuda" and values == 1 and N > 1


@dataclass(frozen=True)
class Traffic:
    """Named streams of one pass: (name, bytes) read and written."""

    reads: tuple[tuple[str, int], ...]
    writes: tuple[tuple[str, int], ...]

    @property
    def read_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.reads)

    @property
    def write_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.writes)

    @property
    def total(self) -> int:
        return self.read_bytes + self.write_bytes

    def read(self, name: str) -> int:
        return sum(nbytes for stream, nbytes in self.reads if stream == name)

    def written(self, name: str) -> int:
        return sum(nbytes for stream, nbytes in self.writes if stream == name)

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.reads + other.reads, self.writes + other.writes)


def _checked_sizes(T: int, N: int, dtype: torch.dtype, save, k_values: int, v_init_values: int):
    """(save mode, bytes of an input element, bytes of a compute-dtype element) for a pass's
    arguments, checked; ``save`` None is the training forward's own save mode."""
    if T < 0 or N < 0:
        raise ValueError(f"T and N must be >= 0, got T={T}, N={N}")
    for name, values in (("k_values", k_values), ("v_init_values", v_init_values)):
        if values not in (1, N):
            raise ValueError(f"{name} must be 1 or N={N} (one value, or one per neuron), got {values}")
    save = training_save_mode(dtype) if save is None else save
    return save, element_size(dtype), element_size(compute_dtype(dtype))


def forward_traffic(
    T: int, N: int, dtype: torch.dtype, *, save: int | None = None, k_values: int = 1, v_init_values: int = 1
) -> Traffic:
    """The forward kernel's streams (``save`` None: the training forward's own save mode)."""
    save, s, a = _checked_sizes(T, N, dtype, save, k_values, v_init_values)
    reads = (("x", T * N * s), ("k", k_values * a), ("v_init", v_init_values * a))
    writes = (("spikes", T * N * s), ("h_seq", h_rows(T, save) * N * a), ("v_last", N * a))
    return Traffic(reads, writes)


def backward_traffic(
    T: int,
    N: int,
    dtype: torch.dtype,
    *,
    save: int | None = None,
    k_values: int = 1,
    v_init_values: int = 1,
    device: str = "cuda",
) -> Traffic:
    """The backward kernel's streams and, on CUDA, the op's sums of one-value gradients' shares."""
    save, s, a = _checked_sizes(T, N, dtype, save, k_values, v_init_values)
    if save == _C.SAVE_NOTHING:
        raise ValueError("a forward with save=SAVE_NOTHING has no backward")
    reads = [("grad_spikes", T * N * s), ("h_seq", h_rows(T, save) * N * a)]
    if save == _C.SAVE_CHECKPOINTS:
        reads.append(("x", T * N * s))
    reads += [("k", k_values * a), ("v_init", v_init_values * a)]
    writes = [("grad_x", T * N * s)]
    for name, values in (("grad_k", k_values), ("grad_v_init", v_init_values)):
        if gpu_sums_shares(device, values, N):
            writes.append((f"{name}_shares", N * a))
            reads.append((f"{name}_shares", N * a))
        writes.append((name, values * a))
    return Traffic(tuple(reads), tuple(writes))


def pass_traffic(
    pass_name: str,
    T: int,
    N: int,
    dtype: torch.dtype,
    *,
    k_values: int = 1,
    v_init_values: int = 1,
    device: str = "cuda",
    save: int | None = None,
) -> Traffic:
    """The streams the fused op's kernels move in one call of the pass (``.total``: its bytes)."""
    forward = forward_traffic(T, N, dtype, save=save, k_values=k_values, v_init_values=v_init_values)
    if pass_name == "fwd":
        return forward
    backward = backward_traffic(T, N, dtype, save=save, k_values=k_values, v_init_values=v_init_values, device=device)
    if pass_name == "bwd":
        return backward
    if pass_name == "fwdbwd":
        return forward + backward
    raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")


def saved_bytes(
    T: int, N: int, dtype: torch.dtype, *, save: int | None = None, k_values: int = 1, v_init_values: int = 1
) -> int:
    """Bytes autograd keeps for the backward of one forward (distinct storages)."""
    save, s, a = _checked_sizes(T, N, dtype, save, k_values, v_init_values)
    kept_x = T * N * s if save == _C.SAVE_CHECKPOINTS else 0
    return h_rows(T, save) * N * a + kept_x + (k_values + v_init_values) * a
