"""The Triton backend's kernels (launched by triton_backend.py), math in their docstrings.

A program owns BLOCK_C channels of one sample and walks their whole H*W planes. When a
tile [BLOCK_C, BLOCK_HW] covers the planes (ONE_PASS) every element is read once and
written once; larger planes loop twice over the plane (reduce, then write).

Tensors are addressed through their strides, so NCHW, channels_last and sliced inputs
need no copy. When each plane is flat (stride_h == W * stride_w, true for both dense
memory formats) the position index is used directly instead of being split into (h, w).
Offsets within a sample are int32 arithmetic, the fastest, unless a tensor's sample spans
2**31 elements or more (WIDE: they are formed in int64 then); the sample's own offset is
always int64.

spem: _spem_fwd_kernel; _spem_bwd_kernel, then _spem_param_grads_kernel.
spem_bn (BatchNorm first): _bn_stats_kernel (training), _bn_finalize_kernel, then
_spem_fwd_kernel with NORM; _bn_bwd_reduce_kernel, _spem_param_grads_kernel with BN, then
_bn_bwd_write_kernel. The backward's per-(n, c) scratch `part` holds (N, C) planes: the
five SPEM partials, then for spem_bn the plane sums of dx and dx (y - mean) and the plane's
g, dM, dm (PARTIALS and BN_PLANES below).
"""
import triton
import triton.language as tl

PARTIALS = 5  # per (n, c): dw1, db1, dw2, db2, dq0 - dq1 before the sums (SPEM.md)
BN_PLANES = PARTIALS + 5  # spem_bn's: + sum dx, sum dx (y - mean), then g, dM, dm


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
def _bn_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, c, c_ok, HAS_WEIGHT: tl.constexpr,
               HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """(alpha, beta, mean, bias) per channel: BatchNorm's x = y * alpha + beta with
    alpha = weight * invstd, beta = bias - mean * alpha (as ATen forms them), and what the
    backward uses of them (x = alpha (y - mean) + bias)."""
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0).to(ACC)
    alpha = tl.load(invstd_ptr + c, mask=c_ok, other=0).to(ACC)
    if HAS_WEIGHT:
        alpha = alpha * tl.load(weight_ptr + c, mask=c_ok, other=0).to(ACC)
    bias = tl.zeros(c.shape, ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=c_ok, other=0).to(ACC)
    return alpha, bias - mean * alpha, mean, bias


@triton.jit
def _normalise(y, alpha, beta, NORM: tl.constexpr):
    """x = y * alpha + beta per channel (a row of the tile) for spem_bn; y itself for spem."""
    if NORM:
        return y * alpha[:, None] + beta[:, None]
    return y


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
    """G = dL/dout, zeroed where the ReLU was off (out <= 0), as torch's ReLU backward: a
    NaN output passes G."""
    G = _load_tile(g_base, hw, W, sg_h, sg_w, mask, FLAT, ACC)
    if RELU:
        G = tl.where(_load_tile(o_base, hw, W, so_h, so_w, mask, FLAT, ACC) <= 0, 0.0, G)
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
def _program_channels(num_c_blocks, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                      WIDE: tl.constexpr):
    """(n, c, hw0) of this program: its sample (int64), its BLOCK_C channels and the first
    BLOCK_HW positions, in int64 when offsets within a sample may reach 2**31."""
    pid = tl.program_id(0)
    n = (pid // num_c_blocks).to(tl.int64)
    c = (pid % num_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw0 = tl.arange(0, BLOCK_HW)
    if WIDE:
        c = c.to(tl.int64)
        hw0 = hw0.to(tl.int64)
    return n, c, hw0


@triton.jit
def _spem_fwd_kernel(
    x_ptr, res_ptr, out_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr, stats_ptr, idx_ptr,
    mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
    C, W, HW, num_c_blocks,
    sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w, so_n, so_c, so_h, so_w,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, FLAT: tl.constexpr,
    WIDE: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
):
    """Per plane y = x[n, c] (with NORM, spem_bn: y = x * alpha + beta, BatchNorm from mean
    and invstd): M = max(y), m = min(y) (first position on ties, NaN if any element is
    NaN), gate g from SPEM.md, out = relu?(g * y + residual). With SAVE, stores M, m and
    their positions for the backward (nothing full-size); a forward that no backward follows
    stores the output alone."""
    n, c, hw0 = _program_channels(num_c_blocks, BLOCK_C, BLOCK_HW, WIDE)
    c_ok = c < C
    x_base = x_ptr + n * sx_n + c[:, None] * sx_c
    r_base = res_ptr + n * sr_n + c[:, None] * sr_c
    o_base = out_ptr + n * so_n + c[:, None] * so_c
    if NORM:
        alpha, beta, _, _ = _bn_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, c, c_ok,
                                       HAS_WEIGHT, HAS_BIAS, ACC)
    else:  # unused
        alpha = tl.zeros([BLOCK_C], ACC)
        beta = alpha

    if ONE_PASS:  # the whole plane is one tile: read it once, keep it in registers
        mask0 = c_ok[:, None] & (hw0 < HW)[None, :]
        y0 = _normalise(_load_tile(x_base, hw0, W, sx_h, sx_w, mask0, FLAT, ACC), alpha, beta,
                        NORM)
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
            y = _normalise(_load_tile(x_base, hw, W, sx_h, sx_w, mask, FLAT, ACC), alpha, beta,
                           NORM)
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
            y = _normalise(_load_tile(x_base, hw, W, sx_h, sx_w, mask, FLAT, ACC), alpha, beta,
                           NORM)
            _tail(y, g, r_base, o_base, hw, W, sr_h, sr_w, so_h, so_w, mask,
                  HAS_RES, RELU, FLAT, ACC)

    if SAVE:
        row = (n * C + c) * 2
        tl.store(stats_ptr + row, M, mask=c_ok)
        tl.store(stats_ptr + row + 1, m, mask=c_ok)
        tl.store(idx_ptr + row, i_max, mask=c_ok)
        tl.store(idx_ptr + row + 1, i_min, mask=c_ok)


@triton.jit
def _input_grad(G, g, dM, dm, i_max, i_min, hw):
    """dx = G g, plus dM at the max's position and dm at the min's (g, dM, dm per row)."""
    dx = G * g[:, None]
    dx += tl.where(hw[None, :] == i_max[:, None], dM[:, None], 0.0)
    dx += tl.where(hw[None, :] == i_min[:, None], dm[:, None], 0.0)
    return dx


@triton.jit
def _writing_pass_planes(n, c, c_ok, C, idx_ptr, g_ptr, x_ptr, out_ptr, d_ptr, dres_ptr,
                         sg_n, sg_c, sx_n, sx_c, so_n, so_c, sd_n, sd_c, sdr_n, sdr_c):
    """What a backward's writing pass (spem's, spem_bn's) addresses per (n, c): where the
    planes of grad, the input (x or y), out, its gradient and dresidual start, and the
    plane's argmax and argmin."""
    cc = c[:, None]
    row = (n * C + c) * 2
    return (g_ptr + n * sg_n + cc * sg_c, x_ptr + n * sx_n + cc * sx_c,
            out_ptr + n * so_n + cc * so_c, d_ptr + n * sd_n + cc * sd_c,
            dres_ptr + n * sdr_n + cc * sdr_c,
            tl.load(idx_ptr + row, mask=c_ok, other=0),
            tl.load(idx_ptr + row + 1, mask=c_ok, other=0))


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
    """G = dL/dout (zeroed where out <= 0 with relu); S = sum(G * y) over the plane;
    dZ = S s1 s2 (1 - s2), dU = S s1 s2 (1 - s1), dA = dU + dZ w1 q0, dB = dU + dZ w1 q1;
    dy = G g + dA w2 at argmax + dB w2 at argmin; dresidual = G. Per (n, c) it stores the
    partials [dZ (q0 A + q1 B), dZ, dA M + dB m, dA + dB, dZ w1 w2 (M - m)] as five (N, C)
    planes, which _spem_param_grads_kernel sums (the last is dq0 - dq1 = dZ w1 (A - B),
    formed without cancellation)."""
    n, c, hw0 = _program_channels(num_c_blocks, BLOCK_C, BLOCK_HW, WIDE)
    c_ok = c < C
    g_base, x_base, o_base, d_base, dr_base, i_max, i_min = _writing_pass_planes(
        n, c, c_ok, C, idx_ptr, g_ptr, x_ptr, out_ptr, dx_ptr, dres_ptr,
        sg_n, sg_c, sx_n, sx_c, so_n, so_c, sd_n, sd_c, sdr_n, sdr_c)

    row = (n * C + c) * 2
    M = tl.load(stats_ptr + row, mask=c_ok, other=0).to(ACC)
    m = tl.load(stats_ptr + row + 1, mask=c_ok, other=0).to(ACC)
    w1, b1, w2, b2, q0, q1 = _load_params(w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr, c, c_ok, ACC)

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

    g, dM, dm = _plane_grads(S, M, m, w1, b1, w2, b2, q0, q1, part_ptr + n * C + c, NC, c_ok)

    if ONE_PASS:
        _store_tile(d_base, hw0, W, sd_h, sd_w, mask0,
                    _input_grad(G0, g, dM, dm, i_max, i_min, hw0), FLAT)
        if WRITE_DRES:
            _store_tile(dr_base, hw0, W, sdr_h, sdr_w, mask0, G0, FLAT)
    else:
        for start in range(0, HW, BLOCK_HW):
            hw = start + hw0
            mask = c_ok[:, None] & (hw < HW)[None, :]
            G = _masked_grad(g_base, o_base, hw, W, sg_h, sg_w, so_h, so_w, mask, RELU, FLAT, ACC)
            _store_tile(d_base, hw, W, sd_h, sd_w, mask,
                        _input_grad(G, g, dM, dm, i_max, i_min, hw), FLAT)
            if WRITE_DRES:
                _store_tile(dr_base, hw, W, sdr_h, sdr_w, mask, G, FLAT)


@triton.jit
def _plane_grads(S, M, m, w1, b1, w2, b2, q0, q1, part, NC, c_ok):
    """From S = sum(G y) over each plane: stores the five partials at part + k NC and
    returns the plane's (g, dM, dm)."""
    A, B, s1, s2 = _gate(M, m, w1, b1, w2, b2, q0, q1)
    dZ = S * s1 * s2 * (1 - s2)
    dU = S * s2 * s1 * (1 - s1)
    dA = dU + dZ * w1 * q0
    dB = dU + dZ * w1 * q1
    tl.store(part, dZ * (q0 * A + q1 * B), mask=c_ok)
    tl.store(part + NC, dZ, mask=c_ok)
    tl.store(part + 2 * NC, dA * M + dB * m, mask=c_ok)
    tl.store(part + 3 * NC, dA + dB, mask=c_ok)
    tl.store(part + 4 * NC, dZ * w1 * w2 * (M - m), mask=c_ok)
    return s1 * s2, dA * w2, dB * w2


@triton.jit
def _sum_over_n(plane_ptr, N, C, c, c_ok, n0, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per channel c, the sum over n of one (N, C) plane of partials, in a fixed order (n
    in int64: n * C may pass 2**31)."""
    total = tl.zeros(c.shape, ACC)
    for start in range(0, N, BLOCK_N):
        n = (start + n0).to(tl.int64)
        mask = (n < N)[:, None] & c_ok[None, :]
        total += tl.sum(tl.load(plane_ptr + n[:, None] * C + c[None, :], mask=mask, other=0),
                        axis=0)
    return total


@triton.jit
def _spem_param_grads_kernel(
    part_ptr, p_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, dp_ptr,
    invstd_ptr, dweight_ptr, dbias_ptr, coef_ptr,
    N, C, NC, count, num_c_blocks,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BN: tl.constexpr, TRAINING: tl.constexpr,
):
    """The parameter gradients from the backward's partials ((N, C) planes, see `part`).

    Programs 0 .. num_c_blocks - 1 each own BLOCK_C channels: dw1, db1, dw2, db2 are the first
    four planes summed over n. With BN (spem_bn) they also sum the plane sums of dx and of
    dx (y - mean): dbias = sum dx, dweight = invstd sum dx (y - mean), and store the writing
    pass's coefficients k2 = sum dx / count, k3 = invstd^2 sum dx (y - mean) / count
    (count = N H W; both 0 outside training, where the statistics are constants). The last
    program forms p's gradient: with D the fifth plane summed over n and c, P = p0^2 + p1^2,
    dp0 = 2 p0 p1^2 D / P^2 and dp1 = -2 p1 p0^2 D / P^2. Every sum runs in a fixed order:
    two runs give bitwise equal gradients."""
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
        if BN:
            sdx = _sum_over_n(part_ptr + 5 * NC, N, C, c, c_ok, n0, ACC, BLOCK_N)
            sdxd = _sum_over_n(part_ptr + 6 * NC, N, C, c, c_ok, n0, ACC, BLOCK_N)
            invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0).to(ACC)
            _store_param_grad(dbias_ptr, c, c_ok, sdx)
            _store_param_grad(dweight_ptr, c, c_ok, sdxd * invstd)
            if TRAINING:
                k2 = sdx / count
                k3 = sdxd * invstd * invstd / count
            else:
                k2 = tl.zeros([BLOCK_C], ACC)
                k3 = tl.zeros([BLOCK_C], ACC)
            tl.store(coef_ptr + c, k2, mask=c_ok)
            tl.store(coef_ptr + C + c, k3, mask=c_ok)
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


# --- spem_bn: BatchNorm's statistics, and the backward's two passes ---

@triton.jit
def _bn_stats_kernel(
    y_ptr, part_ptr, C, W, HW, NC, num_c_blocks, sy_n, sy_c, sy_h, sy_w,
    ACC: tl.constexpr, FLAT: tl.constexpr, WIDE: tl.constexpr, ONE_PASS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per plane y[n, c]: its mean and M2, the sum of squared deviations from that mean,
    into the (N, C) planes 0 and 1 of part. Deviations from the plane's own mean: no
    cancellation, whatever y's offset (_bn_finalize_kernel combines the planes)."""
    n, c, hw0 = _program_channels(num_c_blocks, BLOCK_C, BLOCK_HW, WIDE)
    c_ok = c < C
    y_base = y_ptr + n * sy_n + c[:, None] * sy_c
    if ONE_PASS:
        mask0 = c_ok[:, None] & (hw0 < HW)[None, :]
        y0 = _load_tile(y_base, hw0, W, sy_h, sy_w, mask0, FLAT, ACC)
        mean = tl.sum(y0, axis=1) / HW
        dev = tl.where(mask0, y0 - mean[:, None], 0.0)
        M2 = tl.sum(dev * dev, axis=1)
    else:
        total = tl.zeros([BLOCK_C], ACC)
        for start in range(0, HW, BLOCK_HW):
            hw = start + hw0
            mask = c_ok[:, None] & (hw < HW)[None, :]
            total += tl.sum(_load_tile(y_base, hw, W, sy_h, sy_w, mask, FLAT, ACC), axis=1)
        mean = total / HW
        M2 = tl.zeros([BLOCK_C], ACC)
        for start in range(0, HW, BLOCK_HW):
            hw = start + hw0
            mask = c_ok[:, None] & (hw < HW)[None, :]
            dev = tl.where(mask, _load_tile(y_base, hw, W, sy_h, sy_w, mask, FLAT, ACC)
                           - mean[:, None], 0.0)
            M2 += tl.sum(dev * dev, axis=1)
    tl.store(part_ptr + n * C + c, mean, mask=c_ok)
    tl.store(part_ptr + NC + n * C + c, M2, mask=c_ok)


@triton.jit
def _bn_finalize_kernel(
    part_ptr, running_mean_ptr, running_var_ptr, mean_ptr, invstd_ptr,
    N, C, HW, momentum, eps,
    ACC: tl.constexpr, TRAINING: tl.constexpr, UPDATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel, what normalises y. Training: the batch's mean (of the planes' means,
    equal counts) and biased variance M2 / (N HW), with M2 = sum over n of the planes' M2
    plus HW (mean_n - mean)^2 (Chan et al.), in a fixed order; with UPDATE the running
    statistics become (1 - momentum) r + momentum s (the variance unbiased: M2 / (N HW - 1)).
    Otherwise the running statistics themselves. Stores mean and invstd = 1 / sqrt(var + eps).
    N HW and N C are formed in int64: the arguments are int32 where they fit, their products
    need not."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if TRAINING:
        n0 = tl.arange(0, BLOCK_N)
        mean = _sum_over_n(part_ptr, N, C, c, c_ok, n0, ACC, BLOCK_N) / N
        M2 = tl.zeros([BLOCK_C], ACC)
        planes = tl.cast(N, tl.int64) * C
        for start in range(0, N, BLOCK_N):
            n = (start + n0).to(tl.int64)
            mask = (n < N)[:, None] & c_ok[None, :]
            at = n[:, None] * C + c[None, :]
            dev = tl.where(mask, tl.load(part_ptr + at, mask=mask, other=0) - mean[None, :], 0.0)
            M2 += tl.sum(tl.load(part_ptr + planes + at, mask=mask, other=0) + HW * dev * dev,
                         axis=0)
        count = tl.cast(N, tl.int64) * HW
        var = M2 / count
        if UPDATE:
            r_mean = tl.load(running_mean_ptr + c, mask=c_ok, other=0).to(ACC)
            r_var = tl.load(running_var_ptr + c, mask=c_ok, other=0).to(ACC)
            tl.store(running_mean_ptr + c, ((1 - momentum) * r_mean + momentum * mean).to(
                running_mean_ptr.dtype.element_ty), mask=c_ok)
            tl.store(running_var_ptr + c, ((1 - momentum) * r_var + momentum * M2
                                           / (count - 1)).to(running_var_ptr.dtype.element_ty),
                     mask=c_ok)
    else:
        mean = tl.load(running_mean_ptr + c, mask=c_ok, other=0).to(ACC)
        var = tl.load(running_var_ptr + c, mask=c_ok, other=1).to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    if ACC == tl.float64:
        root = tl.sqrt(var + eps)
    else:  # IEEE-rounded, as ATen's; tl.sqrt may lower to an approximation
        root = tl.sqrt_rn(var + eps)
    tl.store(invstd_ptr + c, 1.0 / root, mask=c_ok)


@triton.jit
def _bn_bwd_reduce_kernel(
    g_ptr, y_ptr, out_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr, stats_ptr, idx_ptr,
    mean_ptr, invstd_ptr, weight_ptr, bias_ptr, part_ptr,
    C, W, HW, NC, num_c_blocks,
    sg_n, sg_c, sg_h, sg_w, sy_n, sy_c, sy_h, sy_w, so_n, so_c, so_h, so_w,
    RELU: tl.constexpr, ACC: tl.constexpr, FLAT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """spem_bn's backward, first pass (reads G, y). Per plane, with x = alpha (y - mean) +
    bias the normalised values: SG = sum G, SD = sum G (y - mean), S = sum G x = alpha SD +
    bias SG; the SPEM partials and (g, dM, dm) as _spem_bwd_kernel forms them; and for
    BatchNorm the plane sums of dx = G g (+ dM, dm at the extremes) and of dx (y - mean):
    g SG + dM + dm and g SD + dM (y[argmax] - mean) + dm (y[argmin] - mean)."""
    n, c, hw0 = _program_channels(num_c_blocks, BLOCK_C, BLOCK_HW, WIDE)
    c_ok = c < C
    g_base = g_ptr + n * sg_n + c[:, None] * sg_c
    y_base = y_ptr + n * sy_n + c[:, None] * sy_c
    o_base = out_ptr + n * so_n + c[:, None] * so_c
    alpha, _, mean, bias = _bn_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, c, c_ok,
                                      HAS_WEIGHT, HAS_BIAS, ACC)
    SG = tl.zeros([BLOCK_C], ACC)
    SD = tl.zeros([BLOCK_C], ACC)
    for start in range(0, HW, BLOCK_HW):  # one iteration where a tile holds the plane
        hw = start + hw0
        mask = c_ok[:, None] & (hw < HW)[None, :]
        G = _masked_grad(g_base, o_base, hw, W, sg_h, sg_w, so_h, so_w, mask, RELU, FLAT, ACC)
        dev = tl.where(mask, _load_tile(y_base, hw, W, sy_h, sy_w, mask, FLAT, ACC)
                       - mean[:, None], 0.0)
        SG += tl.sum(G, axis=1)
        SD += tl.sum(G * dev, axis=1)

    row = (n * C + c) * 2
    M = tl.load(stats_ptr + row, mask=c_ok, other=0).to(ACC)
    m = tl.load(stats_ptr + row + 1, mask=c_ok, other=0).to(ACC)
    i_max = tl.load(idx_ptr + row, mask=c_ok, other=0)
    i_min = tl.load(idx_ptr + row + 1, mask=c_ok, other=0)
    w1, b1, w2, b2, q0, q1 = _load_params(w1_ptr, b1_ptr, w2_ptr, b2_ptr, p_ptr, c, c_ok, ACC)
    part = part_ptr + n * C + c
    # bn_spem_S (spem_bn_math.h): a zero bias's term left out, so an infinite SG is no NaN.
    # (Written as a choice of two sums: alpha SD + where(...) spills on sm_80/sm_90.)
    S = tl.where(bias == 0, alpha * SD, alpha * SD + bias * SG)
    g, dM, dm = _plane_grads(S, M, m, w1, b1, w2, b2, q0, q1, part, NC, c_ok)
    y_one = y_ptr + n * sy_n + c * sy_c  # y at the extremes, one element per channel
    dev_max = tl.load(y_one + _plane_offsets(i_max.to(c.dtype), W, sy_h, sy_w, FLAT),
                      mask=c_ok, other=0).to(ACC) - mean
    dev_min = tl.load(y_one + _plane_offsets(i_min.to(c.dtype), W, sy_h, sy_w, FLAT),
                      mask=c_ok, other=0).to(ACC) - mean
    tl.store(part + 5 * NC, g * SG + dM + dm, mask=c_ok)
    tl.store(part + 6 * NC, g * SD + dM * dev_max + dm * dev_min, mask=c_ok)
    tl.store(part + 7 * NC, g, mask=c_ok)
    tl.store(part + 8 * NC, dM, mask=c_ok)
    tl.store(part + 9 * NC, dm, mask=c_ok)


@triton.jit
def _bn_bwd_write_kernel(
    g_ptr, y_ptr, out_ptr, dy_ptr, dres_ptr, idx_ptr, mean_ptr, invstd_ptr, weight_ptr,
    bias_ptr, part_ptr, coef_ptr,
    C, W, HW, NC, num_c_blocks,
    sg_n, sg_c, sg_h, sg_w, sy_n, sy_c, sy_h, sy_w, so_n, so_c, so_h, so_w,
    sd_n, sd_c, sd_h, sd_w, sdr_n, sdr_c, sdr_h, sdr_w,
    RELU: tl.constexpr, WRITE_DRES: tl.constexpr, ACC: tl.constexpr, FLAT: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
):
    """spem_bn's backward, second pass (reads G, y; writes dy, dresidual): with dx = G g
    (+ dM, dm at the extremes) the gradient reaching BatchNorm's output,
    dy = alpha (dx - k2 - (y - mean) k3) in training, alpha = weight invstd, k2 and k3 per
    channel from _spem_param_grads_kernel; dy = alpha dx in eval (the statistics are
    constants: y is not read, so an infinite y adds nothing); dresidual = G."""
    n, c, hw0 = _program_channels(num_c_blocks, BLOCK_C, BLOCK_HW, WIDE)
    c_ok = c < C
    g_base, y_base, o_base, d_base, dr_base, i_max, i_min = _writing_pass_planes(
        n, c, c_ok, C, idx_ptr, g_ptr, y_ptr, out_ptr, dy_ptr, dres_ptr,
        sg_n, sg_c, sy_n, sy_c, so_n, so_c, sd_n, sd_c, sdr_n, sdr_c)
    alpha, _, mean, _ = _bn_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, c, c_ok,
                                   HAS_WEIGHT, HAS_BIAS, ACC)
    if TRAINING:
        k2 = tl.load(coef_ptr + c, mask=c_ok, other=0)[:, None]
        k3 = tl.load(coef_ptr + C + c, mask=c_ok, other=0)[:, None]
    part = part_ptr + n * C + c
    g = tl.load(part + 7 * NC, mask=c_ok, other=0)
    dM = tl.load(part + 8 * NC, mask=c_ok, other=0)
    dm = tl.load(part + 9 * NC, mask=c_ok, other=0)
    for start in range(0, HW, BLOCK_HW):
        hw = start + hw0
        mask = c_ok[:, None] & (hw < HW)[None, :]
        G = _masked_grad(g_base, o_base, hw, W, sg_h, sg_w, so_h, so_w, mask, RELU, FLAT, ACC)
        dx = _input_grad(G, g, dM, dm, i_max, i_min, hw)
        if TRAINING:
            dev = _load_tile(y_base, hw, W, sy_h, sy_w, mask, FLAT, ACC) - mean[:, None]
            dx = dx - k2 - dev * k3
        _store_tile(d_base, hw, W, sd_h, sd_w, mask, alpha[:, None] * dx, FLAT)
        if WRITE_DRES:
            _store_tile(dr_base, hw, W, sdr_h, sdr_w, mask, G, FLAT)
