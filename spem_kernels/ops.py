"""The SPEM op, written once for every kernel backend.

Argument checks, backend choice, autograd and the torch.library registration live here;
a backend only launches kernels (see backends/__init__.py for its two entry points).

Two call paths share one autograd formula:
- eager: a plain autograd.Function that calls the backend directly. The op runs 54 times
  per ResNet-164 forward, so it skips the dispatcher's per-call cost.
- torch.compile: the custom ops ``spem_kernels::spem_forward`` / ``spem_backward`` with
  register_fake and register_autograd, so a compiled model has no graph break.
"""
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends import backward_outputs, forward_outputs
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
    name = backends.resolve(backend, x.device)
    if name == "eager":
        return spem_reference(x, w1, b1, w2, b2, p, residual, relu=relu)
    if torch.compiler.is_compiling():
        return spem_forward(x, w1, b1, w2, b2, p, residual, relu, name)[0]
    return _SpemFunction.apply(x, w1, b1, w2, b2, p, residual, relu, name)[0]


def _flat(*params):
    return [t.reshape(-1) for t in params]


def _forward(x, w1, b1, w2, b2, p, residual, relu, backend):
    return backends.load(backend).forward(x, *_flat(w1, b1, w2, b2, p), residual, relu)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, p, residual, relu, backend = inputs
    out, stats, idx = output
    # The ReLU mask is read off the output: no full-size mask is kept.
    ctx.save_for_backward(x, out if relu else None, stats, idx, w1, b1, w2, b2, p)
    ctx.relu, ctx.backend, ctx.has_residual = relu, backend, residual is not None
    ctx.mark_non_differentiable(stats, idx)


def _make_backward(backward_impl):
    """The autograd formula; `backward_impl` runs the kernels (directly, or as a custom op)."""

    def backward(ctx, grad, _grad_stats=None, _grad_idx=None):
        x, out, stats, idx, w1, b1, w2, b2, p = ctx.saved_tensors
        write_dres = ctx.has_residual and ctx.relu
        dx, dres, dparams = backward_impl(
            grad, x, out if ctx.relu else x, stats, idx, *_flat(w1, b1, w2, b2, p),
            ctx.relu, write_dres, ctx.backend)
        if ctx.has_residual and not ctx.relu:
            dres = grad  # without the ReLU the residual's gradient is dL/dout itself
        elif not ctx.has_residual:
            dres = None
        # p: with P = p0^2 + p1^2 and q_i = p_i^2 / P, dp_i = 2 p_i / P (dq_i - q0 dq0 - q1 dq1),
        # which is dp0 = 2 p0 q1 (dq0 - dq1) / P and dp1 = -2 p1 q0 (dq0 - dq1) / P.
        pc = p.reshape(-1).to(dparams.dtype)
        p2 = pc * pc
        P = p2.sum()
        dq_diff = dparams[:, 4].sum()
        dp = 2 * pc * p2.flip(0) / (P * P) * dq_diff * pc.new_tensor([1.0, -1.0])
        grads = [dparams[:, k].reshape(t.shape).to(t.dtype)
                 for k, t in enumerate((w1, b1, w2, b2))]
        return (dx, *grads, dp.reshape(p.shape).to(p.dtype), dres, None, None)

    return backward


def _backward_direct(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres, backend):
    return backends.load(backend).backward(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu,
                                           write_dres)


class _SpemFunction(torch.autograd.Function):
    # forward(ctx, ...) rather than a separate setup_context: with the latter, every apply()
    # binds its arguments through inspect.signature, about half of this path's Python cost.
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p, residual, relu, backend):
        output = _forward(x, w1, b1, w2, b2, p, residual, relu, backend)
        _setup_context(ctx, (x, w1, b1, w2, b2, p, residual, relu, backend), output)
        return output

    backward = staticmethod(torch.autograd.function.once_differentiable(
        _make_backward(_backward_direct)))


# --- torch.library registration (the torch.compile path; opcheck tests it) ---

@torch.library.custom_op("spem_kernels::spem_forward", mutates_args=())
def spem_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: Tensor,
                 residual: Optional[Tensor], relu: bool, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(out, stats, idx): the output, per-plane [max, min] and their positions."""
    return _forward(x, w1, b1, w2, b2, p, residual, relu, backend)


@spem_forward.register_fake
def _(x, w1, b1, w2, b2, p, residual, relu, backend):
    return forward_outputs(x)


@torch.library.custom_op("spem_kernels::spem_backward", mutates_args=())
def spem_backward(grad: Tensor, x: Tensor, out: Tensor, stats: Tensor, idx: Tensor,
                  w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: Tensor,
                  relu: bool, write_dres: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dresidual or empty, dparams (C, 5))."""
    return _backward_direct(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres,
                            backend)


@spem_backward.register_fake
def _(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres, backend):
    return backward_outputs(x, write_dres)


torch.library.register_autograd("spem_kernels::spem_forward", _make_backward(spem_backward),
                                setup_context=_setup_context)
