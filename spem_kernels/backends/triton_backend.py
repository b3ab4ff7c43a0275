"""Triton backend: one fused kernel per direction.

A program owns BLOCK_C channels of one sample and walks their whole H*W planes. When a
tile [BLOCK_C, BLOCK_HW] covers the planes (ONE_PASS) every element is read once and
written once; larger planes loop twice over the plane (reduce, then write).

Tensors are addressed through their strides, so NCHW, channels_last and sliced inputs
need no copy. When each plane is flat (stride_h == W * stride_w, true for both dense
memory formats) the position index is used directly instead of being split into (h, w).
Offsets within a sample are int32 arithmetic, the fastest, unless a tensor's sample spans
2**31 elements or more (WIDE: they are formed in int64 then); the sample's own offset is
always int64.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from .contract import backward_outputs, compute_dtype, forward_outputs

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


@triton.jit
def _plane_offsets(hw, W, s_h, s_w, FLAT: tl.constexpr):
    if FLAT:
        return hw * s_w
    return (hw // W) * s_h + (hw % W) * s_w


@triton.jit
def _gate(M, m, w1, b1, w2, b2, q0, q1):
    """A = w2*M + b2, B = w2*m + b2, Z = w1*(q0*A + q1*B) + b1, g = sigmoid(A+B)*sigmoid(Z)."""
    A = w2 * M + b2
    B = w2 * m + b2
    Z = w1 * (q0 * A + q1 * B) + b1
    s1 = 1.0 / (1.0 + tl.exp(-(A + B)))
    s2 = 1.0 / (1.0 + tl.exp(-Z))
    return A, B, s1, s2


@triton.jit
def _load_params(w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr, c, c_ok, ACC: tl.constexpr):
    w1 = tl.load(w1_ptr + c, mask=c_ok, other=0).to(ACC)
    b1 = tl.load(b1_ptr + c, mask=c_ok, other=0).to(ACC)
    w2 = tl.load(w2_ptr + c, mask=c_ok, other=0).to(ACC)
    b2 = tl.load(b2_ptr + c, mask=c_ok, other=0).to(ACC)
    p0 = tl.load(p_ptr).to(ACC)
    p1 = tl.load(p_ptr + 1).to(ACC)
    P = p0 * p0 + p1 * p1
    return w1, b1, w2, b2, p0 * p0 / P, p1 * p1 / P


@triton.jit
def _load_tile(base, hw, W, s_h, s_w, mask, FLAT: tl.constexpr, ACC: tl.constexpr):
    return tl.load(base + _plane_offsets(hw, W, s_h, s_w, FLAT)[None, :], mask=mask,
                   other=0).to(ACC)


@triton.jit
def _store_tile(base, hw, W, s_h, s_w, mask, value, FLAT: tl.constexpr):
    tl.store(base + _plane_offsets(hw, W, s_h, s_w, FLAT)[None, :],
             value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _minmax(y, mask):
    """Per-row max and min of a tile with their first positions, ignoring NaN, and a NaN count."""
    nan = y != y
    ok = mask & ~nan
    M, i_max = tl.max(tl.where(ok, y, float("-inf")), axis=1, return_indices=True,
                      return_indices_tie_break_left=True)
    m, i_min = tl.min(tl.where(ok, y, float("inf")), axis=1, return_indices=True,
                      return_indices_tie_break_left=True)
    return M, i_max, m, i_min, tl.sum(nan.to(tl.int32), axis=1)


@triton.jit
def _masked_grad(g_base, o_base, hw, W, sg_h, sg_w, so_h, so_w, mask,
                 RELU: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr):
    """G = dL/dout, zeroed where the ReLU was off (out <= 0)."""
    G = _load_tile(g_base, hw, W, sg_h, sg_w, mask, FLAT, ACC)
    if RELU:
        G = tl.where(_load_tile(o_base, hw, W, so_h, so_w, mask, FLAT, ACC) > 0, G, 0.0)
    return G


@triton.jit
def _tail(y, g, r_base, o_base, hw, W, sr_h, sr_w, so_h, so_w, mask,
          HAS_RES: tl.constexpr, RELU: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr):
    """out = relu?(g * y + residual), rounded once to out's dtype."""
    o = g * y
    if HAS_RES:
        o += _load_tile(r_base, hw, W, sr_h, sr_w, mask, FLAT, ACC)
    if RELU:
        o = tl.where(o < 0, 0.0, o)  # keeps NaN, as torch.relu does
    _store_tile(o_base, hw, W, so_h, so_w, mask, o, FLAT)


@triton.jit
def _spem_fwd_kernel(
    x_ptr, res_ptr, out_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr, stats_ptr, idx_ptr,
    C, W, HW, num_c_blocks,
    sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, FLAT: tl.constexpr,
    WIDE: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per plane y = x[n, c]: M = max(y), m = min(y) (first position on ties, NaN if any
    element is NaN), gate g from SPEM.md, out = relu?(g * y + residual). Saves M, m and
    their positions; nothing full-size."""
    pid = tl.program_id(0)
    n = (pid // num_c_blocks).to(tl.int64)
    c = (pid % num_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    hw0 = tl.arange(0, BLOCK_HW)
    if WIDE:  # c * stride_c and positions * strides reach 2**31: form them in int64
        c = c.to(tl.int64)
        hw0 = hw0.to(tl.int64)
    x_base = x_ptr + n * sx_n + c[:, None] * sx_c
    r_base = res_ptr + n * sr_n + c[:, None] * sr_c
    o_base = out_ptr + n * so_n + c[:, None] * so_c

    if ONE_PASS:  # the whole plane is one tile: read it once, keep it in registers
        mask0 = c_ok[:, None] & (hw0 < HW)[None, :]
        y0 = _load_tile(x_base, hw0, W, sx_h, sx_w, mask0, FLAT, ACC)
        M, i_max, m, i_min, n_nan = _minmax(y0, mask0)
    else:
        M = tl.full([BLOCK_C], float("-inf"), ACC)
        m = tl.full([BLOCK_C], float("inf"), ACC)
        i_max = tl.zeros([BLOCK_C], tl.int32)
        i_min = tl.zeros([BLOCK_C], tl.int32)
        n_nan = tl.zeros([BLOCK_C], tl.int32)
        for start in range(0, HW, BLOCK_HW):
            hw = start + hw0
            mask = c_ok[:, None] & (hw < HW)[None, :]
            y = _load_tile(x_base, hw, W, sx_h, sx_w, mask, FLAT, ACC)
            cM, ci_max, cm, ci_min, c_nan = _minmax(y, mask)
            # Strict comparisons keep the earlier chunk's position on ties.
            up = cM > M
            M = tl.where(up, cM, M)
            i_max = tl.where(up, ci_max + start, i_max)
            up = cm < m
            m = tl.where(up, cm, m)
            i_min = tl.where(up, ci_min + start, i_min)
            n_nan += c_nan
    M = tl.where(n_nan > 0, float("nan"), tl.where(c_ok, M, 0.0))
    m = tl.where(n_nan > 0, float("nan"), tl.where(c_ok, m, 0.0))

    w1, b1, w2, b2, q0, q1 = _load_params(w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr, c, c_ok, ACC)
    _, _, s1, s2 = _gate(M, m, w1, b1, w2, b2, q0, q1)
    g = (s1 * s2)[:, None]

    if ONE_PASS:
        _tail(y0, g, r_base, o_base, hw0, W, sr_h, sr_w, so_h, so_w, mask0,
              HAS_RES, RELU, FLAT, ACC)
    else:
        for start in range(0, HW, BLOCK_HW):
            hw = start + hw0
            mask = c_ok[:, None] & (hw < HW)[None, :]
            y = _load_tile(x_base, hw, W, sx_h, sx_w, mask, FLAT, ACC)
            _tail(y, g, r_base, o_base, hw, W, sr_h, sr_w, so_h, so_w, mask,
                  HAS_RES, RELU, FLAT, ACC)

    row = (n * C + c) * 2
    tl.store(stats_ptr + row, M, mask=c_ok)
    tl.store(stats_ptr + row + 1, m, mask=c_ok)
    tl.store(idx_ptr + row, i_max, mask=c_ok)
    tl.store(idx_ptr + row + 1, i_min, mask=c_ok)


@triton.jit
def _input_grads(G, g, dM, dm, i_max, i_min, d_base, dr_base, hw, W, sd_h, sd_w, sdr_h, sdr_w,
                 mask, WRITE_DRES: tl.constexpr, FLAT: tl.constexpr):
    """dx = G g, plus dM at the max's position and dm at the min's; dresidual = G."""
    dx = G * g
    dx += tl.where(hw[None, :] == i_max[:, None], dM, 0.0)
    dx += tl.where(hw[None, :] == i_min[:, None], dm, 0.0)
    _store_tile(d_base, hw, W, sd_h, sd_w, mask, dx, FLAT)
    if WRITE_DRES:
        _store_tile(dr_base, hw, W, sdr_h, sdr_w, mask, G, FLAT)


@triton.jit
def _spem_bwd_kernel(
    g_ptr, x_ptr, out_ptr, dx_ptr, dres_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr,
    stats_ptr, idx_ptr, part_ptr,
    C, W, HW, NC, num_c_blocks,
    sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
    sd_n, sd_c, sd_h, sd_w, sdr_n, sdr_c, sdr_h, sdr_w,
    RELU: tl.constexpr, WRITE_DRES: tl.constexpr, ACC: tl.constexpr, FLAT: tl.constexpr,
    WIDE: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """G = dL/dout (masked by out > 0 with relu); S = sum(G * y) over the plane;
    dZ = S s1 s2 (1 - s2), dU = S s1 s2 (1 - s1), dA = dU + dZ w1 q0, dB = dU + dZ w1 q1;
    dy = G g + dA w2 at argmax + dB w2 at argmin; dresidual = G. Per (n, c) it stores the
    partials [dZ (q0 A + q1 B), dZ, dA M + dB m, dA + dB, dZ w1 w2 (M - m)] as five (N, C)
    planes, which _spem_param_grads_kernel sums (the last is dq0 - dq1 = dZ w1 (A - B),
    formed without cancellation)."""
    pid = tl.program_id(0)
    n = (pid // num_c_blocks).to(tl.int64)
    c = (pid % num_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    hw0 = tl.arange(0, BLOCK_HW)
    if WIDE:  # c * stride_c and positions * strides reach 2**31: form them in int64
        c = c.to(tl.int64)
        hw0 = hw0.to(tl.int64)
    g_base = g_ptr + n * sg_n + c[:, None] * sg_c
    x_base = x_ptr + n * sx_n + c[:, None] * sx_c
    o_base = out_ptr + n * so_n + c[:, None] * so_c
    d_base = dx_ptr + n * sd_n + c[:, None] * sd_c
    dr_base = dres_ptr + n * sdr_n + c[:, None] * sdr_c

    row = (n * C + c) * 2
    M = tl.load(stats_ptr + row, mask=c_ok, other=0).to(ACC)
    m = tl.load(stats_ptr + row + 1, mask=c_ok, other=0).to(ACC)
    i_max = tl.load(idx_ptr + row, mask=c_ok, other=0)
    i_min = tl.load(idx_ptr + row + 1, mask=c_ok, other=0)
    w1, b1, w2, b2, q0, q1 = _load_params(w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr, c, c_ok, ACC)
    A, B, s1, s2 = _gate(M, m, w1, b1, w2, b2, q0, q1)

    if ONE_PASS:
        mask0 = c_ok[:, None] & (hw0 < HW)[None, :]
        G0 = _masked_grad(g_base, o_base, hw0, W, sg_h, sg_w, so_h, so_w, mask0, RELU, FLAT, ACC)
        S = tl.sum(G0 * _load_tile(x_base, hw0, W, sx_h, sx_w, mask0, FLAT, ACC), axis=1)
    else:
        S = tl.zeros([BLOCK_C], ACC)
        for start in range(0, HW, BLOCK_HW):
            hw = start + hw0
            mask = c_ok[:, None] & (hw < HW)[None, :]
            G = _masked_grad(g_base, o_base, hw, W, sg_h, sg_w, so_h, so_w, mask, RELU, FLAT, ACC)
            S += tl.sum(G * _load_tile(x_base, hw, W, sx_h, sx_w, mask, FLAT, ACC), axis=1)

    dZ = S * s1 * s2 * (1 - s2)
    dU = S * s2 * s1 * (1 - s1)
    dA = dU + dZ * w1 * q0
    dB = dU + dZ * w1 * q1
    dM = (dA * w2)[:, None]
    dm = (dB * w2)[:, None]
    g = (s1 * s2)[:, None]

    if ONE_PASS:
        _input_grads(G0, g, dM, dm, i_max, i_min, d_base, dr_base, hw0, W, sd_h, sd_w, sdr_h,
                     sdr_w, mask0, WRITE_DRES, FLAT)
    else:
        for start in range(0, HW, BLOCK_HW):
            hw = start + hw0
            mask = c_ok[:, None] & (hw < HW)[None, :]
            G = _masked_grad(g_base, o_base, hw, W, sg_h, sg_w, so_h, so_w, mask, RELU, FLAT, ACC)
            _input_grads(G, g, dM, dm, i_max, i_min, d_base, dr_base, hw, W, sd_h, sd_w, sdr_h,
                         sdr_w, mask, WRITE_DRES, FLAT)

    part = part_ptr + n * C + c
    tl.store(part, dZ * (q0 * A + q1 * B), mask=c_ok)
    tl.store(part + NC, dZ, mask=c_ok)
    tl.store(part + 2 * NC, dA * M + dB * m, mask=c_ok)
    tl.store(part + 3 * NC, dA + dB, mask=c_ok)
    tl.store(part + 4 * NC, dZ * w1 * w2 * (M - m), mask=c_ok)


@triton.jit
def _sum_over_n(plane_ptr, N, C, c, c_ok, n0, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per channel c, the sum over n of one (N, C) plane of partials, in a fixed order."""
    total = tl.zeros(c.shape, ACC)
    for start in range(0, N, BLOCK_N):
        n = start + n0
        mask = (n < N)[:, None] & c_ok[None, :]
        total += tl.sum(tl.load(plane_ptr + n[:, None] * C + c[None, :], mask=mask, other=0),
                        axis=0)
    return total


@triton.jit
def _spem_param_grads_kernel(
    part_ptr, p_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, dp_ptr, N, C, NC, num_c_blocks,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The parameter gradients from the backward kernel's partials (five (N, C) planes).

    Programs 0 .. num_c_blocks - 1 each own BLOCK_C channels: dw1, db1, dw2, db2 are the first
    four planes summed over n. The last program forms p's gradient: with D the fifth plane
    summed over n and c, P = p0^2 + p1^2, dp0 = 2 p0 p1^2 D / P^2 and dp1 = -2 p1 p0^2 D / P^2.
    Every sum runs in a fixed order: two runs give bitwise equal gradients."""
    pid = tl.program_id(0)
    n0 = tl.arange(0, BLOCK_N)
    c0 = tl.arange(0, BLOCK_C)
    if pid < num_c_blocks:
        c = pid * BLOCK_C + c0
        c_ok = c < C
        _store_param_grad(dw1_ptr, c, c_ok, _sum_over_n(part_ptr, N, C, c, c_ok, n0, ACC, BLOCK_N))
        _store_param_grad(db1_ptr, c, c_ok,
                          _sum_over_n(part_ptr + NC, N, C, c, c_ok, n0, ACC, BLOCK_N))
        _store_param_grad(dw2_ptr, c, c_ok,
                          _sum_over_n(part_ptr + 2 * NC, N, C, c, c_ok, n0, ACC, BLOCK_N))
        _store_param_grad(db2_ptr, c, c_ok,
                          _sum_over_n(part_ptr + 3 * NC, N, C, c, c_ok, n0, ACC, BLOCK_N))
    else:
        D = tl.zeros([BLOCK_C], ACC)
        for start in range(0, C, BLOCK_C):
            c = start + c0
            D += _sum_over_n(part_ptr + 4 * NC, N, C, c, c < C, n0, ACC, BLOCK_N)
        D = tl.sum(D, axis=0)
        p0 = tl.load(p_ptr).to(ACC)
        p1 = tl.load(p_ptr + 1).to(ACC)
        a = p0 * p0
        b = p1 * p1
        s = 2 * D / ((a + b) * (a + b))
        tl.store(dp_ptr, (s * p0 * b).to(dp_ptr.dtype.element_ty))
        tl.store(dp_ptr + 1, (-s * p1 * a).to(dp_ptr.dtype.element_ty))


@triton.jit
def _store_param_grad(ptr, c, c_ok, value):
    tl.store(ptr + c, value.to(ptr.dtype.element_ty), mask=c_ok)


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


def fwd_launch(x, residual, out, w1, b1, w2, b2, p, stats, idx, relu):
    """(grid, args, meta) of the forward kernel for these tensors: the single place the
    launch is described (scripts/triton_aot.py compiles the same launches for sm_80/sm_90)."""
    N, C, H, W = x.shape
    block_c, block_hw, one_pass, num_warps = _tiling(x)
    num_c_blocks = triton.cdiv(C, block_c)
    res = residual if residual is not None else x
    args = (x, res, out, w1, b1, w2, b2, p, stats, idx, C, W, H * W, num_c_blocks,
            *x.stride(), *res.stride(), *out.stride())
    meta = dict(HAS_RES=residual is not None, RELU=relu, ACC=_TL_DTYPE[compute_dtype(x.dtype)],
                FLAT=_planes_are_flat(x, res, out), WIDE=_wide(x, res, out), ONE_PASS=one_pass,
                BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)
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


# The reduction's tile: BLOCK_C channels of BLOCK_N samples per step.
_GRADS_BLOCK_N, _GRADS_BLOCK_C = 64, 32


def grads_launch(part, p, dw1, db1, dw2, db2, dp):
    """(grid, args, meta) of the parameter-gradient reduction over the partials (5, N, C)."""
    N, C = part.shape[1:]
    num_c_blocks = triton.cdiv(C, _GRADS_BLOCK_C)
    args = (part, p, dw1, db1, dw2, db2, dp, N, C, N * C, num_c_blocks)
    meta = dict(ACC=_TL_DTYPE[part.dtype], BLOCK_N=_GRADS_BLOCK_N, BLOCK_C=_GRADS_BLOCK_C,
                num_warps=4)
    return (num_c_blocks + 1,), args, meta


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
    return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31


_fwd_kernel = _Launcher(_spem_fwd_kernel)
_bwd_kernel = _Launcher(_spem_bwd_kernel)
_grads_kernel = _Launcher(_spem_param_grads_kernel)


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
    if out.numel() > 0:
        grid, args, meta = fwd_launch(x, residual, out, *map(_dense, (w1, b1, w2, b2, p)),
                                      stats, idx, relu)
        with _on_device(x.device):
            _fwd_kernel(grid, args, meta, x.device)
    return out, stats, idx


def partials(x):
    """The backward's scratch: the five per-(n, c) partial gradients as (N, C) planes, in the
    compute dtype (see _spem_bwd_kernel)."""
    return x.new_empty((5, *x.shape[:2]), dtype=compute_dtype(x.dtype))


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
