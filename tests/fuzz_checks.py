"""What the fuzz tests (test_fuzz.py) expect of a path, in one place: the float64 reference of
an example (output, every gradient, the running statistics), the size that each value's
rounding is relative to, and the rules a path's result is held to.

The rules (SPEM.md states the semantics; these are how a result is compared with them):
- NaN where the reference is NaN, and nowhere else (SPEM.md, Ties and NaN);
- an infinity where the reference, rounded to the result's dtype, is one (the same sign),
  and nowhere else: a float16 output may overflow to inf where the float64 value is past
  float16's range (within the tolerance of that threshold either way is accepted);
- elsewhere |got - want| <= TOL[compute dtype] * size + the rounding of the result's dtype
  (half an ulp of want, and its smallest subnormal), where `size` is the value's formula
  over the absolute values of its terms (op_checks.plane_term_sizes): float32 arithmetic
  errs by a few ulps of that, not of a result that cancels. Where a size is infinite (an
  infinite input among the terms) the finite value is not bounded, only its pattern of
  NaN and infinities checked;
- ties: the max (min) term of dx goes to the first position of a tie. For spem the
  reference's first position is the only one accepted (x is exact in every dtype). For
  spem_bn, whose normalised values the kernels form in float32, a value within rounding of
  the plane's max (min) may be taken for it: each such value is accepted, but only at the
  first position of its equal inputs (ties of y are ties of x on every path); where a
  plane has several such values the term may be at any of them, so each may be off by the
  size of the term (and so may the channel's sums that take it: dy, dweight);
- the ReLU's mask as SPEM.md states it: the reference masks on its output rounded to the
  output's dtype, and grad_out is zeroed where rounding could flip the mask
  (op_checks.relu_boundary_zeroed), so both sides apply the same one.
Magnitudes are drawn so that float32 does not overflow where float64 does not
(fuzz_cases.large); past that, SPEM.md's "computed in float32" is the rule.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from op_checks import (leaves, param_grad_scales, plane_term_sizes, relu_boundary_zeroed,
                       relu_masked)
from spem_kernels import spem_reference
from spem_kernels.backends.contract import compute_dtype

# Relative to the sizes, by compute dtype: a float32 sum over a plane of up to 3000 terms in
# 16 lanes errs by ~1e-6 of its terms' size, seen up to ~5e-6 with the gate's exp and the
# chain rule after it; float64 (gradcheck's dtype) as many ulps.
TOL = {torch.float32: 3e-5, torch.float64: 1e-12}
# Near-ties of spem_bn's normalised values: within this many ulps of their size.
NEAR_TIE_ULPS = 16


@dataclass
class Expected:
    """The reference's values and sizes: out (value, size), grads {input name: (value, size,
    slack)} (inputs that are None are left out; slack: what a value may be off by beyond
    rounding, see the near-ties above), running ((value, size) each, or None), and the
    grad_out that the paths get (zeroed on the ReLU boundary)."""
    out: tuple
    grads: dict
    running: tuple
    grad_out: torch.Tensor
    compute: torch.dtype


def _as64(t):
    """t in float64 as the reference computes on it: dense (see reference_grad)."""
    return t.double().contiguous() if t is not None else None


def _masked_grad(grad_out, pre, residual, size, dtype, relu):
    """(the grad_out the paths get, G in float64): grad_out zeroed where the ReLU's mask is
    uncertain, and G masked as the fused ops mask it, on the output rounded to its dtype."""
    if not relu:
        return grad_out, reference_grad(grad_out.double())
    zeroed = relu_boundary_zeroed(grad_out.double(), pre, residual, size, dtype)
    uncertain = (zeroed == 0) & (grad_out != 0)
    if uncertain.any():  # (a dense copy: an expanded grad_out cannot hold the zeros)
        grad_out = grad_out.masked_fill(uncertain, 0)
    stored = pre.to(dtype) if dtype in (torch.float16, torch.bfloat16) else pre
    with torch.no_grad():
        return grad_out, reference_grad(relu_masked(grad_out, stored))


def reference_grad(G):
    """G as the reference's backward gets it: dense, as its inputs (_as64). torch 2.13's CPU
    batch_norm backward in eval misreads a tensor strided like channels_last beside an NCHW
    one, input or gradient (shape (1, 2, 1, 2), strides (2, 1, 4, 2): dy 10% off). The
    paths get every tensor in its drawn layout."""
    return G.contiguous()


def _first_of_equal(key, candidates):
    """candidates (P, L) restricted to the first position of each value of key (P, L) within
    its row."""
    rows = torch.arange(key.shape[0]).unsqueeze(1).expand_as(key).double()
    _, inverse = torch.unique(torch.stack([rows.reshape(-1), key.reshape(-1)]), dim=1,
                              return_inverse=True)
    position = torch.arange(key.shape[1]).expand_as(key).reshape(-1)
    first = torch.full((int(inverse.max()) + 1,), key.shape[1]).scatter_reduce(
        0, inverse, position, "amin")
    return candidates & (position == first[inverse]).reshape(key.shape)


def extreme_positions(x, key=None, slack=None):
    """Masks (N, C, H, W) of where each plane's max and min may be: the first position of the
    max (min) of x; with `slack` (per element), any value within slack of it, at the first
    position of its value of `key`."""
    v = x.flatten(2)
    masks = []
    for sign in (1, -1):
        s = sign * v
        top = s.amax(2, keepdim=True)
        if slack is None:
            near = s == top
            k = v
        else:
            d = slack.flatten(2).amax(2, keepdim=True)
            near = s >= top - 2 * d
            k = key.flatten(2).double()
        N, C, L = near.shape
        masks.append(_first_of_equal(k.reshape(N * C, L), near.reshape(N * C, L))
                     .reshape(x.shape))
    return masks


@torch.no_grad()
def p_gradient(x, w1, b1, w2, b2, p, G):
    """p's gradient in float64 as SPEM.md forms it: from D = sum over (n, c) of
    dZ w1 w2 (M - m), the difference dq0 - dq1 taken per plane. Autograd of the eager
    reference takes dq0 and dq1 apart: where they are infinite (an infinite gradient
    reaching the output) it gives NaN for inf - inf, where D, and the gradient, are
    infinite; elsewhere the two agree to rounding."""
    x, w1, b1, w2, b2, p, G = (t.double() for t in (x, w1, b1, w2, b2, p, G))
    C = x.shape[1]
    w1, b1, w2, b2 = (t.reshape(1, C) for t in (w1, b1, w2, b2))
    M, m = x.amax((2, 3)), x.amin((2, 3))
    P = p.square().sum()
    q0, q1 = p.square() / P
    A, B = w2 * M + b2, w2 * m + b2
    s1, s2 = torch.sigmoid(A + B), torch.sigmoid(w1 * (q0 * A + q1 * B) + b1)
    dZ = (G * x).sum((2, 3)) * s1 * s2 * (1 - s2)
    D = (dZ * w1 * w2 * (M - m)).sum()
    s = 2 * D / (P * P)
    return torch.stack([s * p[0] * p[1].square(), -s * p[1] * p[0].square()])


def _plane(t):
    return t[:, :, None, None]


def _input_grad_size(G, sizes, at_max, at_min):
    """The size of dx = G g + dM at the max + dm at the min."""
    return (G.abs() * _plane(sizes["g"]) + _at(at_max, sizes["dM"])
            + _at(at_min, sizes["dm"]))


def _at(mask, plane_value):
    """plane_value (N, C) where mask (N, C, H, W), else 0 (an infinite size stays there)."""
    return torch.where(mask, _plane(plane_value), 0.0)


def _spem_grads(x, params, residual, G, **scale_args):
    """SPEM's parameters' and the residual's gradients (leaves' .grad, p's from p_gradient)
    with their error scales, given G = dL/d(pre-ReLU output) and the input x of the gate."""
    param_grads = [leaf.grad for leaf in params[:4]] + [p_gradient(x, *params, G)]
    scales = param_grad_scales(x, *params, G, **scale_args)
    grads = {name: (grad, scale.reshape(leaf.shape), 0) for name, leaf, grad, scale
             in zip(("w1", "b1", "w2", "b2", "p"), params, param_grads, scales)}
    if residual is not None:
        grads["residual"] = (residual.grad, G.abs(), 0)
    return grads


def spem_expected(tensors, grad_out, relu):
    x, w1, b1, w2, b2, p, res = tensors
    compute = compute_dtype(x.dtype)
    t = leaves([_as64(v) for v in tensors])
    x64, res64 = t[0].detach(), _as64(res)
    sizes = plane_term_sizes(x64, *t[1:6], grad_out, finfo=torch.finfo(compute))
    res_size = res64.abs() if res is not None else 0
    out_size = _plane(sizes["g"]) * x64.abs() + res_size
    pre = spem_reference(*t[:6], t[6], relu=False)
    grad_out, G = _masked_grad(grad_out, pre.detach(), res64, out_size, x.dtype, relu)
    pre.backward(G)
    at_max, at_min = extreme_positions(x64)
    grads = {"x": (t[0].grad, _input_grad_size(G, sizes, at_max, at_min), 0)}
    grads.update(_spem_grads(x64, t[1:6], t[6], G, finfo=torch.finfo(compute)))
    out = torch.relu(pre) if relu else pre
    return Expected((out.detach(), out_size), grads, None, grad_out, compute)


def spem_bn_expected(tensors, grad_out, training, momentum, eps, relu):
    y, rm, rv, weight, bias, w1, b1, w2, b2, p, res = tensors
    compute = compute_dtype(y.dtype)
    finfo = torch.finfo(compute)
    y64, rm64, rv64 = _as64(y), _as64(rm), _as64(rv)
    t = leaves([y64, *map(_as64, (weight, bias, w1, b1, w2, b2, p, res))])
    new_rm, new_rv = (rm64.clone(), rv64.clone()) if rm is not None else (None, None)
    x = F.batch_norm(t[0], new_rm, new_rv, t[1], t[2], training, momentum, eps)
    x.retain_grad()
    if training or rm is None:
        mean, var = y64.mean((0, 2, 3)), y64.var((0, 2, 3), unbiased=False)
    else:
        mean, var = rm64, rv64
    mean, var = mean.reshape(1, -1, 1, 1), var.reshape(1, -1, 1, 1)
    invstd = (var + eps).rsqrt()
    alpha = invstd * (_as64(weight).reshape(1, -1, 1, 1) if weight is not None else 1)
    bias_size = _as64(bias).abs().reshape(1, -1, 1, 1) if bias is not None else 0
    # x = alpha (y - mean) + bias in float32: the rounding of y alpha + beta, of mean, and of
    # invstd (relative error ~ eps (1 + |mean| / std): deviations from a rounded mean).
    cond = 1 + mean.abs() * invstd
    dev_size = y64.abs() + mean.abs()
    x_size = alpha.abs() * (dev_size + (y64 - mean).abs() * cond) + bias_size
    xd = x.detach()
    sizes = plane_term_sizes(xd, *t[3:8], grad_out, x_size=x_size, finfo=finfo)
    res_size = t[8].detach().abs() if res is not None else 0
    out_size = _plane(sizes["g"]) * x_size + res_size
    pre = spem_reference(x, *t[3:8], t[8], relu=False)
    grad_out, G = _masked_grad(grad_out, pre.detach(), _as64(res), out_size, y.dtype, relu)
    pre.backward(G)
    at_max, at_min = extreme_positions(xd, y64, NEAR_TIE_ULPS * finfo.eps * x_size)
    dx_size = _input_grad_size(G, sizes, at_max, at_min)
    # Planes whose max (min) may be at several positions: the term may be at any of them.
    several = [(at.flatten(2).sum(2) > 1)[:, :, None, None] for at in (at_max, at_min)]
    dx_slack = _at(at_max & several[0], sizes["dM"]) + _at(at_min & several[1], sizes["dm"])
    count = y.numel() // y.shape[1]

    def channel_sum(t):
        return t.sum((0, 2, 3), keepdim=True)

    if training:
        k2 = channel_sum(dx_size) / count
        k3 = invstd.square() * channel_sum(dx_size * dev_size) / count
        k3_slack = invstd.square() * channel_sum(dx_slack * dev_size) / count
    else:
        k2 = k3 = k3_slack = 0
    dy_size = alpha.abs() * (dx_size + k2 + dev_size * k3) * cond
    dy_slack = alpha.abs() * (dx_slack + dev_size * k3_slack)
    grads = {"y": (t[0].grad, dy_size, dy_slack)}
    bn_sizes = ((invstd * channel_sum(dx_size * dev_size) * cond,
                 invstd * channel_sum(dx_slack * dev_size)), (channel_sum(dx_size), 0))
    for name, leaf, (size, slack) in zip(("weight", "bias"), t[1:3], bn_sizes):
        if leaf is not None:
            grads[name] = (leaf.grad, size.reshape(leaf.shape),
                           slack.reshape(leaf.shape) if torch.is_tensor(slack) else 0)
    grads.update(_spem_grads(xd, t[3:8], t[8], G, x_size=x_size, finfo=finfo))
    running = None
    if training and rm is not None:
        mean_size = y64.abs().mean((0, 2, 3))
        var_size = (var + mean.square()).reshape(-1) * count / max(count - 1, 1)
        running = ((new_rm, (1 - momentum) * rm64.abs() + momentum * mean_size),
                   (new_rv, (1 - momentum) * rv64.abs() + momentum * var_size))
    out = torch.relu(pre) if relu else pre
    return Expected((out.detach(), out_size), grads, running, grad_out, compute)


def mismatches(got, want, size, tol, slack=0, rounding=1):
    """A description of where `got` breaks the rules against `want` (float64), its `size`
    and `slack` (module docstring), or None. rounding: the rounding of a 16-bit `got` in
    half ulps (a path's)."""
    a, e = got.detach().double(), want.detach().double()
    size = torch.as_tensor(size, dtype=torch.float64).expand_as(e)
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    finfo = torch.finfo(got.dtype)
    stored = e.to(got.dtype).double()  # want rounded to got's dtype: inf past its range
    half_ulps = rounding if got.dtype in (torch.float16, torch.bfloat16) else 1
    allowed = (tol * size + slack + half_ulps * finfo.eps / 2 * e.abs()
               + finfo.smallest_normal * finfo.eps).nan_to_num(nan=float("inf"))
    near_overflow = (e.abs() - finfo.max).abs() <= allowed
    bad = a.isnan() != e.isnan()
    inf = ~e.isnan() & (a.isinf() | stored.isinf())
    bad |= inf & (a != stored) & ~near_overflow
    finite = a.isfinite() & stored.isfinite()
    bad |= finite & ((a - e).abs() > allowed)
    if not bad.any():
        return None
    where = bad.nonzero()[:4].tolist()
    detail = "; ".join(f"at {tuple(i)}: got {a[tuple(i)].item():.9g}, want "
                       f"{e[tuple(i)].item():.9g} (size {size[tuple(i)].item():.3g})"
                       for i in where)
    return f"{int(bad.sum())} of {bad.numel()} wrong, {detail}"


def failures(result, expected, rounding=1):
    """Every rule the path's Result breaks, as lines (empty: none); rounding: the path's."""
    tol = TOL[expected.compute]
    lines = []
    checks = [("out", result.out, *expected.out, 0)]
    if result.grads is not None:
        for name, (want, size, slack) in expected.grads.items():
            got = result.grads[name]
            if got is None:
                lines.append(f"d{name}: none returned")
                continue
            checks.append((f"d{name}", got, want, size, slack))
        extra = {n for n, g in result.grads.items() if g is not None} - set(expected.grads)
        lines += [f"d{n}: returned for an input that is None" for n in sorted(extra)]
    if expected.running is not None:
        for name, got, (want, size) in zip(("running_mean", "running_var"), result.running,
                                           expected.running):
            checks.append((name, got, want, size, 0))
    for name, got, want, size, slack in checks:
        problem = mismatches(got, want, size, tol, slack, rounding)
        if problem:
            lines.append(f"{name} ({got.dtype}): {problem}")
    return lines
