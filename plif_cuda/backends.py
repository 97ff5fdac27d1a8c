"""Backend selection: which implementation runs a call, and why another one cannot.

- "cpu":   the fused C++ kernel of the compiled extension (CPU tensors)
- "cuda":  the fused CUDA kernels of the compiled extension (CUDA tensors)
- "cupy":  the same op, its CUDA kernels compiled at run time through NVRTC and launched by CuPy
           (CUDA tensors; needs the extension, but not its compiled CUDA kernels)
- "torch": the pure-PyTorch reference (any device; slow, always there)
- "auto":  the best of the above for the tensor's device; when none of the fused backends
           can run, the reference, with a one-time warning that says why.
"""

from __future__ import annotations

import warnings

import torch

from . import ops

BACKENDS = ("auto", "cpu", "cuda", "cupy", "torch")
# The device type each fused backend's tensors live on (meta tensors go to any of them).
_FUSED_DEVICE_TYPE = {"cpu": "cpu", "cuda": "cuda", "cupy": "cuda"}
_warned: set[str] = set()


def _cupy_module():
    from . import cupy_backend

    return cupy_backend


def _no_gpu_reason(device: torch.device) -> str | None:
    """Why nothing runs on ``device`` because it is a GPU this process cannot see, or None.

    A tensor on a CUDA device proves the GPU exists; this catches asking about one by name
    (``available_backends("cuda")``, the doctor). torch.compile folds torch.cuda.is_available.
    """
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else a sentence saying why not."""
    if backend == "torch":
        return _no_gpu_reason(device)
    if backend not in _FUSED_DEVICE_TYPE:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not ops.extension_available():
        return ops.extension_error()
    if backend == "cuda" and not ops.extension_has_cuda():
        return "the compiled extension was built without CUDA kernels (see `python -m plif_cuda doctor`)"
    device_type = _FUSED_DEVICE_TYPE[backend]
    if device.type not in (device_type, "meta"):
        return f"backend {backend!r} runs on {device_type.upper()} tensors, but the input is on {device}"
    if backend == "cpu":
        return None
    return _no_gpu_reason(device) or (_cupy_module().unavailable_reason() if backend == "cupy" else None)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def select(backend: str, x: torch.Tensor) -> str:
    """The backend that will run for input ``x`` when ``backend`` is asked for."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = x.device
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"plif_cuda: backend {backend!r} is not available: {reason}")
        return backend
    if device.type == "cuda":
        candidates = ("cuda", "cupy")
    elif device.type == "meta":
        candidates = ("cpu",)
    else:
        candidates = ("cpu",) if device.type == "cpu" else ()
    reasons = []
    for candidate in candidates:
        reason = unavailable_reason(candidate, device)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    if device.type != "meta":
        why = "; ".join(reasons) if reasons else f"no fused kernel for device type {device.type!r}"
        _warn_once(f"plif_cuda: no fused backend for {device.type} tensors ({why}); using the slow PyTorch reference")
    return "torch"


def forward_op(backend: str):
    """The fused forward op that runs ``backend``: the nvcc launcher's, or for "cupy" the NVRTC
    launcher's (the same op with the same schema; CPU tensors run the CPU kernel through either),
    whose launcher importing plif_cuda.cupy_backend plugs in."""
    return _fused_ops(backend)[0]


def backward_op(backend: str):
    """The fused backward op of ``forward_op(backend)``'s launcher, which its autograd calls."""
    return _fused_ops(backend)[1]


def _fused_ops(backend: str):
    if backend not in ("cpu", "cuda", "cupy"):
        raise ValueError(f"backend {backend!r} has no fused op")
    if backend == "cupy":
        _cupy_module()
        return torch.ops.plif_cuda.multistep_forward_nvrtc, torch.ops.plif_cuda.multistep_backward_nvrtc
    return torch.ops.plif_cuda.multistep_forward, torch.ops.plif_cuda.multistep_backward


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run on ``device`` here (``unavailable_reason`` says why the others cannot)."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]
