"""Surrogate gradients: the seven functions of the spec table.

Each surrogate is identified by a name and an ``alpha``. The fused ops take the name, which the
compiled extension maps to its kernels' id (``plif_cuda._C.SURROGATES`` lists them in id
order), and ``alpha`` as a float, so one compiled kernel serves all of them (a warp-uniform
runtime switch). The names are those of ``DEFAULT_ALPHA``.

The classes below are thin descriptors that a user can pass as ``surrogate_function``.
They are also callable (``spike = surrogate(x)``) with the surrogate gradient in
backward, so that code written for SpikingJelly's surrogate objects keeps working.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import forward_ad

DEFAULT_ALPHA = {
    "sigmoid": 4.0,
    "atan": 2.0,
    "piecewise_quadratic": 1.0,
    "piecewise_exp": 1.0,
    "soft_sign": 2.0,
    "super_spike": 1.0,
    "erf": 2.0,
}

# Surrogates whose derivative has a closed-form primitive usable as a smooth firing
# function (``spiking=False``).
HAS_PRIMITIVE = frozenset(name for name in DEFAULT_ALPHA if name != "super_spike")

# SpikingJelly surrogate class name -> our name (recognised by class name so that
# SpikingJelly need not be importable).
SPIKINGJELLY_CLASS_NAMES = {
    "Sigmoid": "sigmoid",
    "ATan": "atan",
    "PiecewiseQuadratic": "piecewise_quadratic",
    "PiecewiseExp": "piecewise_exp",
    "SoftSign": "soft_sign",
    "SuperSpike": "super_spike",
    "Erf": "erf",
}


def is_constant_alpha(alpha) -> bool:
    """Whether ``alpha`` is a number to the kernels: a Python number, or a one-value tensor
    that needs no gradient (the kernels do not differentiate alpha)."""
    if isinstance(alpha, torch.Tensor):
        return alpha.numel() == 1 and alpha.dim() == 0 and not alpha.requires_grad
    return True


def resolve_surrogate(name: str, alpha) -> tuple[str, float]:
    """Validate a surrogate name and alpha; return ``(name, alpha)`` with the default filled in."""
    if not isinstance(name, str) or name not in DEFAULT_ALPHA:
        raise ValueError(f"surrogate must be one of {sorted(DEFAULT_ALPHA)}, got {name!r}")
    if alpha is None:
        alpha = DEFAULT_ALPHA[name]
    if isinstance(alpha, torch.Tensor):
        if not is_constant_alpha(alpha):
            raise TypeError(
                f"alpha must be a float or a 0-dim tensor that needs no gradient, got a tensor of shape "
                f"{tuple(alpha.shape)} (requires_grad={alpha.requires_grad})"
            )
        if alpha.dtype == torch.bool or alpha.is_complex():
            raise TypeError(f"alpha must be a float, got a tensor of dtype {alpha.dtype}")
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float or None, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite positive number, got {alpha}")
    return name, alpha


def surrogate_derivative(name: str, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """The derivative column of the spec table, as plain torch ops (x = H - V_th)."""
    if name == "sigmoid":
        # alpha s (1 - s) as alpha e / (1 + e)^2 with e = exp(-alpha |x|) (the derivative is even):
        # 1 - s cancels to 0 where alpha x is large, this form does not (the kernels' form too).
        e = torch.exp(-alpha * x.abs())
        return alpha * e / ((1.0 + e) * (1.0 + e))
    if name == "atan":
        return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)
    if name == "piecewise_quadratic":
        return torch.clamp(alpha - alpha * alpha * x.abs(), min=0.0)
    if name == "piecewise_exp":
        return (alpha / 2.0) * torch.exp(-alpha * x.abs())
    if name == "soft_sign":
        return 1.0 / (2.0 * alpha * (1.0 / alpha + x.abs()) ** 2)
    if name == "super_spike":
        return alpha / (1.0 + x.abs()) ** 2
    if name == "erf":
        return (alpha / math.sqrt(math.pi)) * torch.exp(-((alpha * x) ** 2))
    raise ValueError(f"unknown surrogate {name!r}")


def _minus_abs(x: torch.Tensor) -> torch.Tensor:
    """``-abs(x)`` whose autograd derivative at 0 is -1 (the x >= 0 side), not abs's 0."""
    return torch.where(x < 0, x, -x)


def surrogate_primitive(name: str, alpha: float, x: torch.Tensor) -> torch.Tensor:
    """The smooth firing function whose derivative is ``surrogate_derivative``.

    Written so that autograd's derivative is the derivative column everywhere: at x = 0 (where
    abs() would give 0), at +-inf (no branch of a torch.where may have an inf or NaN derivative
    there: the unselected branch's gradient is 0 * that), and without cancellation.
    """
    if name == "sigmoid":
        # 1 / (1 + e) and e / (1 + e) with e = exp(-alpha |x|) <= 1: autograd's derivative is
        # alpha e / (1 + e)^2 without sigmoid's 1 - s, which cancels to 0 where alpha x is large.
        e = torch.exp(alpha * _minus_abs(x))
        return torch.where(x < 0, e / (1.0 + e), 1.0 / (1.0 + e))
    if name == "atan":
        return torch.atan(math.pi / 2.0 * alpha * x) / math.pi + 0.5
    if name == "piecewise_quadratic":
        bound = 1.0 / alpha
        # The clamp keeps the quadratic's derivative finite where it is not selected (x = +-inf).
        inside = torch.clamp(x, -bound, bound)
        inner = -0.5 * alpha * alpha * inside * inside.abs() + alpha * inside + 0.5
        return torch.where(x > bound, torch.ones_like(x), torch.where(x < -bound, torch.zeros_like(x), inner))
    if name == "piecewise_exp":
        e = 0.5 * torch.exp(alpha * _minus_abs(x))
        return torch.where(x < 0, e, 1.0 - e)
    if name == "soft_sign":
        ax = alpha * x
        return 0.5 * (ax / (1.0 + ax.abs()) + 1.0)
    if name == "erf":
        return 0.5 * torch.erfc(-alpha * x)
    raise ValueError(f"surrogate {name!r} has no closed-form primitive, so spiking=False is not available for it")


class _HeavisideWithSurrogate(torch.autograd.Function):
    # setup_context and the generated vmap rule make it work under torch.func (grad, vmap, jacrev).
    generate_vmap_rule = True

    @staticmethod
    def forward(x, name, alpha):
        return (x >= 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.name, ctx.alpha = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * surrogate_derivative(ctx.name, ctx.alpha, x), None, None


class _HeavisideWithSurrogateJvp(_HeavisideWithSurrogate):
    """Adds forward-mode AD: the surrogate is the derivative in both modes."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _HeavisideWithSurrogate.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, x_tangent, name_tangent, alpha_tangent):
        (x,) = ctx.saved_tensors
        return x_tangent * surrogate_derivative(ctx.name, ctx.alpha, x)


def in_functorch_transform() -> bool:
    """True inside a torch.func transform (grad, vmap, jvp, jacrev, jacfwd, hessian, ...)."""
    # isinstance, which Dynamo evaluates correctly (it takes an empty stack's None for "not None").
    return isinstance(torch._C._functorch.peek_interpreter_stack(), torch._C._functorch.CInterpreter)


def heaviside_with_surrogate(x: torch.Tensor, name: str, alpha: float) -> torch.Tensor:
    """The spike ``x >= 0``, differentiated (reverse or forward mode) through the surrogate."""
    if not torch.compiler.is_compiling():
        return _HeavisideWithSurrogateJvp.apply(x, name, alpha)
    # Dynamo cannot trace an autograd.Function with a jvp, and traces one without it into a
    # silently wrong forward-mode derivative.
    if in_functorch_transform() or forward_ad._current_level >= 0:
        raise RuntimeError(
            "plif_cuda: a spiking neuron cannot run under torch.func transforms or forward-mode AD inside "
            "torch.compile (Dynamo cannot trace the spike's forward-mode derivative); apply the transform "
            "outside the compiled region, or use spiking=False"
        )
    return _HeavisideWithSurrogate.apply(x, name, alpha)


class SurrogateFunction:
    """A named surrogate with its alpha, usable by the fused kernels and callable on tensors."""

    name: str = ""

    def __init__(self, alpha: float | None = None, spiking: bool = True):
        self.name, self.alpha = resolve_surrogate(self.name, alpha)
        if not spiking and self.name not in HAS_PRIMITIVE:
            raise ValueError(f"surrogate {self.name!r} has no primitive: spiking=False is not available")
        self.spiking = bool(spiking)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            return heaviside_with_surrogate(x, self.name, self.alpha)
        return surrogate_primitive(self.name, self.alpha, x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, spiking={self.spiking})"


def _surrogate_class(class_name: str, name: str) -> type:
    """The ``SurrogateFunction`` subclass for ``name``, under SpikingJelly's class name."""
    doc = f"The {name!r} surrogate (SpikingJelly's ``{class_name}``), with its alpha and spiking mode."
    return type(class_name, (SurrogateFunction,), {"name": name, "__module__": __name__, "__doc__": doc})


# One class per surrogate, named as SpikingJelly's (SPIKINGJELLY_CLASS_NAMES lists them in this order).
Sigmoid, ATan, PiecewiseQuadratic, PiecewiseExp, SoftSign, SuperSpike, Erf = (
    _surrogate_class(class_name, name) for class_name, name in SPIKINGJELLY_CLASS_NAMES.items()
)


def describe_surrogate(obj) -> tuple[str, float, bool] | None:
    """Return ``(name, alpha, spiking)`` for a surrogate the fused path understands, else None.

    Accepts a name, one of our ``SurrogateFunction`` objects, or a SpikingJelly surrogate
    object (recognised by class name and its ``alpha`` / ``spiking`` attributes) whose alpha is
    a number or a 0-dim tensor that needs no gradient (one that needs a gradient gives None: the
    reference loop then calls the object, and autograd reaches alpha).
    """
    if isinstance(obj, str):
        name, alpha = resolve_surrogate(obj, None)
        return name, alpha, True
    if isinstance(obj, SurrogateFunction):
        return obj.name, obj.alpha, obj.spiking
    name = SPIKINGJELLY_CLASS_NAMES.get(type(obj).__name__)
    module = type(obj).__module__ or ""
    if (
        name is not None
        and module.startswith("spikingjelly")
        and hasattr(obj, "alpha")
        and is_constant_alpha(obj.alpha)
    ):
        name, alpha = resolve_surrogate(name, obj.alpha)
        return name, alpha, bool(getattr(obj, "spiking", True))
    return None
