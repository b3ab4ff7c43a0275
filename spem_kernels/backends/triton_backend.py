"""Triton backend: the launches of the kernels in triton_kernels.py and the entry points of
backends/contract.py. spem: one kernel forward, two backward; spem_bn: three each way.

Every launch is described once, by a *_launch function that returns (grid, args, meta)
(scripts/triton_aot.py compiles the same launches for sm_80/sm_90), and made through a
_Launcher, which calls Triton's compiled kernel directly after the first launch.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from . import triton_kernels as k
from .contract import (backward_outputs, bn_backward_outputs, bn_forward_outputs,
                       compute_dtype, forward_outputs)

NAME = "triton"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def is_available(device):
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before importing spem_kernels (it is slow; for tests)")
    return f"Triton does not run on {device.type} tensors"


# Elements per program tile: NCHW planes share a program up to _TILE elements; a plane (or
# a channels_last channel block) up to _ONE_PASS_TILE stays in registers for one pass
# (16 warps, 16 elements a thread: no spills on sm_80/sm_90, see scripts/triton_aot.py);
# larger planes loop over _TILE-element chunks (the second pass then mostly hits L2).
_TILE = 4096
_ONE_PASS_TILE = 8192


def _tiling(x):
    """(BLOCK_C, BLOCK_HW, ONE_PASS, num_warps) for x's plane size and memory format."""
    C, H, W = x.shape[1:]
    plane = triton.next_power_of_2(H * W)
    if x.stride(1) == 1 and C > 1:
        # channels_last: channels are the contiguous axis; 32 bytes of them fill a sector,
        # 16 bytes (a 16-bit 32x32 plane) still load 16 bytes a thread and keep one pass.
        block_c = 32 // x.element_size()
        while block_c > 1 and block_c * plane > _ONE_PASS_TILE:
            block_c //= 2
    else:
        block_c = max(1, _TILE // plane)
    block_c = min(block_c, triton.next_power_of_2(C))
    one_pass = block_c * plane <= _ONE_PASS_TILE
    block_hw = plane if one_pass else max(16, _TILE // block_c)
    num_warps = min(16, max(2, block_c * block_hw // 512))
    return block_c, block_hw, one_pass, num_warps


def _wide(*tensors):
    """Whether an offset within one sample of a tensor may reach 2**31 (int32 would wrap):
    the WIDE constexpr, which forms those offsets in int64."""
    return any(sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
               >= 2**31 for t in tensors)


def _planes_are_flat(*tensors):
    """Whether every tensor's planes are evenly spaced rows (h stride = W * w stride): then a
    kernel addresses position hw as hw * w stride, with no division (the FLAT constexpr)."""
    return all(t.stride(2) == t.shape[3] * t.stride(3) or t.shape[2] == 1 for t in tensors)


def _bn_meta(bn):
    """The forward kernel's BatchNorm constexprs: bn is None (spem) or
    (mean, invstd, weight, bias) (spem_bn)."""
    if bn is None:
        return dict(NORM=False, HAS_WEIGHT=False, HAS_BIAS=False)
    return dict(NORM=True, HAS_WEIGHT=bn[2] is not None, HAS_BIAS=bn[3] is not None)


def _bn_pointers(bn, dummy):
    """mean, invstd, weight, bias (a tensor of the call for what is absent: never read)."""
    return tuple(t if t is not None else dummy for t in (bn or (None,) * 4))


def fwd_launch(x, residual, out, w1, b1, w2, b2, p, stats, idx, relu, bn=None):
    """(grid, args, meta) of the forward kernel for these tensors; bn: see _bn_meta. stats
    and idx None: the output alone (no backward follows)."""
    save = stats is not None
    stats, idx = (stats, idx) if save else (out, out)
    N, C, H, W = x.shape
    block_c, block_hw, one_pass, num_warps = _tiling(x)
    num_c_blocks = triton.cdiv(C, block_c)
    res = residual if residual is not None else x
    args = (x, res, out, w1, b1, w2, b2, p, stats, idx, *_bn_pointers(bn, stats), C, W, H * W,
            num_c_blocks, *x.stride(), *res.stride(), *out.stride())
    meta = dict(HAS_RES=residual is not None, RELU=relu, ACC=_TL_DTYPE[compute_dtype(x.dtype)],
                FLAT=_planes_are_flat(x, res, out), WIDE=_wide(x, res, out), ONE_PASS=one_pass,
                BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps, SAVE=save,
                **_bn_meta(bn))
    return (N * num_c_blocks,), args, meta


def bwd_launch(grad, x, out, dx, dres, w1, b1, w2, b2, p, stats, idx, part, relu, write_dres):
    """(grid, args, meta) of the backward kernel for these tensors."""
    N, C, H, W = x.shape
    block_c, block_hw, one_pass, num_warps = _tiling(x)
    num_c_blocks = triton.cdiv(C, block_c)
    o = out if relu else x
    dr = dres if write_dres else dx  # dres_ptr is written only with WRITE_DRES
    args = (grad, x, o, dx, dr, w1, b1, w2, b2, p, stats, idx, part, C, W, H * W, N * C,
            num_c_blocks, *grad.stride(), *x.stride(), *o.stride(), *dx.stride(), *dr.stride())
    meta = dict(RELU=relu, WRITE_DRES=write_dres, ACC=_TL_DTYPE[compute_dtype(x.dtype)],
                FLAT=_planes_are_flat(grad, x, o, dx, dr), WIDE=_wide(grad, x, o, dx, dr),
                ONE_PASS=one_pass, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)
    return (N * num_c_blocks,), args, meta


# The reductions' tile: BLOCK_C channels of BLOCK_N samples per step.
_GRADS_BLOCK_N, _GRADS_BLOCK_C = 64, 32


def grads_launch(part, p, dw1, db1, dw2, db2, dp, bn=None):
    """(grid, args, meta) of the parameter-gradient reduction over the partials (K, N, C);
    bn: None (spem), or (invstd, dweight, dbias, coef, count, training) (spem_bn)."""
    N, C = part.shape[1:]
    num_c_blocks = triton.cdiv(C, _GRADS_BLOCK_C)
    invstd, dweight, dbias, coef, count, training = bn or (part, part, part, part, 1, False)
    args = (part, p, dw1, db1, dw2, db2, dp, invstd, dweight, dbias, coef, N, C, N * C, count,
            num_c_blocks)
    meta = dict(ACC=_TL_DTYPE[part.dtype], BLOCK_N=_GRADS_BLOCK_N, BLOCK_C=_GRADS_BLOCK_C,
                BN=bn is not None, TRAINING=training, num_warps=4)
    return (num_c_blocks + 1,), args, meta


def bn_stats_launch(y, part):
    """(grid, args, meta) of spem_bn's statistics pass (training): per-plane mean and M2."""
    N, C, H, W = y.shape
    block_c, block_hw, one_pass, num_warps = _tiling(y)
    num_c_blocks = triton.cdiv(C, block_c)
    args = (y, part, C, W, H * W, N * C, num_c_blocks, *y.stride())
    meta = dict(ACC=_TL_DTYPE[compute_dtype(y.dtype)], FLAT=_planes_are_flat(y), WIDE=_wide(y),
                ONE_PASS=one_pass, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)
    return (N * num_c_blocks,), args, meta


def bn_finalize_launch(y, part, running_mean, running_var, mean, invstd, training, momentum,
                       eps):
    """(grid, args, meta) of spem_bn's per-channel finalisation (mean, invstd, running
    statistics)."""
    N, C, H, W = y.shape
    update = training and running_mean is not None
    r_mean = running_mean if running_mean is not None else mean
    r_var = running_var if running_var is not None else invstd
    args = (part, r_mean, r_var, mean, invstd, N, C, H * W, momentum, eps)
    meta = dict(ACC=_TL_DTYPE[mean.dtype], TRAINING=training, UPDATE=update,
                BLOCK_N=_GRADS_BLOCK_N, BLOCK_C=_GRADS_BLOCK_C, num_warps=4)
    return (triton.cdiv(C, _GRADS_BLOCK_C),), args, meta


def bn_bwd_launches(grad, y, out, dy, dres, w1, b1, w2, b2, p, stats, idx, mean, invstd,
                    weight, bias, part, coef, training, relu, write_dres):
    """(grid, args, meta) of spem_bn's two backward passes over the planes: the reduction
    (G, y -> partials) and the writing pass (-> dy, dresidual)."""
    N, C, H, W = y.shape
    block_c, block_hw, _, num_warps = _tiling(y)  # both loop: once where a tile holds a plane
    num_c_blocks = triton.cdiv(C, block_c)
    o = out if relu else y
    dr = dres if write_dres else dy
    weight_, bias_ = (t if t is not None else mean for t in (weight, bias))
    common = dict(RELU=relu, ACC=_TL_DTYPE[compute_dtype(y.dtype)], BLOCK_C=block_c,
                  BLOCK_HW=block_hw, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                  num_warps=num_warps)
    grid = (N * num_c_blocks,)
    reduce_args = (grad, y, o, w1, b1, w2, b2, p, stats, idx, mean, invstd, weight_, bias_,
                   part, C, W, H * W, N * C, num_c_blocks, *grad.stride(), *y.stride(),
                   *o.stride())
    reduce_meta = dict(common, FLAT=_planes_are_flat(grad, y, o), WIDE=_wide(grad, y, o))
    write_args = (grad, y, o, dy, dr, idx, mean, invstd, weight_, bias_, part, coef, C, W,
                  H * W, N * C, num_c_blocks, *grad.stride(), *y.stride(), *o.stride(),
                  *dy.stride(), *dr.stride())
    write_meta = dict(common, WRITE_DRES=write_dres, TRAINING=training,
                      FLAT=_planes_are_flat(grad, y, o, dy, dr), WIDE=_wide(grad, y, o, dy, dr))
    return (grid, reduce_args, reduce_meta), (grid, write_args, write_meta)


# Triton versions whose launcher calling convention _Launcher follows; the environment
# variable SPEM_KERNELS_TRITON_DIRECT_LAUNCH=0 turns it off.
_DIRECT_LAUNCH = (not INTERPRET and triton.__version__.startswith("3.6.")
                  and os.environ.get("SPEM_KERNELS_TRITON_DIRECT_LAUNCH", "1") != "0")


class _Launcher:
    """Launches a @triton.jit kernel, calling its compiled launcher directly where it can.

    Triton's `kernel[grid](...)` re-derives on every call what the compiled kernel is
    specialised on (tens of microseconds of Python at these sizes, as much as the GPU work).
    Here the first launch of each specialisation goes through Triton, which compiles and
    returns the compiled kernel; later launches with the same key call that kernel's launcher.
    The key holds all that Triton 3.6 specialises on: the device, the constexprs and warps,
    each tensor's dtype and 16-byte alignment, each integer's being 1, being a multiple of 16
    and fitting in 32 bits. Other Triton versions, and the interpreter, use `kernel[grid]`.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        if _DIRECT_LAUNCH:  # (the interpreter's kernels have no params)
            self.constexprs = [p.name for p in kernel.params if p.is_constexpr]
        self.compiled = {}

    def __call__(self, grid, args, meta, device):
        if not _DIRECT_LAUNCH:
            self.kernel[grid](*args, **meta)
            return
        constants = tuple(meta[name] for name in self.constexprs)
        key = (device.index, constants, meta["num_warps"], *map(_specialisation, args))
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*args, **meta)
            return
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *args, *constants)


def _specialisation(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, float):  # an fp32 argument, never specialised
        return float
    return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31


_fwd_kernel = _Launcher(k._spem_fwd_kernel)
_bwd_kernel = _Launcher(k._spem_bwd_kernel)
_grads_kernel = _Launcher(k._spem_param_grads_kernel)
_bn_stats_kernel = _Launcher(k._bn_stats_kernel)
_bn_finalize_kernel = _Launcher(k._bn_finalize_kernel)
_bn_reduce_kernel = _Launcher(k._bn_bwd_reduce_kernel)
_bn_write_kernel = _Launcher(k._bn_bwd_write_kernel)


def _on_device(device):
    """Triton launches on the current CUDA device: switch to x's when it differs."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _dense(param):
    """The parameter itself when its values are contiguous (the kernels index them by c)."""
    return param if param.is_contiguous() else param.contiguous()


differentiable = None  # ops.py wraps forward and backward in its autograd.Function


def forward(x, w1, b1, w2, b2, p, residual, relu):
    out, stats, idx = forward_outputs(x)
    _forward(x, w1, b1, w2, b2, p, residual, relu, out, stats, idx)
    return out, stats, idx


def output(x, w1, b1, w2, b2, p, residual, relu):
    out = torch.empty_like(x)
    _forward(x, w1, b1, w2, b2, p, residual, relu, out, None, None)
    return out


def _forward(x, w1, b1, w2, b2, p, residual, relu, out, stats, idx):
    if out.numel() > 0:
        grid, args, meta = fwd_launch(x, residual, out, *map(_dense, (w1, b1, w2, b2, p)),
                                      stats, idx, relu)
        with _on_device(x.device):
            _fwd_kernel(grid, args, meta, x.device)


def partials(x, planes=k.PARTIALS):
    """The backward's scratch: per-(n, c) values as (N, C) planes, in the compute dtype: the
    five partial gradients (spem), or k.BN_PLANES (spem_bn; see triton_kernels)."""
    return x.new_empty((planes, *x.shape[:2]), dtype=compute_dtype(x.dtype))


def backward(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres):
    dx, dres, *param_grads = backward_outputs(x, write_dres, (w1, b1, w2, b2, p))
    params = tuple(map(_dense, (w1, b1, w2, b2, p)))
    part = partials(x)
    with _on_device(x.device):
        if dx.numel() > 0:
            grid, args, meta = bwd_launch(grad, x, out, dx, dres, *params, stats, idx, part,
                                          relu, write_dres)
            _bwd_kernel(grid, args, meta, x.device)
        grid, args, meta = grads_launch(part, params[4], *param_grads)
        _grads_kernel(grid, args, meta, x.device)
    return dx, dres, *param_grads


bn_differentiable = None  # ops.py wraps bn_forward and bn_backward in its autograd.Function


def bn_forward(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
               training, momentum, eps, relu, save=True):
    """spem_bn's forward; without `save` (no backward follows) the output alone: no stats
    or positions allocated or stored (None), mean and invstd only as the kernels' scratch."""
    if save:
        out, stats, idx, mean, invstd = bn_forward_outputs(y)
    else:
        out, stats, idx = torch.empty_like(y), None, None
        mean, invstd = y.new_empty((2, y.shape[1]), dtype=compute_dtype(y.dtype))
    if out.numel() == 0:
        return out, stats, idx, mean.zero_(), invstd.zero_()
    params = tuple(map(_dense, (w1, b1, w2, b2, p)))
    weight, bias = (_dense(t) if t is not None else None for t in (weight, bias))
    part = partials(y, 2) if training else mean  # per-plane mean and M2 (training)
    with _on_device(y.device):
        if training:
            _bn_stats_kernel(*bn_stats_launch(y, part), y.device)
        _bn_finalize_kernel(*bn_finalize_launch(y, part, running_mean, running_var, mean,
                                                invstd, training, momentum, eps), y.device)
        _fwd_kernel(*fwd_launch(y, residual, out, *params, stats, idx, relu,
                                bn=(mean, invstd, weight, bias)), y.device)
    return out, stats, idx, mean, invstd


def bn_output(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
              training, momentum, eps, relu):
    return bn_forward(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                      training, momentum, eps, relu, save=False)[0]


def bn_backward(grad, y, out, stats, idx, mean, invstd, weight, bias, w1, b1, w2, b2, p,
                training, relu, write_dres):
    dy, dres, dweight, dbias, *param_grads = bn_backward_outputs(
        y, write_dres, weight, bias, (w1, b1, w2, b2, p))
    params = tuple(map(_dense, (w1, b1, w2, b2, p)))
    weight, bias = (_dense(t) if t is not None else None for t in (weight, bias))
    part = partials(y, k.BN_PLANES)
    coef = mean.new_empty((2, y.shape[1]))  # the writing pass's k2, k3 per channel
    count = y.numel() // y.shape[1]
    with _on_device(y.device):
        if count > 0:
            reduce_launch, write_launch = bn_bwd_launches(
                grad, y, out, dy, dres, *params, stats, idx, mean, invstd, weight, bias, part,
                coef, training, relu, write_dres)
            _bn_reduce_kernel(*reduce_launch, y.device)
        _grads_kernel(*grads_launch(part, params[4], *param_grads,
                                    bn=(invstd, dweight, dbias, coef, count, training)), y.device)
        if count > 0:
            _bn_write_kernel(*write_launch, y.device)
    return dy, dres, dweight, dbias, *param_grads
