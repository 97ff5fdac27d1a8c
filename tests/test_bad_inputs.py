"""Every bad argument raises a Python exception whose message names it (never a crash)."""

from __future__ import annotations

import math

import pytest
import torch

import plif_cuda
from plif_cuda import plif_multistep


def _x(shape=(3, 2, 5), dtype=torch.float32, device="cpu"):
    return torch.randn(shape, device=device).to(dtype) if device != "meta" else torch.empty(shape, device="meta")


W = torch.tensor(0.0)


@pytest.mark.parametrize("dtype", (torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8), ids=str)
def test_x_seq_dtype(dtype):
    x_seq = torch.ones((3, 4)).to(dtype)
    with pytest.raises(TypeError, match="x_seq"):
        plif_multistep(x_seq, W)


def test_x_seq_not_a_tensor():
    with pytest.raises(TypeError, match="x_seq"):
        plif_multistep([[1.0, 2.0]], W)


def test_x_seq_without_time_dimension():
    with pytest.raises(ValueError, match="x_seq"):
        plif_multistep(torch.tensor(1.0), W)


@pytest.mark.parametrize("name", ("w", "v_init"))
@pytest.mark.parametrize("shape", ((3,), (2, 1, 5), (4, 5), (2, 6)), ids=str)
def test_tensor_that_does_not_broadcast_against_one_step(name, shape):
    x_seq = _x((3, 2, 5))
    kwargs = {"w": W, "v_init": None, name: torch.zeros(shape)}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        plif_multistep(x_seq, kwargs["w"], kwargs["v_init"])


@pytest.mark.parametrize("name", ("w", "v_init"))
def test_tensor_of_wrong_dtype_or_type(name):
    x_seq = _x()
    for bad in (torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.complex64), "0.5", [0.5], True):
        kwargs = {"w": W, "v_init": None, name: bad}
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            plif_multistep(x_seq, kwargs["w"], kwargs["v_init"])


@pytest.mark.parametrize("name", ("w", "v_init"))
def test_tensors_on_different_devices(name):
    # The meta device stands in for a second device: the check is the same for cuda:0 vs cpu.
    x_seq = _x(device="meta")
    kwargs = {"w": torch.zeros((), device="meta"), "v_init": None, name: torch.zeros(())}
    with pytest.raises(ValueError, match=rf"\b{name}\b.*(meta|cpu)"):
        plif_multistep(x_seq, kwargs["w"], kwargs["v_init"])


def test_unknown_surrogate():
    with pytest.raises(ValueError, match="surrogate"):
        plif_multistep(_x(), W, surrogate="relu")
    with pytest.raises(ValueError, match="surrogate"):
        plif_multistep(_x(), W, surrogate=None)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        plif_multistep(_x(), W, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        plif_multistep(_x(), W, backend=None)


@pytest.mark.parametrize(
    "alpha, error",
    (
        (0.0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("2", TypeError),
        (True, TypeError),
    ),
)
def test_bad_alpha(alpha, error):
    with pytest.raises(error, match="alpha"):
        plif_multistep(_x(), W, alpha=alpha)


def test_super_spike_has_no_smooth_mode():
    with pytest.raises(ValueError, match="super_spike.*spiking=False|spiking=False.*super_spike"):
        plif_multistep(_x(), W, surrogate="super_spike", spiking=False)
    with pytest.raises(ValueError, match="super_spike"):
        plif_cuda.surrogate.SuperSpike(spiking=False)


@pytest.mark.parametrize("name", ("v_threshold", "v_reset"))
@pytest.mark.parametrize(
    "value, error",
    (
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        ("1.0", TypeError),
        (False, TypeError),
        (torch.tensor([1.0, 2.0]), TypeError),
    ),
)
def test_bad_threshold_or_reset(name, value, error):
    with pytest.raises(error, match=name):
        plif_multistep(_x(), W, **{name: value})


@pytest.mark.parametrize("flag", ("decay_input", "detach_reset", "store_v_seq", "spiking"))
@pytest.mark.parametrize("value", (1, 0, "yes", None), ids=repr)
def test_non_bool_flags(flag, value):
    with pytest.raises(TypeError, match=flag):
        plif_multistep(_x(), W, **{flag: value})


# ---- the module ---------------------------------------------------------------------------------
@pytest.mark.parametrize("init_tau", (1.0, 0.5, -3.0, math.nan, "2.0", True))
def test_init_tau_must_exceed_one(init_tau):
    with pytest.raises(ValueError, match="init_tau"):
        plif_cuda.ParametricLIFNode(init_tau=init_tau)


@pytest.mark.parametrize("tau", (1.0, 0.2))
def test_lif_tau_must_exceed_one(tau):
    with pytest.raises(ValueError, match="tau"):
        plif_cuda.LIFNode(tau=tau)


def test_unknown_step_mode():
    with pytest.raises(ValueError, match="step_mode"):
        plif_cuda.ParametricLIFNode(step_mode="multi")
    layer = plif_cuda.ParametricLIFNode()
    with pytest.raises(ValueError, match="step_mode"):
        layer.step_mode = "x"


def test_module_bad_surrogate():
    with pytest.raises(TypeError, match="surrogate_function"):
        plif_cuda.ParametricLIFNode(surrogate_function=42, step_mode="m")(_x())
    with pytest.raises(ValueError, match="surrogate"):
        plif_cuda.ParametricLIFNode(surrogate_function="relu", step_mode="m")(_x())


def test_module_bad_backend_and_options():
    with pytest.raises(ValueError, match="backend"):
        plif_cuda.ParametricLIFNode(backend="fast", step_mode="m")(_x())
    with pytest.raises(ValueError, match="v_threshold"):
        plif_cuda.ParametricLIFNode(v_threshold=math.nan, step_mode="m")(_x())
    with pytest.raises(TypeError, match="detach_reset"):
        plif_cuda.ParametricLIFNode(detach_reset="no", step_mode="m")(_x())
    with pytest.raises(TypeError, match="x_seq"):
        plif_cuda.ParametricLIFNode(step_mode="m")(torch.ones((3, 2), dtype=torch.int64))


# ---- the raw ops: bad calls are errors, not crashes -------------------------------------------------
def _raw_forward(x, k, v_init, surrogate="sigmoid", spiking=True, needs_backward=False):
    return torch.ops.plif_cuda.multistep_forward(
        x,
        k,
        v_init,
        v_threshold=1.0,
        v_reset=0.0,
        decay_input=True,
        detach_reset=False,
        surrogate=surrogate,
        alpha=4.0,
        spiking=spiking,
        store_v_seq=False,
        needs_backward=needs_backward,
    )


def test_raw_op_checks():
    x = torch.randn(3, 4, 5)
    one = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"\bx\b.*contiguous"):
        _raw_forward(x.transpose(1, 2), one, one)
    with pytest.raises(RuntimeError, match=r"\bk\b"):
        _raw_forward(x, torch.zeros(7), one)
    with pytest.raises(RuntimeError, match=r"\bk\b.*dtype"):
        _raw_forward(x, torch.zeros(1, dtype=torch.float64), one)
    with pytest.raises(RuntimeError, match=r"\bv_init\b"):
        _raw_forward(x, one, torch.zeros(19))
    with pytest.raises(RuntimeError, match="surrogate must be one of sigmoid, atan, .*, got 'relu'"):
        _raw_forward(x, one, one, surrogate="relu")
    with pytest.raises(RuntimeError, match="super_spike"):
        _raw_forward(x, one, one, surrogate="super_spike", spiking=False)
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        _raw_forward(torch.ones((3, 4), dtype=torch.int32), one, one)
    with pytest.raises(RuntimeError, match="needs_backward=False"):
        _raw_forward(x.requires_grad_(), one, one)
    with pytest.raises(RuntimeError, match="save must be 0 .*, 1 .* or 2 .*, got 3"):
        torch.ops.plif_cuda_internal.multistep_forward_saving(
            x.detach(),
            one,
            one,
            v_threshold=1.0,
            v_reset=0.0,
            decay_input=True,
            detach_reset=False,
            surrogate="sigmoid",
            alpha=4.0,
            spiking=True,
            store_v_seq=False,
            save=3,
        )
