"""The contract every kernel backend keeps: its entry points and what they return.

Backends (triton_backend, native_backend and the C++ library it loads) import this module;
the registry (backends/__init__.py), ops.py and the fake (torch.compile) registrations use
its allocations, so one definition of every output's shape, dtype and layout serves all.

Every kernel backend is a module with NAME and the same entry points, for each of the two
ops of the family: spem (SPEM with the block tail) and spem_bn (BatchNorm, then spem):

    is_available(device) -> str | None      None when it runs on `device`, else the reason
    differentiable(x, w1, b1, w2, b2, p, residual, relu) -> out, or None
                                            the whole op with its autograd, where the backend
                                            wires it itself (else ops.py does)
    forward(x, w1, b1, w2, b2, p, residual, relu) -> (out, stats, idx)
    output(x, w1, b1, w2, b2, p, residual, relu) -> out
                                            the forward when no backward follows (grad
                                            mode off, or nothing wants a gradient): only
                                            the output allocated and written
    backward(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres)
        -> (dx, dres, dw1, db1, dw2, db2, dp)
    bn_differentiable(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                      residual, training, momentum, eps, relu) -> out, or None
    bn_forward(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
               training, momentum, eps, relu) -> (out, stats, idx, mean, invstd)
    bn_output(the same arguments) -> out    (as output is forward's)
    bn_backward(grad, y, out, stats, idx, mean, invstd, weight, bias, w1, b1, w2, b2, p,
                training, relu, write_dres)
        -> (dy, dres, dweight, dbias, dw1, db1, dw2, db2, dp)

Parameters arrive as the caller passed them (C elements each, 2 for p, any shape and float
dtype); `stats` is (N, C, 2) [max, min] in the compute dtype, `idx` is (N, C, 2) int32
[argmax, argmin] as row-major h*W + w. Backward returns every gradient in its final form:
dx like x; `dres` the masked gradient G when `write_dres`, else an empty tensor; each
parameter's gradient with that parameter's shape and dtype, p's included (formed on the
device from dq0 - dq1 = dZ w1 w2 (M - m) summed over (n, c), computed directly rather than
as a difference of two large sums; see SPEM.md). A backward is at most two kernel launches
and moves no data between host and device, so a training step captures in a CUDA graph.

spem_bn's max and min (`stats`) are those of the normalised values x = y * alpha + beta
(alpha = weight * invstd, beta = bias - mean * alpha per channel). `mean` and `invstd` (C,
compute dtype) are what normalised y: the batch's statistics in training (biased variance),
the running ones otherwise; in training the running statistics, when given, are updated in
place (unbiased variance, `momentum`). Its backward gives dweight and dbias in weight's and
bias's shape and dtype, or (C,) in the compute dtype where they are None. A forward is at
most three launches (statistics, per-channel finalisation, the fused pass), a backward too
(a reduction pass, the parameter gradients, the writing pass). The "eager" backend is the
reference itself and needs none of this: autograd differentiates it.
"""
import torch


def compute_dtype(dtype):
    """Kernels compute in float64 for float64 inputs (gradcheck) and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward_outputs(x):
    """Uninitialised (out, stats, idx) as every backend's forward returns them; the fake
    (torch.compile) registrations use the same shapes, strides and dtypes."""
    N, C = x.shape[:2]
    return (torch.empty_like(x), x.new_empty((N, C, 2), dtype=compute_dtype(x.dtype)),
            x.new_empty((N, C, 2), dtype=torch.int32))


def backward_outputs(x, write_dres, params):
    """Uninitialised (dx, dres or an empty tensor, dw1, db1, dw2, db2, dp) as every backend's
    backward returns them; `params` are (w1, b1, w2, b2, p). Parameter gradients are
    contiguous, in their parameter's shape and dtype."""
    return (torch.empty_like(x), torch.empty_like(x) if write_dres else x.new_empty(0),
            *(t.new_empty(t.shape) for t in params))


def bn_forward_outputs(y):
    """Uninitialised (out, stats, idx, mean, invstd) of spem_bn's forward."""
    channel = y.new_empty((y.shape[1],), dtype=compute_dtype(y.dtype))
    return (*forward_outputs(y), channel, torch.empty_like(channel))


def bn_backward_outputs(y, write_dres, weight, bias, params):
    """Uninitialised (dy, dres or empty, dweight, dbias, dw1, db1, dw2, db2, dp) of spem_bn's
    backward; `params` are (w1, b1, w2, b2, p)."""
    dy, dres, *param_grads = backward_outputs(y, write_dres, params)
    channel = y.new_empty((y.shape[1],), dtype=compute_dtype(y.dtype))
    return (dy, dres, *(t.new_empty(t.shape) if t is not None else torch.empty_like(channel)
                        for t in (weight, bias)), *param_grads)
