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


def relu_boundary_zeroed(grad_out, pre, residual, size=None, dtype=None):
    """grad_out with zeros where the ReLU's mask is uncertain: where `pre`, the float64
    pre-activation (g x + residual), moved by RELU_BOUNDARY_ULPS float32 ulps of `size` (the
    size of its terms; default |g x| + |residual|) either way, would be masked differently,
    so that both sides apply the same mask. `dtype`: the output's, whose rounding the fused
    mask reads for 16-bit outputs (SPEM.md, Backward); None: float32."""
    res = residual.double() if residual is not None else torch.zeros_like(pre)
    if size is None:
        size = (pre - res).abs() + res.abs()
    err = RELU_BOUNDARY_ULPS * torch.finfo(torch.float32).eps * size
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    off = [(v.to(dtype) <= 0) for v in (pre - err, pre + err)]
    return grad_out.clone().masked_fill_(off[0] != off[1], 0)  # in grad_out's layout


# The smallest and the relative rounding of float32 arithmetic, which spem's sizes below are in.
F32 = torch.finfo(torch.float32)


@torch.no_grad()
def plane_term_sizes(x, w1, b1, w2, b2, p, G, x_size=None, finfo=F32):
    """Per plane (N, C), in float64, the size that rounding each of SPEM's per-plane values is
    relative to (SPEM.md, Backward): a dict of the gate "g", "dM", "dm" (the extremes' terms
    of dx) and the five "partials" (dw1, db1, dw2, db2, dq0 - dq1 before the sums). A size is
    the value's formula over the absolute values of its terms, with S = sum |G| |x| over the
    plane, and two things that rounding adds:
    - a sigmoid s of u carries u's absolute error into its own relative error
      (d ln s / du = 1 - s): it is sized s (1 + |u| (1 - s)), |u| from u's terms, so a gate
      of large |A + B| or |Z| is allowed its few-ulps-of-u error; 1 - s is sized
      1 - s + s kappa, the rounding of s, not of the small difference;
    - an exponential that underflows (float32 sigmoids below ~1e-38 are 0, float64's are
      not) leaves an absolute error of finfo.tiny: each s is floored at tiny / eps.
    x: the values SPEM gates, G: the gradient reaching g x (masked by the ReLU), x_size: the
    size of x's values where x itself carries rounding (spem_bn's normalised values; default
    |x|), finfo: the compute dtype's. Non-finite sizes (infinite inputs) come out as inf."""
    x, w1, b1, w2, b2, p, G = (t.double() for t in (x, w1, b1, w2, b2, p, G))
    x_size = x.abs() if x_size is None else x_size.double()
    C = x.shape[1]
    w1, b1, w2, b2 = (t.reshape(1, C) for t in (w1, b1, w2, b2))
    aw1, ab1, aw2, ab2 = (t.abs() for t in (w1, b1, w2, b2))
    M, m = x.amax((2, 3)), x.amin((2, 3))
    ext_size = x_size.amax((2, 3))  # of M and of m
    S = (G.abs() * x_size).sum((2, 3))
    P = p.square().sum()
    q0, q1 = p.square() / P
    A, B = w2 * M + b2, w2 * m + b2
    AB_size = aw2 * ext_size + ab2  # of A and of B
    s1 = torch.sigmoid(A + B)
    s2 = torch.sigmoid(w1 * (q0 * A + q1 * B) + b1)
    kappa1, kappa2 = 1 + 2 * AB_size * (1 - s1), 1 + (aw1 * AB_size + ab1) * (1 - s2)
    floor = finfo.tiny / finfo.eps
    g = (s1 * kappa1 + floor) * (s2 * kappa2 + floor)
    dZ = S * g * (1 - s2 + s2 * kappa2)
    dU = S * g * (1 - s1 + s1 * kappa1)
    dA, dB = dU + dZ * aw1 * q0, dU + dZ * aw1 * q1
    partials = [dZ * AB_size, dZ, (dA + dB) * ext_size, dA + dB,
                2 * dZ * aw1 * aw2 * ext_size]
    sizes = {"g": g, "dM": dA * aw2, "dm": dB * aw2, "partials": partials}
    return {k: (v.nan_to_num(nan=float("inf")) if k != "partials" else
                [t.nan_to_num(nan=float("inf")) for t in v]) for k, v in sizes.items()}


@torch.no_grad()
def param_grad_scales(x, w1, b1, w2, b2, p, G, x_size=None, finfo=F32):
    """For each SPEM parameter (w1, b1, w2, b2, p), the size that rounding its gradient is
    relative to, in float64: the sum over n of plane_term_sizes' partials (for p, over n and
    c: 2 |p_i| q_other D / P from D's size). Where a parameter gradient's terms cancel, its
    float32 error stays ~1e-7 of this size, a far larger share of the result (p's gradient
    at ImageNet planes, a sum over c of terms of either sign)."""
    partials = plane_term_sizes(x, w1, b1, w2, b2, p, G, x_size, finfo)["partials"]
    p = p.double()
    P = p.square().sum()
    q0, q1 = p.square() / P
    D = partials[4].sum()
    return [t.sum(0) for t in partials[:4]] + [2 * p.abs() * torch.stack([q1, q0]) * D / P]


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
    """The fused spem_bn `op` (called as spem_bn is, without a backend) against its float64
    composition: output, dy and dresidual within grad_tol relative (out_tol for the output);
    running statistics within STATS_TOL; parameter gradients (SPEM's and BatchNorm's) within
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
    G = relu_masked(grad_out, ref) if relu else grad_out.double()
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
