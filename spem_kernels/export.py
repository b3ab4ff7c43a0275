"""Deployment: each fused custom op written in standard tensor operations, for exporters
that cannot call the op (ONNX), and the switch that makes ONNX export record them.

torch.export keeps a fused op as the custom op it is (``spem_kernels::spem_forward``,
``spem_kernels::spem_bn_forward``): an exported program, AOTInductor included, runs the
fused kernel where spem_kernels is imported. An ONNX graph can only hold standard operators,
so under ``torch.onnx.export(..., dynamo=True)`` the ops' entry points (ops.spem,
ops.spem_bn) record their compositions below instead: BatchNormalization for spem_bn, then
ReduceMax / ReduceMin over the plane, the gate, Mul / Add / Relu. A program already exported
with the custom ops in it gets the same compositions from ``decompositions()`` through
``ExportedProgram.run_decompositions``.

Compositions compute what the kernels compute (SPEM.md), in forward only: the gate and the
tail in float32 for 16-bit x (float64 for float64 x), one rounding to x's dtype at the end.
Each returns the custom op's outputs, so it can stand in for the op anywhere.
"""
import torch
import torch.nn.functional as F

from .backends.contract import compute_dtype


def spem(x, w1, b1, w2, b2, p, residual=None, relu=False):
    """The op's output ``relu?(g * x + residual)`` in standard ops: what an ONNX graph holds."""
    y_max, y_min = _extremes(x)
    return _tail(x, y_max, y_min, w1, b1, w2, b2, p, residual, relu)


def spem_forward(x, w1, b1, w2, b2, p, residual, relu, backend):
    """``spem_kernels::spem_forward`` in standard ops: (out, stats, idx) as the kernels give
    them (backends/contract.py), the last two being what a backward would need. `backend` is
    the op's argument, unused here."""
    y_max, y_min = _extremes(x)
    out = _tail(x, y_max, y_min, w1, b1, w2, b2, p, residual, relu)
    return (out, *_stats_and_positions(x, y_max, y_min))


def spem_bn(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual=None,
            training=False, momentum=0.1, eps=1e-5, relu=False):
    """spem_bn's output in standard ops: BatchNorm (ONNX BatchNormalization), then SPEM, in
    the compute dtype (float32 for 16-bit y, as the kernels), one rounding to y's dtype."""
    dtype = compute_dtype(y.dtype)
    stats = [_cast(t, dtype) if t is not None else None for t in (running_mean, running_var)]
    x = F.batch_norm(_cast(y, dtype), *stats, *(_cast(t, dtype) if t is not None else None
                                                 for t in (weight, bias)),
                     training, momentum, eps)
    for buffer, updated in zip((running_mean, running_var), stats):
        if training and buffer is not None and updated is not buffer:  # batch_norm updated a copy
            buffer.copy_(updated)
    y_max, y_min = _extremes(x)
    return _cast(_tail(x, y_max, y_min, w1, b1, w2, b2, p, residual, relu), y.dtype)


def spem_bn_forward(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                    training, momentum, eps, relu, backend):
    """``spem_kernels::spem_bn_forward`` in standard ops: (out, stats, idx, mean, invstd,
    new running_mean, new running_var) as ops.spem_bn_forward gives them."""
    C, dtype = y.shape[1], compute_dtype(y.dtype)
    yc = _cast(y, dtype)
    if training:
        mean, var = yc.mean((0, 2, 3)), yc.var((0, 2, 3), unbiased=False)
    else:
        mean, var = _cast(running_mean, dtype), _cast(running_var, dtype)
    invstd = torch.rsqrt(var + eps)
    alpha = invstd if weight is None else invstd * _cast(weight, dtype)
    beta = -mean * alpha if bias is None else _cast(bias, dtype) - mean * alpha
    x = yc * _channel(alpha, C) + _channel(beta, C)
    y_max, y_min = _extremes(x)
    out = _cast(_tail(x, y_max, y_min, w1, b1, w2, b2, p, residual, relu), y.dtype)
    if training and running_mean is not None:
        count = y.numel() // C
        new_mean = ((1 - momentum) * running_mean + momentum * mean).to(running_mean.dtype)
        new_var = ((1 - momentum) * running_var
                   + momentum * var * count / (count - 1)).to(running_var.dtype)
    else:
        new_mean, new_var = y.new_empty(0), y.new_empty(0)
    return (out, *_stats_and_positions(x, y_max, y_min), mean, invstd, new_mean, new_var)


def _stats_and_positions(x, y_max, y_min):
    """(stats, idx) as the kernels save them: per plane [max, min] and the first row-major
    positions of each (argmax/argmin take the first of a tie)."""
    stats = torch.cat((y_max, y_min), 3).flatten(2)
    plane = x.flatten(2)
    return stats, torch.stack((plane.argmax(2), plane.argmin(2)), 2).to(torch.int32)


def _extremes(x):
    """Per-plane max and min, (N, C, 1, 1) in the compute dtype. They are exact in any dtype:
    x is reduced as it is, and only the results are cast."""
    dtype = compute_dtype(x.dtype)
    return _cast(x.amax((2, 3), keepdim=True), dtype), _cast(x.amin((2, 3), keepdim=True), dtype)


def _cast(t, dtype):
    """t in dtype. A cast to t's own dtype is still a node in a traced graph (two, with its
    metadata check): ten per layer add up over ResNet-164's 54 layers at export time."""
    return t if t.dtype == dtype else t.to(dtype)


def _channel(t, C):
    """A per-channel parameter shaped (1, C, 1, 1), the way a SPEM layer keeps it."""
    return t if t.shape == (1, C, 1, 1) else t.reshape(1, C, 1, 1)


def _tail(x, y_max, y_min, w1, b1, w2, b2, p, residual, relu):
    """The gate from the extremes (SPEM.md, Forward) and relu?(g * x + residual), rounded
    once to x's dtype."""
    C, dtype = x.shape[1], y_max.dtype
    w1, b1, w2, b2 = (_cast(_channel(t, C), dtype) for t in (w1, b1, w2, b2))
    a = w2 * y_max + b2
    b = w2 * y_min + b2
    p2 = _cast(p, dtype).square()
    q = p2 / p2.sum()
    z = w1 * (q[0] * a + q[1] * b) + b1
    gate = torch.sigmoid(a + b) * torch.sigmoid(z)
    out = gate * _cast(x, dtype)
    if residual is not None:
        out = out + _cast(residual, dtype)
    if relu:
        out = torch.relu(out)
    return _cast(out, x.dtype)


# Every fused custom op, by qualified name, and its composition: what decompositions() gives
# run_decompositions. A new op of the family is one more entry (and the same two-line
# onnx_exporting() branch in its entry point).
COMPOSITIONS = {"spem_kernels::spem_forward": spem_forward,
                "spem_kernels::spem_bn_forward": spem_bn_forward}


def onnx_exporting():
    """True while torch.onnx.export traces a model: an entry point then records its op's
    composition. Only torch.onnx.export sets the flag, and Dynamo folds
    ``is_in_onnx_export()`` to False: torch.export and torch.compile keep the fused op.
    (Entry points ask only while tracing: the eager call path never pays for it.)"""
    return torch.onnx.is_in_onnx_export()


def decompositions():
    """{OpOverload: composition} of every fused op, for a program exported with the ops in
    it: ``torch.onnx.export(ep.run_decompositions(spem_kernels.export.decompositions()))``."""
    table = {}
    for name, fn in COMPOSITIONS.items():
        namespace, op = name.split("::")
        table[getattr(getattr(torch.ops, namespace), op).default] = fn
    return table
