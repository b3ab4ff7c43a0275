"""How the op matrices (test_op: spem; test_spem_bn: spem_bn) compare a fused op with its
eager reference: errors in float64, the inputs as leaves in their own layout, the ReLU
boundary, and the size that a parameter gradient's rounding is relative to.

A helper module, not a test file: test files import it; it imports torch and the reference.
"""
import torch

from spem_kernels import spem_reference

# Parameter gradients of float32 math (16-bit inputs included: their products are exact in
# float32) against the size of their terms: each term carries the rounding of a dozen float32
# operations (the gate's exp and sigmoids, the chain rule), up to ~1e-6 of it seen where a
# sum has few terms (1x1 planes), ~1e-8 where it has many (ImageNet planes).
PARAM_TOL = 1e-5
# Where the pre-activation g*x + residual lies within float32 rounding of 0, the fused ReLU
# mask (from the float32 output) and the reference's (float64) may disagree: one flipped
# element moves dx and dresidual by ~3e-4 relative at batch 128, and ~2e-8 of the elements
# are that close. The gate alone carries a few float32 ulps of error (exp, sigmoid); 32 ulps
# of the terms' size leaves margin and zeroes ~10 elements of 8M.
RELU_BOUNDARY_ULPS = 32


def rel_err(actual, expected):
    """||actual - expected|| / ||expected||, in float64. Inputs and output gradients are O(1)
    here, so a norm under 1e-2 is a cancellation (p's gradient on 1x1 planes, where max = min,
    is exactly 0): there the floor 1e-2 turns the ratio into an absolute error."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-2)).item()


def leaves(tensors):
    """The tensors themselves as autograd leaves (None stays None), in their own layout:
    detach() keeps a strided view's strides, where clone() would hand the op a dense copy
    and leave the view untested."""
    out = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    for leaf, t in zip(out, tensors):
        assert leaf is None or leaf.stride() == t.stride()
    return out


def relu_boundary_zeroed(grad_out, pre, residual):
    """grad_out with zeros where `pre`, the float64 pre-activation (g x + residual), is within
    RELU_BOUNDARY_ULPS float32 ulps of 0, so that both sides apply the same ReLU mask."""
    res = residual.double() if residual is not None else torch.zeros_like(pre)
    scale = (pre - res).abs() + res.abs()
    near = pre.abs() <= RELU_BOUNDARY_ULPS * torch.finfo(torch.float32).eps * scale
    return grad_out.masked_fill(near, 0)


def param_grad_scales(x, w1, b1, w2, b2, p, G):
    """For each SPEM parameter (w1, b1, w2, b2, p), the size that rounding its gradient is
    relative to, in float64: the sum over (n, c) of the absolute values of the gradient's
    terms (SPEM.md, Backward), with S taken as the sum of |G x| over the plane. x: the
    values SPEM gates; G: the gradient reaching g x (masked by the ReLU). A parameter
    gradient is a sum of such terms, over n (and c, for p) and over the plane inside S; where
    they cancel, its float32 error stays ~1e-7 of this size, a far larger share of the
    result (p's gradient at ImageNet planes, a sum over c of terms of either sign)."""
    x, w1, b1, w2, b2, p, G = (t.double() for t in (x, w1, b1, w2, b2, p, G))
    C = x.shape[1]
    w1, b1, w2, b2 = (t.reshape(1, C) for t in (w1, b1, w2, b2))
    S = (G * x).abs().sum((2, 3))
    M, m = x.amax((2, 3)), x.amin((2, 3))
    P = p.square().sum()
    q0, q1 = p.square() / P
    A, B = w2 * M + b2, w2 * m + b2
    s1, s2 = torch.sigmoid(A + B), torch.sigmoid(w1 * (q0 * A + q1 * B) + b1)
    dZ = S * s1 * s2 * (1 - s2)
    dU = S * s1 * s2 * (1 - s1)
    dA, dB = dU + dZ * (w1 * q0).abs(), dU + dZ * (w1 * q1).abs()
    D = (dZ * (w1 * w2 * (M - m)).abs()).sum()
    return [(dZ * (q0 * A + q1 * B).abs()).sum(0), dZ.sum(0),
            (dA * M.abs() + dB * m.abs()).sum(0), (dA + dB).sum(0),
            2 * p.abs() * torch.stack([q1, q0]) * D / P]


def scaled_err(actual, expected, scale):
    """||actual - expected|| / ||scale||, in float64 (scale: the size of the terms). Where
    every term is 0 (p's gradient on 1x1 planes, where max = min), the floor 1e-6 turns the
    ratio into an absolute error (the reference's own float64 rounding leaves ~1e-15 there)."""
    diff = actual.double().reshape(-1) - expected.double().reshape(-1)
    return (diff.norm() / scale.double().reshape(-1).norm().clamp_min(1e-6)).item()


def relu_masked(grad_out, out):
    """grad_out through a ReLU whose output is `out`, in float64, as torch's ReLU backward
    takes it (SPEM.md): 0 where out <= 0, grad_out elsewhere (NaN outputs included)."""
    return grad_out.double().masked_fill(out <= 0, 0)


def spem_masked_grad(inputs, grad_out, relu):
    """G of spem's backward in float64 (grad_out masked by the reference's output)."""
    x, *params, residual = [t.double() if t is not None else None for t in inputs]
    if not relu:
        return grad_out.double()
    return relu_masked(grad_out, spem_reference(x, *params, residual, relu=True))
