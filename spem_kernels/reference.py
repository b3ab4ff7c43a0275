"""The eager SPEM references, written op by op the way the original layer was.

These are the yardsticks every fast path is tested against, and the "eager" backend:
spem_reference for spem, spem_bn_reference (BatchNorm, then spem_reference) for spem_bn.
Max and min come from max-pooling (the min as -maxpool(-x)), so autograd sends the
max (min) gradient to the first position in row-major (h, w) order, and a NaN
anywhere in a plane makes that plane's max, gate and output NaN.
"""
import torch
import torch.nn.functional as F

NAME = "eager"  # as a backend (backends.load("eager")): autograd differentiates it


def is_available(device):
    return None


def spem_reference(x, w1, b1, w2, b2, p, residual=None, *, relu=False, backend="eager"):
    """Eager SPEM: ``relu?(g * x + residual)`` with ``g`` one gate per (n, c); see SPEM.md."""
    C = x.shape[1]
    w1, b1, w2, b2 = (t.reshape(1, C, 1, 1) for t in (w1, b1, w2, b2))
    y_max = F.adaptive_max_pool2d(x, 1)
    y_min = -F.adaptive_max_pool2d(-x, 1)
    a = w2 * y_max + b2
    b = w2 * y_min + b2
    p2 = p * p
    q = p2 / p2.sum()
    z = w1 * (q[0] * a + q[1] * b) + b1
    gate = torch.sigmoid(a + b) * torch.sigmoid(z)
    out = gate * x
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    # The gate is float32 (the parameters' dtype) for 16-bit x: the tail runs in float32
    # and rounds once, as the fused kernels do.
    return out.to(x.dtype)


def spem_bn_reference(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                      residual=None, *, training=True, momentum=0.1, eps=1e-5, relu=False,
                      backend="eager"):
    """Eager BatchNorm then SPEM: what spem_bn computes, op by op (SPEM.md, BatchNorm)."""
    x = F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    return spem_reference(x, w1, b1, w2, b2, p, residual, relu=relu)
