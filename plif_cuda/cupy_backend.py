"""CuPy backend: the CUDA kernels of csrc/ compiled at run time through NVRTC."""
from __future__ import annotations


def unavailable_reason() -> str | None:
    try:
        import cupy  # noqa: F401
    except ImportError as error:
        return f"cupy is not installed ({error}); pip install 'plif_cuda[cupy]'"
    return "the CuPy backend is not built yet"


def forward_op():
    raise RuntimeError(unavailable_reason())
