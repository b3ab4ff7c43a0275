"""How the op matrices (test_op: spem; test_spem_bn: spem_bn; test_cuda_emulated: both, on
the emulated CUDA kernels) compare a fused op with its eager reference: errors in float64,
the inputs as leaves in their own layout, the ReLU boundary, and the size that a parameter
gradient's rounding is relative to. `check_against_reference` (spem) and
`check_against_composition` (spem_bn) take the fused op as a callable.

A helper module, not a test file: test files import it; it imports torch and the reference.
"""
import torch
import torch.nn.functional as F

from spem_kernels import spem_reference

# spem_bn's BatchNorm arguments in the matrices.
MOMENTUM, EPS = 0.1, 1e-5
# Running statistics: Triton passes momentum as an fp32 argument (1e-8 of it off in float64).
STATS_TOL = 1e-6

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


def random_like(x):
    """Fresh standard normal values of x's dtype in x's memory layout (channels_last stays
    channels_last: a backward then reads its gradient the way a model's would reach it, and
    the kernels' vector paths over channels run)."""
    return torch.randn_like(x, dtype=torch.float32).to(x.dtype)


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
    return grad_out.clone().masked_fill_(near, 0)  # in grad_out's layout


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


def spem_masked_grad(inputs, grad_out, relu):
    """G of spem's backward in float64 (grad_out masked where the reference's output is 0)."""
    x, *params, residual = [t.double() if t is not None else None for t in inputs]
    if not relu:
        return grad_out.double()
    return grad_out.double() * (spem_reference(x, *params, residual, relu=True) > 0)


def run(fn, inputs, relu, grad_out, **kw):
    """Output and gradients of every tensor input that is not None (leaves)."""
    tensors = leaves(inputs)
    out = fn(*tensors[:6], tensors[6], relu=relu, **kw)
    out.backward(grad_out)
    return out, [t.grad for t in tensors if t is not None]


def grad_off_relu_boundary(grad_out, inputs, relu):
    """grad_out with zeros on the ReLU boundary (relu_boundary_zeroed)."""
    if not relu:
        return grad_out
    x, *params, residual = [t.double() if t is not None else None for t in inputs]
    return relu_boundary_zeroed(grad_out, spem_reference(x, *params, residual), residual)


def param_scales(inputs, grad_out, relu):
    """param_grad_scales of spem's parameters for these inputs."""
    return param_grad_scales(*inputs[:6], spem_masked_grad(inputs, grad_out, relu))


def check_against_reference(inputs, relu, op, out_tol, grad_tol, param_tol=None):
    """The fused `op` (called as spem is, without a backend) against the float64 reference:
    output, dx and dresidual within grad_tol relative; parameter gradients within param_tol
    (default grad_tol) of the size of their terms (param_grad_scales)."""
    x = inputs[0]
    grad_out = grad_off_relu_boundary(random_like(x), inputs, relu)
    out, grads = run(op, inputs, relu, grad_out)
    ref_inputs = [t.double() if t is not None else None for t in inputs]
    ref, ref_grads = run(spem_reference, ref_inputs, relu, grad_out.double())
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) <= out_tol
    for name, g, rg in zip(["x", "residual"], grads[::6], ref_grads[::6]):
        assert g.shape == rg.shape, name
        assert rel_err(g, rg) <= grad_tol, name
    scales = param_scales(inputs, grad_out, relu)
    for name, g, rg, scale in zip(["w1", "b1", "w2", "b2", "p"], grads[1:6], ref_grads[1:6],
                                  scales):
        assert g.shape == rg.shape, name
        assert scaled_err(g, rg, scale) <= (param_tol or grad_tol), name
    return out


def clone(t):
    return t.clone() if t is not None else None


def as64(t):
    return t.double() if t is not None else None


def bn_grad_scales(x, y, mean, var, eps):
    """The size that rounding dbias and dweight is relative to: sums over (n, h, w) of |dx|
    and |dx xhat| (x: the normalised tensor of the float64 reference, its grad dx)."""
    xhat = (y - mean.reshape(1, -1, 1, 1)) / (var.reshape(1, -1, 1, 1) + eps).sqrt()
    return x.grad.abs().sum((0, 2, 3)), (x.grad * xhat).abs().sum((0, 2, 3))


def run_fused(op, inputs, grad_out, training, relu, eps=EPS):
    """(out, grads of y, weight, bias, w1, b1, w2, b2, p, residual, running statistics) of
    the fused `op` (called as spem_bn is, without a backend)."""
    y, rm, rv, weight, bias, *params, residual = inputs
    rm, rv = clone(rm), clone(rv)
    t = leaves([y, weight, bias, *params, residual])
    out = op(t[0], rm, rv, t[1], t[2], *t[3:8], t[8], training=training, momentum=MOMENTUM,
             eps=eps, relu=relu)
    out.backward(grad_out)
    return out, [leaf.grad if leaf is not None else None for leaf in t], (rm, rv)


def run_reference(inputs, grad_out, training, relu, eps=EPS):
    """As run_fused for the float64 composition, with the normalised tensor x (and its grad)."""
    y, rm, rv, weight, bias, *params, residual = map(as64, inputs)
    rm, rv = clone(rm), clone(rv)
    t = leaves([y, weight, bias, *params, residual])
    x = F.batch_norm(t[0], rm, rv, t[1], t[2], training, MOMENTUM, eps)
    x.retain_grad()
    out = spem_reference(x, *t[3:8], t[8], relu=relu)
    out.backward(grad_out.double())
    return out, [leaf.grad if leaf is not None else None for leaf in t], (rm, rv), x


def off_relu_boundary(grad_out, inputs, training, relu, eps):
    """grad_out with zeros on the ReLU boundary of the float64 composition."""
    if not relu:
        return grad_out
    y, rm, rv, weight, bias, *params, residual = map(as64, inputs)
    with torch.no_grad():
        x = F.batch_norm(y, clone(rm), clone(rv), weight, bias, training, MOMENTUM, eps)
        return relu_boundary_zeroed(grad_out, spem_reference(x, *params, residual), residual)


def check_against_composition(inputs, training, relu, op, out_tol, grad_tol, eps=EPS):
    """The fused spem_bn `op` against its float64 composition. Output, dy and dresidual within grad_tol relative (out_tol for the output); running
    statistics within STATS_TOL; parameter gradients (SPEM's and BatchNorm's) within
    PARAM_TOL of the size of their terms, and in their parameter's dtype."""
    y = inputs[0]
    grad_out = off_relu_boundary(random_like(y), inputs, training, relu, eps)
    out, grads, stats = run_fused(op, inputs, grad_out, training, relu, eps)
    ref, ref_grads, ref_stats, x = run_reference(inputs, grad_out, training, relu, eps)
    assert out.dtype == y.dtype and out.shape == y.shape
    assert rel_err(out, ref) <= out_tol
    assert rel_err(grads[0], ref_grads[0]) <= grad_tol, "y"
    if grads[8] is not None:
        assert rel_err(grads[8], ref_grads[8]) <= grad_tol, "residual"
    for name, s, rs in zip(("running_mean", "running_var"), stats, ref_stats):
        if s is not None:
            assert rel_err(s, rs) <= STATS_TOL, name
    G = grad_out.double() * (ref > 0) if relu else grad_out.double()
    y64 = y.double()
    if training:
        mean, var = y64.mean((0, 2, 3)), y64.var((0, 2, 3), unbiased=False)
    else:
        mean, var = as64(inputs[1]), as64(inputs[2])
    scales = [*bn_grad_scales(x, y64, mean, var, eps),
              *param_grad_scales(x.detach(), *map(as64, inputs[5:10]), G)]
    for name, param, g, rg, scale in zip(["weight", "bias", "w1", "b1", "w2", "b2", "p"],
                                         inputs[3:10], grads[1:8], ref_grads[1:8], scales):
        if param is None:
            assert g is None, name
            continue
        assert g.shape == param.shape and g.dtype == param.dtype, name
        assert scaled_err(g, rg, scale) <= PARAM_TOL, name
    return out
