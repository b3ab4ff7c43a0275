"""The SPEM ops, written once for every kernel backend: spem (SPEM with the block tail) and
spem_bn (BatchNorm, then spem, in one op).

Argument checks, backend choice, autograd and the torch.library registration live here;
a backend only launches kernels (see backends/contract.py for its entry points).

An op runs 54 times per ResNet-164 forward, so the eager call path is built for the least
host time per call. Three call paths per op, one autograd formula per op (`_gradients`,
`_bn_gradients`; the native library repeats their few lines in C++):
- eager, native backend: its differentiable C++ op, autograd included (one dispatch, no
  Python in the backward);
- eager, Triton backend: a plain autograd.Function that calls the backend directly;
- torch.compile: the custom ops ``spem_kernels::spem_forward`` / ``spem_backward`` (and
  ``spem_bn_forward`` / ``spem_bn_backward``) with register_fake and register_autograd, so a
  compiled model has no graph break. A custom op with an autograd formula must not mutate
  its inputs, so spem_bn_forward returns the updated running statistics and spem_bn copies
  them into the buffers (the other paths update them in place, in the kernels).
"""
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from . import backends, export
from .backends.contract import (backward_outputs, bn_backward_outputs, bn_forward_outputs,
                                forward_outputs)
from .reference import spem_bn_reference, spem_reference

_PARAMS = ("w1", "b1", "w2", "b2")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x, params, p, residual, relu, name="x"):
    """Raise a ValueError/TypeError naming the argument, before anything is launched; `name`
    is what the caller calls x."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    N, C, H, W = x.shape
    if H * W == 0:
        raise ValueError(f"{name} must have non-empty planes (H*W > 0), got shape "
                         f"{tuple(x.shape)}")
    for pname, t in zip(_PARAMS + ("p",), params + (p,)):
        _check_param(t, pname, x, name, pair=pname == "p")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError("residual must be a torch.Tensor or None, got "
                            f"{type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have {name}'s shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have {name}'s dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but {name} is on {x.device}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")


def _check_param(t, name, x, x_name, pair=False):
    """A per-channel parameter (C elements) of x, or with `pair` p (2 elements)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    count = 2 if pair else x.shape[1]
    if t.numel() != count:
        raise ValueError(f"{name} must have {count} elements ({2 if pair else 'C'} "
                         f"for {x_name} of shape {tuple(x.shape)}), got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")


def _check_batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps):
    """spem_bn's BatchNorm arguments, as F.batch_norm takes them."""
    C = y.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None:
            _check_param(t, name, y, "y")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError(f"momentum must be a number, got {type(momentum).__name__} (for "
                        "nn.BatchNorm2d's momentum=None, pass its cumulative factor)")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not training and running_mean is None:
        raise ValueError("training=False normalises with the running statistics: "
                         "running_mean and running_var must be given")
    if training and y.numel() // C == 1:  # as F.batch_norm says it
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {y.shape}")


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
    if not _needs_grad(x, w1, b1, w2, b2, p, residual):
        return impl.output(x, w1, b1, w2, b2, p, residual, relu)
    return _SpemFunction.apply(x, w1, b1, w2, b2, p, residual, relu, impl)


def _needs_grad(*tensors):
    """Whether autograd would record the call: grad mode on and an input that wants a
    gradient. Otherwise the op's output alone is computed (no stats, positions or graph)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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


class _KernelFunction(torch.autograd.Function):
    """The eager call path of a backend that wires no autograd of its own (Triton): its
    kernels called directly, one autograd node. One subclass per op, whose forward saves
    what the op's formula reads and names the formula and the backend's backward
    (ctx.gradients, ctx.kernels).

    forward(ctx, ...) rather than a separate setup_context: with the latter, every apply()
    binds its arguments through inspect.signature, about half of this path's Python cost.
    Only `out` is an output: stats and positions stay on ctx, so autograd materialises no
    zero gradients for them."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return ctx.gradients(ctx, grad, ctx.kernels)


class _SpemFunction(_KernelFunction):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p, residual, relu, backend):
        out, stats, idx = backend.forward(x, w1, b1, w2, b2, p, residual, relu)
        _save(ctx, x, w1, b1, w2, b2, p, residual, relu, backend, out, stats, idx)
        ctx.gradients, ctx.kernels = _gradients, backend.backward
        return out


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


# --- spem_bn: BatchNorm, then spem, in one op ---

def spem_bn(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual=None, *,
            training=True, momentum=0.1, eps=1e-5, relu=False, backend="auto"):
    """BatchNorm and fused SPEM in one op: the values, gradients and running-statistics
    update of ``spem(F.batch_norm(y, running_mean, running_var, weight, bias, training,
    momentum, eps), w1, b1, w2, b2, p, residual, relu=relu)``; see SPEM.md, BatchNorm.

    It keeps for the backward what BatchNorm alone keeps (y, the per-channel mean and
    inverse standard deviation) and per-plane statistics, not the normalised tensor.
    y: as spem's x. running_mean, running_var: C elements each, or None (batch statistics,
    nothing updated); updated in place in training. weight, bias: C elements, or None.
    training=False normalises with the running statistics. momentum: a number
    (nn.BatchNorm2d's momentum=None is a cumulative factor its caller works out).
    """
    _check(y, (w1, b1, w2, b2), p, residual, relu, name="y")
    _check_batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    args = (y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual)
    options = (training, float(momentum), float(eps), relu)
    if torch.compiler.is_compiling():
        if export.onnx_exporting():  # an ONNX graph holds standard operators only
            return export.spem_bn(*args, training=training, momentum=momentum, eps=eps,
                                  relu=relu)
        name = _backend_name(backend, y.device)
        if name == "eager":
            return spem_bn_reference(*args, training=training, momentum=momentum, eps=eps,
                                     relu=relu)
        out, *_, new_mean, new_var = spem_bn_forward(*args, *options, name)
        if training and running_mean is not None:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        return out
    impl = backends.resolve(backend, y.device)
    if impl.NAME == "eager":
        return spem_bn_reference(*args, training=training, momentum=momentum, eps=eps,
                                 relu=relu)
    if impl.bn_differentiable is not None:
        return impl.bn_differentiable(*args, *options)
    if not _needs_grad(y, weight, bias, w1, b1, w2, b2, p, residual):
        return impl.bn_output(*args, *options)
    return _SpemBnFunction.apply(*args, *options, impl)


def _bn_save(ctx, y, weight, bias, w1, b1, w2, b2, p, residual, training, relu, backend,
             out, stats, idx, mean, invstd):
    # y, not the normalised tensor: the backward normalises again from mean and invstd.
    ctx.save_for_backward(y, out if relu else None, stats, idx, mean, invstd, weight, bias,
                          w1, b1, w2, b2, p)
    ctx.training, ctx.relu, ctx.backend = training, relu, backend
    ctx.has_residual = residual is not None
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _bn_gradients(ctx, grad, backward_kernels):
    """spem_bn's autograd formula, shared by both call paths (as _gradients for spem), in
    the order of spem_bn_forward's inputs."""
    y, out, stats, idx, mean, invstd, weight, bias, w1, b1, w2, b2, p = ctx.saved_tensors
    dy, dres, dweight, dbias, dw1, db1, dw2, db2, dp = backward_kernels(
        grad, y, out if ctx.relu else y, stats, idx, mean, invstd, weight, bias, w1, b1, w2,
        b2, p, ctx.training, ctx.relu, ctx.has_residual and ctx.relu)
    if not ctx.has_residual:
        dres = None
    elif not ctx.relu:
        dres = grad
    return (dy, None, None, dweight if ctx.has_weight else None,
            dbias if ctx.has_bias else None, dw1, db1, dw2, db2, dp, dres,
            None, None, None, None, None)


class _SpemBnFunction(_KernelFunction):
    """spem_bn's: the kernels update the running statistics in place."""

    @staticmethod
    def forward(ctx, y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                training, momentum, eps, relu, backend):
        out, stats, idx, mean, invstd = backend.bn_forward(
            y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual, training,
            momentum, eps, relu)
        if training and running_mean is not None:  # written in place by a kernel
            increment_version(running_mean)
            increment_version(running_var)
        _bn_save(ctx, y, weight, bias, w1, b1, w2, b2, p, residual, training, relu, backend,
                 out, stats, idx, mean, invstd)
        ctx.gradients, ctx.kernels = _bn_gradients, backend.bn_backward
        return out


@torch.library.custom_op("spem_kernels::spem_bn_forward", mutates_args=())
def spem_bn_forward(y: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], w1: Tensor, b1: Tensor,
                    w2: Tensor, b2: Tensor, p: Tensor, residual: Optional[Tensor],
                    training: bool, momentum: float, eps: float, relu: bool, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, stats, idx, mean, invstd, new running_mean, new running_var): functional, as an
    op with an autograd formula must be; the running statistics come back updated (empty
    tensors when there are none to update) and spem_bn copies them into the buffers."""
    updates = training and running_mean is not None
    new_mean = running_mean.clone() if updates else y.new_empty(0)
    new_var = running_var.clone() if updates else y.new_empty(0)
    outputs = backends.load(backend).bn_forward(
        y, new_mean if updates else running_mean, new_var if updates else running_var, weight,
        bias, w1, b1, w2, b2, p, residual, training, momentum, eps, relu)
    return (*outputs, new_mean, new_var)


@spem_bn_forward.register_fake
def _(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual, training,
      momentum, eps, relu, backend):
    updates = training and running_mean is not None
    return (*bn_forward_outputs(y),
            *((torch.empty_like(running_mean), torch.empty_like(running_var)) if updates
              else (y.new_empty(0), y.new_empty(0))))


@torch.library.custom_op("spem_kernels::spem_bn_backward", mutates_args=())
def spem_bn_backward(grad: Tensor, y: Tensor, out: Tensor, stats: Tensor, idx: Tensor,
                     mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                     p: Tensor, training: bool, relu: bool, write_dres: bool, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                Tensor]:
    """(dy, dresidual or empty, dweight, dbias, dw1, db1, dw2, db2, dp)."""
    return backends.load(backend).bn_backward(grad, y, out, stats, idx, mean, invstd, weight,
                                              bias, w1, b1, w2, b2, p, training, relu,
                                              write_dres)


@spem_bn_backward.register_fake
def _(grad, y, out, stats, idx, mean, invstd, weight, bias, w1, b1, w2, b2, p, training, relu,
      write_dres, backend):
    return bn_backward_outputs(y, write_dres, weight, bias, (w1, b1, w2, b2, p))


def _bn_setup_context(ctx, inputs, output):
    (y, _, _, weight, bias, w1, b1, w2, b2, p, residual, training, _, _, relu,
     backend) = inputs
    out, stats, idx, mean, invstd, new_mean, new_var = output
    _bn_save(ctx, y, weight, bias, w1, b1, w2, b2, p, residual, training, relu, backend, out,
             stats, idx, mean, invstd)
    ctx.mark_non_differentiable(stats, idx, mean, invstd, new_mean, new_var)


def _bn_compiled_backward(ctx, grad, *_non_differentiable):
    return _bn_gradients(ctx, grad, lambda *args: spem_bn_backward(*args, ctx.backend))


torch.library.register_autograd("spem_kernels::spem_bn_forward", _bn_compiled_backward,
                                setup_context=_bn_setup_context)
