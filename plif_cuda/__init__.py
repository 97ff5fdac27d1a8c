"""plif_cuda: fused multi-step Parametric LIF spiking neurons for PyTorch.

spike_seq, v_last, v_seq = plif_cuda.plif_multistep(x_seq, w)
layer = plif_cuda.ParametricLIFNode(step_mode="m")
"""

from . import (
    ops,  # noqa: F401  (registers the compiled ops, when built)
    surrogate,
)
from .backends import available_backends
from .batchnorm import BatchNormPLIF, bn_plif_multistep, fuse_bn_plif
from .functional import plif_multistep
from .module import LIFNode, ParametricLIFNode
from .ops import cpu_cache_bytes, empty_cpu_cache
from .reference import plif_multistep_ref
from .spikingjelly_compat import patch_spikingjelly, unpatch_spikingjelly

__all__ = [
    "plif_multistep",
    "plif_multistep_ref",
    "ParametricLIFNode",
    "LIFNode",
    "BatchNormPLIF",
    "bn_plif_multistep",
    "fuse_bn_plif",
    "available_backends",
    "cpu_cache_bytes",
    "empty_cpu_cache",
    "patch_spikingjelly",
    "unpatch_spikingjelly",
    "surrogate",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # plif_cuda.nir needs the optional 'nir' package, so it is imported on first use only.
    if name == "nir":
        import importlib

        return importlib.import_module(".nir", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
