"""The SPEM op, written once for every kernel backend.

Argument checks, backend choice, autograd and the torch.library registration live here;
a backend only launches kernels (see backends/contract.py for its entry points).

The op runs 54 times per ResNet-164 forward, so the eager call path is built for the least
host time per call. Three call paths, one autograd formula (`_gradients`; the native
library repeats its few lines in C++):
- eager, native backend: its differentiable C++ op, autograd included (one dispatch, no
  Python in the backward);
- eager, Triton backend: a plain autograd.Function that calls the backend directly;
- torch.compile: the custom ops ``spem_kernels::spem_forward`` / ``spem_backward`` with
  register_fake and register_autograd, so a compiled model has no graph break.
"""
from typing import Optional

import torch
from torch import Tensor

from . import backends, export
from .backends.contract import backward_outputs, forward_outputs
from .reference import spem_reference

_PARAMS = ("w1", "b1", "w2", "b2")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x, params, p, residual, relu):
    """Raise a ValueError/TypeError naming the argument, before anything is launched."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    N, C, H, W = x.shape
    if H * W == 0:
        raise ValueError(f"x must have non-empty planes (H*W > 0), got shape {tuple(x.shape)}")
    for name, t, count in zip(_PARAMS + ("p",), params + (p,), (C, C, C, C, 2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.numel() != count:
            raise ValueError(f"{name} must have {count} elements ({'C' if count == C else 2} "
                             f"for x of shape {tuple(x.shape)}), got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")


def spem(x, w1, b1, w2, b2, p, residual=None, *, relu=False, backend="auto"):
    """Fused SPEM: ``relu?(g * x + residual)`` with one gate g per (n, c); see SPEM.md.

    x: (N, C, H, W) float32/float16/bfloat16 (float64 for gradcheck), any memory format.
    w1, b1, w2, b2: C elements each; p: 2 elements; residual: None or x's shape and dtype.
    backend: "auto", "triton", "native" or "eager". Returns x's shape, dtype and format.
    """
    _check(x, (w1, b1, w2, b2), p, residual, relu)
    if torch.compiler.is_compiling():
        if export.onnx_exporting():  # an ONNX graph holds standard operators only
            return export.spem(x, w1, b1, w2, b2, p, residual, relu)
        name = _backend_name(backend, x.device)
        if name == "eager":
            return spem_reference(x, w1, b1, w2, b2, p, residual, relu=relu)
        return spem_forward(x, w1, b1, w2, b2, p, residual, relu, name)[0]
    impl = backends.resolve(backend, x.device)
    if impl.NAME == "eager":
        return spem_reference(x, w1, b1, w2, b2, p, residual, relu=relu)
    if impl.differentiable is not None:  # autograd wired in the backend itself (native: C++)
        return impl.differentiable(x, w1, b1, w2, b2, p, residual, relu)
    return _SpemFunction.apply(x, w1, b1, w2, b2, p, residual, relu, impl)


def _backend_name(backend, device):
    """The name of the backend that runs a call on `device`. torch.compile calls this while
    tracing and keeps the result as a constant: the first resolution may build or load the
    native library (files, hashes, a lock), which tracing cannot follow."""
    return backends.resolve(backend, device).NAME


# What torch.compiler.assume_constant_result sets; calling it would import torch._dynamo
# (over a second) with spem_kernels. tests/test_op.py checks that tracing honours it.
_backend_name._dynamo_marked_constant = True


def _save(ctx, x, w1, b1, w2, b2, p, residual, relu, backend, out, stats, idx):
    # The ReLU mask is read off the output: no full-size mask is kept.
    ctx.save_for_backward(x, out if relu else None, stats, idx, w1, b1, w2, b2, p)
    ctx.relu, ctx.backend, ctx.has_residual = relu, backend, residual is not None


def _gradients(ctx, grad, backward_kernels):
    """The autograd formula, shared by both call paths: the backend's backward already gives
    every gradient in its final shape and dtype; only the residual's needs choosing."""
    x, out, stats, idx, w1, b1, w2, b2, p = ctx.saved_tensors
    dx, dres, dw1, db1, dw2, db2, dp = backward_kernels(
        grad, x, out if ctx.relu else x, stats, idx, w1, b1, w2, b2, p, ctx.relu,
        ctx.has_residual and ctx.relu)
    if not ctx.has_residual:
        dres = None
    elif not ctx.relu:
        dres = grad  # without the ReLU the residual's gradient is dL/dout itself
    return dx, dw1, db1, dw2, db2, dp, dres, None, None


class _SpemFunction(torch.autograd.Function):
    """The eager call path of a backend that wires no autograd of its own (Triton): its
    kernels called directly, one autograd node.

    forward(ctx, ...) rather than a separate setup_context: with the latter, every apply()
    binds its arguments through inspect.signature, about half of this path's Python cost.
    Only `out` is an output: stats and positions stay on ctx, so autograd materialises no
    zero gradients for them."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p, residual, relu, backend):
        out, stats, idx = backend.forward(x, w1, b1, w2, b2, p, residual, relu)
        _save(ctx, x, w1, b1, w2, b2, p, residual, relu, backend, out, stats, idx)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _gradients(ctx, grad, ctx.backend.backward)


# --- torch.library registration (the torch.compile path; opcheck tests it) ---

@torch.library.custom_op("spem_kernels::spem_forward", mutates_args=())
def spem_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: Tensor,
                 residual: Optional[Tensor], relu: bool, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(out, stats, idx): the output, per-plane [max, min] and their positions."""
    return backends.load(backend).forward(x, w1, b1, w2, b2, p, residual, relu)


@spem_forward.register_fake
def _(x, w1, b1, w2, b2, p, residual, relu, backend):
    return forward_outputs(x)


@torch.library.custom_op("spem_kernels::spem_backward", mutates_args=())
def spem_backward(grad: Tensor, x: Tensor, out: Tensor, stats: Tensor, idx: Tensor,
                  w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: Tensor,
                  relu: bool, write_dres: bool, backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual or empty, dw1, db1, dw2, db2, dp)."""
    return backends.load(backend).backward(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu,
                                           write_dres)


@spem_backward.register_fake
def _(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres, backend):
    return backward_outputs(x, write_dres, (w1, b1, w2, b2, p))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, p, residual, relu, backend = inputs  # here `backend` is its name
    out, stats, idx = output
    _save(ctx, x, w1, b1, w2, b2, p, residual, relu, backend, out, stats, idx)
    ctx.mark_non_differentiable(stats, idx)


def _compiled_backward(ctx, grad, _grad_stats, _grad_idx):
    return _gradients(ctx, grad, lambda *args: spem_backward(*args, ctx.backend))


torch.library.register_autograd("spem_kernels::spem_forward", _compiled_backward,
                                setup_context=_setup_context)
