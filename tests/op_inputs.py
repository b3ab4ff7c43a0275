"""Inputs of the op for the tests that check it (test_op, test_host_cost): fresh random
values in any memory layout, a strided view included, and both parameter shapes.

A helper module, not a test file: test files import it; it imports only torch.
(spem_kernels.cases builds the benchmarks' inputs: dense layouts, one parameter shape.)
"""
import torch


def layout(t, kind):
    """t in the memory layout `kind`, with the same values."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":  # a non-contiguous view into a larger buffer
        N, C, H, W = t.shape
        big = torch.empty(N, 2 * C, H + 1, W + 2, dtype=t.dtype, device=t.device)
        view = big[:, ::2, 1:, 1:-1]
        view.copy_(t)
        return view
    return t.contiguous()


def make_inputs(shape, dtype, device, kind="contiguous", residual=True):
    """x, w1, b1, w2, b2, p, residual: x and residual in `dtype`, parameters in float32
    (float64 when dtype is float64), all fresh random. `kind`: a layout() kind for both, or
    "mixed": x a strided view and the residual channels_last (a kernel must address each
    tensor through its own strides)."""
    C = shape[1]
    x_kind, res_kind = ("sliced", "channels_last") if kind == "mixed" else (kind, kind)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = layout(torch.randn(shape, device=device).to(dtype), x_kind)
    params = [0.5 * torch.randn(C, device=device, dtype=pdtype) for _ in range(4)]
    params[0] = params[0].reshape(1, C, 1, 1)  # both parameter shapes are accepted
    p = torch.randn(2, device=device, dtype=pdtype)
    res = layout(torch.randn(shape, device=device).to(dtype), res_kind) if residual else None
    return [x, *params, p, res]


def make_bn_inputs(shape, dtype, device, kind="contiguous", residual=True, affine=True,
                   track=True):
    """spem_bn's inputs: y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
    residual. y as make_inputs' x but off-centre and scaled (BatchNorm has work to do);
    BatchNorm's tensors in the parameters' dtype: running statistics (None without `track`)
    and weight, bias (None without `affine`; the weight of either sign, so that some channels
    swap max and min), all fresh random."""
    x, *params, res = make_inputs(shape, dtype, device, kind, residual)
    C = shape[1]
    pdtype = params[0].dtype
    y = x.mul_(1.5).add_(0.25)  # in place: keeps make_inputs' layout (a view stays a view)

    def channel(low, high):
        return torch.empty(C, device=device, dtype=pdtype).uniform_(low, high)

    running = (channel(-0.5, 0.5), channel(0.5, 2.0)) if track else (None, None)
    weight_bias = (channel(-1.5, 1.5), channel(-0.5, 0.5)) if affine else (None, None)
    return [y, *running, *weight_bias, *params, res]
