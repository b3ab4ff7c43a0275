// CUDA kernels of the SPEM ops (math: spem_math.h, spem_bn_math.h and SPEM.md). Includes no
// torch headers.
//
// One launch per direction, one of two kernels picked by x's layout; every tensor is
// addressed through its own strides, so no input is copied:
// - planes (NCHW and anything else): a group of 32..256 threads owns one plane (n, c),
//   reduces it (warp shuffles, then shared memory across the group's warps) and writes it.
// - channels (channels_last, x.stride(1) == 1): a block owns a tile of channels of one
//   sample; lanes run along the contiguous channels, rows of threads along the positions.
// Both use 16-byte loads and stores (VEC elements) when every tensor's layout and alignment
// allow it, else one element at a time. Ties go to the first position (Extremes::merge is
// order-free); sums reduce in a fixed order. The backward writes per-(n, c) partials, which a
// second, small kernel (param_grads) sums over n into the parameter gradients and over n and
// c into p's, each in a fixed order across many blocks: deterministic, no float atomics.
// spem_bn (BatchNorm first) adds, in the same two layouts: a statistics pass (training) and a
// per-channel finalisation before the forward (which normalises as it loads), and splits the
// backward into a reduction pass and a writing pass around the parameter gradients.
#include "spem_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <utility>

#include "spem_bn_math.h"
#include "spem_math.h"

namespace spem_native {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Round;  // the compute value rounded once to the storage type
template <>
struct Round<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Round<double> {
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <>
struct Round<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Round<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Offset of row-major position p in a plane; flat planes (h stride = W * w stride) skip the
// division. Positions fit in int32 (the bindings check H * W); the loops that walk them
// count in int64 (q), so that q + step cannot overflow near the end of a plane of 2^31 - 1.
__device__ __forceinline__ int64_t pos_offset(const Strides& s, int32_t p, int32_t W,
                                              bool flat) {
  if (flat) return p * s.w;
  const uint32_t h = uint32_t(p) / uint32_t(W);  // unsigned: the cheaper division
  return int64_t(h) * s.h + int64_t(uint32_t(p) - h * uint32_t(W)) * s.w;
}

__device__ __forceinline__ int64_t offset(const Strides& s, int64_t n, int64_t c, int32_t p,
                                          int32_t W, bool flat) {
  return n * s.n + c * s.c + pos_offset(s, p, W, flat);
}

// VEC consecutive elements at q (one 16-byte access when VEC > 1).
template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void load(const T* q, Acc (&v)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(q);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = to_acc(pk.v[j]);
}

template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void store(T* q, const Acc (&v)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = Round<T>::from(v[j]);
  *reinterpret_cast<Pack<T, VEC>*>(q) = pk;
}

template <typename Acc>
__device__ __forceinline__ Extremes<Acc> shfl_xor(const Extremes<Acc>& e, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, e.max, lane_mask),
          __shfl_xor_sync(0xffffffffu, e.min, lane_mask),
          __shfl_xor_sync(0xffffffffu, e.imax, lane_mask),
          __shfl_xor_sync(0xffffffffu, e.imin, lane_mask),
          __shfl_xor_sync(0xffffffffu, e.nan, lane_mask)};
}

__device__ __forceinline__ float shfl_xor(float v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}
__device__ __forceinline__ double shfl_xor(double v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

// Two sums reduced together (spem_bn's backward: sum G and sum G (y - mean)).
template <typename Acc>
struct Pair {
  Acc a, b;
};

template <typename Acc>
__device__ __forceinline__ Pair<Acc> shfl_xor(const Pair<Acc>& v, int m) {
  return {shfl_xor(v.a, m), shfl_xor(v.b, m)};
}

__device__ __forceinline__ void combine(float& a, float b) { a += b; }
__device__ __forceinline__ void combine(double& a, double b) { a += b; }
template <typename Acc>
__device__ __forceinline__ void combine(Extremes<Acc>& a, const Extremes<Acc>& b) {
  a.merge(b);
}
template <typename Acc>
__device__ __forceinline__ void combine(Pair<Acc>& a, const Pair<Acc>& b) {
  a.a += b.a;
  a.b += b.b;
}

// Reduces v over the group of `group` threads (a multiple of 32) that owns a plane; every
// thread of the group gets the result. Fixed order: warp butterfly, then warps in order.
template <typename V>
__device__ V group_reduce(V v, int group) {
  __shared__ V warp_value[kWarps];
#pragma unroll
  for (int m = 16; m > 0; m /= 2) combine(v, shfl_xor(v, m));
  if (group == 32) return v;
  const int warp = threadIdx.x / 32, warps = group / 32, first = warp / warps * warps;
  if (threadIdx.x % 32 == 0) warp_value[warp] = v;
  __syncthreads();
  v = warp_value[first];
  for (int k = 1; k < warps; ++k) combine(v, warp_value[first + k]);
  return v;
}

// Reduces v over the rows of a channel tile: lanes with the same threadIdx.x % LC hold the
// same channels. Returns, for thread t < LC * VEC, channel t's value (others: undefined).
template <int LC, int VEC, typename V>
__device__ V tile_reduce(V (&v)[VEC], V* shared /* [kWarps][LC * VEC] */) {
#pragma unroll
  for (int j = 0; j < VEC; ++j)
#pragma unroll
    for (int m = 16; m >= LC; m /= 2) combine(v[j], shfl_xor(v[j], m));
  const int warp = threadIdx.x / 32, lc = threadIdx.x % LC;
  if (threadIdx.x % 32 < LC)
#pragma unroll
    for (int j = 0; j < VEC; ++j) shared[warp * LC * VEC + lc * VEC + j] = v[j];
  __syncthreads();
  V r = shared[threadIdx.x % (LC * VEC)];
  if (threadIdx.x < LC * VEC)
    for (int w = 1; w < kWarps; ++w) combine(r, shared[w * LC * VEC + threadIdx.x]);
  return r;
}

// What a thread of a planes kernel works on: a group of `group` threads per plane (n, c);
// `lane` is its place in the group. A block owns kThreads / group consecutive channels of
// one sample, so that a thread finds its plane with a 32-bit division (64-bit ones are
// subroutine calls, which spill); past the sample's last channel it is not `active` (but
// still joins the block's barriers). The grid: pass_blocks.
struct PlaneTask {
  int lane;
  int64_t plane, n, c;
  bool active;
};

__device__ __forceinline__ PlaneTask plane_task(int64_t C, int group) {
  const int per_block = kThreads / group, shift = __ffs(per_block) - 1;  // a power of two
  // fits 32 bits: there are at least as many blocks (bindings' check_grid)
  const unsigned blocks_per_sample = unsigned((C + per_block - 1) >> shift);
  const unsigned n = blockIdx.x / blocks_per_sample;
  const unsigned lane = threadIdx.x & unsigned(group - 1),
                 slot = threadIdx.x >> (__ffs(group) - 1);
  const int64_t c = (int64_t(blockIdx.x - n * blocks_per_sample) << shift) + slot;
  const bool active = c < C;
  return {int(lane), int64_t(n) * C + c, n, active ? c : 0, active};
}

// What a thread of a channels kernel works on: a block per tile of LC * VEC channels from c0
// of sample n; the thread's lane lc holds the VEC channels from c, on its row of positions.
// (VEC > 1 needs C % VEC == 0: all of a lane's channels are in range or none.)
struct TileTask {
  int64_t n, c0;
  int lc, row;
  int64_t c;
};

template <int LC, int VEC>
__device__ __forceinline__ TileTask tile_task(int64_t C) {
  constexpr int kTile = LC * VEC;
  const unsigned tiles = unsigned((C + kTile - 1) / kTile);  // no more than blocks
  const unsigned n = blockIdx.x / tiles;
  const int64_t c0 = int64_t(blockIdx.x - n * tiles) * kTile;
  const int lc = threadIdx.x % LC;
  return {n, c0, lc, int(threadIdx.x / LC), c0 + lc * VEC};
}

template <typename Acc>
__device__ Acc finish_plane(const Extremes<Acc>& e, const Acc* const prm[5], int64_t n,
                            int64_t c, int64_t C, Acc* stats, int32_t* idx, bool write) {
  const Acc M = e.nan ? Acc(NAN) : e.max, m = e.nan ? Acc(NAN) : e.min;
  if (write) {
    const int64_t nc = n * C + c;
    stats[2 * nc] = M, stats[2 * nc + 1] = m;
    idx[2 * nc] = e.imax, idx[2 * nc + 1] = e.imin;
  }
  const Gate<Acc> t = plane_gate(M, m, load_params(prm[0], prm[1], prm[2], prm[3], prm[4], c));
  return t.s1 * t.s2;
}

// spem_bn: y = y alpha + beta, with the channel of element j in alpha[j], beta[j] (spem: as is).
template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void normalise(const ForwardArgs<T, Acc>& a, const Acc (&alpha)[VEC],
                                          const Acc (&beta)[VEC], Acc (&y)[VEC]) {
  if (a.affine != nullptr)
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = y[j] * alpha[j] + beta[j];
}

// out = relu?(g y + residual) for VEC elements.
template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void write_out(const ForwardArgs<T, Acc>& a, const Acc (&y)[VEC],
                                          const Acc (&g)[VEC], int64_t ro, int64_t oo) {
  Acc o[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) o[j] = g[j] * y[j];
  if (a.residual != nullptr) {
    Acc r[VEC];
    load<VEC>(a.residual + ro, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] += r[j];
  }
  if (a.relu)
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = o[j] < Acc(0) ? Acc(0) : o[j];  // keeps NaN
  store<VEC>(a.out + oo, o);
}

template <typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_planes(const ForwardArgs<T, Acc> a, int group, bool flat) {
  flat |= VEC > 1;  // vector loads run on flat planes only (choose_layout): no division
  const auto [lane, plane, n, c, active] = plane_task(a.C, group);
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W, step = group * VEC;
  Acc alpha[VEC], beta[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    alpha[j] = a.affine != nullptr ? a.affine[c] : Acc(1),
    beta[j] = a.affine != nullptr ? a.affine[a.C + c] : Acc(0);
  Extremes<Acc> e = Extremes<Acc>::empty();
  if (active)
    for (int64_t q = lane * VEC; q < HW; q += step) {
      const int32_t p = int32_t(q);
      Acc y[VEC];
      load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
      normalise<VEC>(a, alpha, beta, y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) e.add(y[j], p + j);
    }
  e = group_reduce(e, group);
  const Acc* const prm[5] = {a.w1, a.b1, a.w2, a.b2, a.p};
  if (!active) return;  // no barrier follows
  const Acc gate =
      finish_plane(e, prm, n, c, a.C, a.stats, a.idx, lane == 0 && a.stats != nullptr);
  Acc g[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) g[j] = gate;
  for (int64_t q = lane * VEC; q < HW; q += step) {
    const int32_t p = int32_t(q);
    Acc y[VEC];
    load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
    normalise<VEC>(a, alpha, beta, y);
    write_out<VEC>(a, y, g, offset(a.sr, n, c, p, W, flat), offset(a.so, n, c, p, W, flat));
  }
}

template <typename T, typename Acc, int VEC, int LC>
__global__ void __launch_bounds__(kThreads)
    forward_channels(const ForwardArgs<T, Acc> a, bool flat) {
  constexpr int kTile = LC * VEC, kRows = kThreads / LC;
  __shared__ Extremes<Acc> partial[kWarps * kTile];
  __shared__ Acc gate[kTile];
  const auto [n, c0, lc, row, c] = tile_task<LC, VEC>(a.C);
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W;
  Acc alpha[VEC], beta[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const bool norm = a.affine != nullptr && c < a.C;
    alpha[j] = norm ? a.affine[c + j] : Acc(1), beta[j] = norm ? a.affine[a.C + c + j] : Acc(0);
  }
  Extremes<Acc> e[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) e[j] = Extremes<Acc>::empty();
  if (c < a.C)
    for (int64_t q = row; q < HW; q += kRows) {
      const int32_t p = int32_t(q);
      Acc y[VEC];
      load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
      normalise<VEC>(a, alpha, beta, y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) e[j].add(y[j], p);
    }
  const Extremes<Acc> mine = tile_reduce<LC, VEC>(e, partial);
  const Acc* const prm[5] = {a.w1, a.b1, a.w2, a.b2, a.p};
  if (threadIdx.x < kTile && c0 + threadIdx.x < a.C)
    gate[threadIdx.x] =
        finish_plane(mine, prm, n, c0 + threadIdx.x, a.C, a.stats, a.idx, a.stats != nullptr);
  __syncthreads();
  if (c >= a.C) return;
  Acc g[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) g[j] = gate[lc * VEC + j];
  for (int64_t q = row; q < HW; q += kRows) {
    const int32_t p = int32_t(q);
    Acc y[VEC];
    load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
    normalise<VEC>(a, alpha, beta, y);
    write_out<VEC>(a, y, g, offset(a.sr, n, c, p, W, flat), offset(a.so, n, c, p, W, flat));
  }
}

// --- backward ---

// G = dL/dout for VEC elements, zeroed where the ReLU was off (out <= 0).
template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void masked_grad(const BackwardArgs<T, Acc>& a, int64_t go,
                                            int64_t oo, Acc (&G)[VEC]) {
  load<VEC>(a.grad + go, G);
  if (a.relu) {
    Acc o[VEC];
    load<VEC>(a.out + oo, o);
#pragma unroll
    for (int j = 0; j < VEC; ++j) G[j] = o[j] <= Acc(0) ? Acc(0) : G[j];  // as torch: NaN passes
  }
}

template <typename T, typename Acc>
__device__ PlaneGrads<Acc> plane_backward(const BackwardArgs<T, Acc>& a, int64_t n, int64_t c,
                                          Acc S, bool write_partials) {
  const int64_t nc = n * a.C + c;
  const PlaneGrads<Acc> pg = plane_grads(S, a.stats[2 * nc], a.stats[2 * nc + 1],
                                         load_params(a.w1, a.b1, a.w2, a.b2, a.p, c));
  if (write_partials)  // (kPartials, N, C): one (N, C) plane per partial
#pragma unroll
    for (int k = 0; k < kPartials; ++k) a.partials[k * a.N * a.C + nc] = pg.part[k];
  return pg;
}

// What one plane's backward needs of its forward, per element j of a VEC group: the gate,
// dM and dm (spem_math.h's PlaneGrads) and the positions of the max and the min.
template <typename Acc, int VEC>
struct PlaneCoefs {
  Acc g[VEC], dM[VEC], dm[VEC];
  int32_t imax[VEC], imin[VEC];
};

// d = G g, plus dM at the max's position and dm at the min's: the gradient reaching x.
template <int VEC, typename Acc>
__device__ __forceinline__ void input_grad(const PlaneCoefs<Acc, VEC>& k, const Acc (&G)[VEC],
                                           const int32_t (&pos)[VEC], Acc (&d)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    d[j] = G[j] * k.g[j];
    if (pos[j] == k.imax[j]) d[j] += k.dM[j];
    if (pos[j] == k.imin[j]) d[j] += k.dm[j];
  }
}

// dx = G g (+ dM, dm at the extremes); dres = G.
template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void write_input_grads(const BackwardArgs<T, Acc>& a,
                                                  const PlaneCoefs<Acc, VEC>& k,
                                                  const Acc (&G)[VEC], const int32_t (&pos)[VEC],
                                                  int64_t dx_off, int64_t dres_off) {
  Acc d[VEC];
  input_grad<VEC>(k, G, pos, d);
  store<VEC>(a.dx + dx_off, d);
  if (a.dres != nullptr) store<VEC>(a.dres + dres_off, G);
}

template <typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_planes(const BackwardArgs<T, Acc> a, int group, bool flat) {
  flat |= VEC > 1;  // vector loads run on flat planes only (choose_layout): no division
  const auto [lane, plane, n, c, active] = plane_task(a.C, group);
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W, step = group * VEC;
  Acc S = 0;
  if (active)
    for (int64_t q = lane * VEC; q < HW; q += step) {
      const int32_t p = int32_t(q);
      Acc G[VEC], y[VEC];
      masked_grad<VEC>(a, offset(a.sg, n, c, p, W, flat), offset(a.so, n, c, p, W, flat), G);
      load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) S += G[j] * y[j];
    }
  S = group_reduce(S, group);
  if (active) {
    const PlaneGrads<Acc> pg = plane_backward(a, n, c, S, lane == 0);
    PlaneCoefs<Acc, VEC> k;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      k.g[j] = pg.g, k.dM[j] = pg.dM, k.dm[j] = pg.dm;
      k.imax[j] = a.idx[2 * (n * a.C + c)], k.imin[j] = a.idx[2 * (n * a.C + c) + 1];
    }
    for (int64_t q = lane * VEC; q < HW; q += step) {
      const int32_t p = int32_t(q);
      Acc G[VEC];
      int32_t pos[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) pos[j] = p + j;
      masked_grad<VEC>(a, offset(a.sg, n, c, p, W, flat), offset(a.so, n, c, p, W, flat), G);
      write_input_grads<VEC>(a, k, G, pos, offset(a.sd, n, c, p, W, flat),
                             offset(a.sdr, n, c, p, W, flat));
    }
  }
}

template <typename T, typename Acc, int VEC, int LC>
__global__ void __launch_bounds__(kThreads)
    backward_channels(const BackwardArgs<T, Acc> a, bool flat) {
  constexpr int kTile = LC * VEC, kRows = kThreads / LC;
  __shared__ Acc partial[kWarps * kTile];
  __shared__ Acc gate[kTile], dmax[kTile], dmin[kTile];
  __shared__ int32_t pmax[kTile], pmin[kTile];
  const auto [n, c0, lc, row, c] = tile_task<LC, VEC>(a.C);
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W;
  Acc S[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) S[j] = 0;
  if (c < a.C)
    for (int64_t q = row; q < HW; q += kRows) {
      const int32_t p = int32_t(q);
      Acc G[VEC], y[VEC];
      masked_grad<VEC>(a, offset(a.sg, n, c, p, W, flat), offset(a.so, n, c, p, W, flat), G);
      load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) S[j] += G[j] * y[j];
    }
  const Acc mine = tile_reduce<LC, VEC>(S, partial);
  const int64_t ct = c0 + threadIdx.x;
  if (threadIdx.x < kTile && ct < a.C) {
    const PlaneGrads<Acc> pg = plane_backward(a, n, ct, mine, true);
    gate[threadIdx.x] = pg.g, dmax[threadIdx.x] = pg.dM, dmin[threadIdx.x] = pg.dm;
    pmax[threadIdx.x] = a.idx[2 * (n * a.C + ct)];
    pmin[threadIdx.x] = a.idx[2 * (n * a.C + ct) + 1];
  }
  __syncthreads();
  if (c < a.C) {
    PlaneCoefs<Acc, VEC> k;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int t = lc * VEC + j;
      k.g[j] = gate[t], k.dM[j] = dmax[t], k.dm[j] = dmin[t];
      k.imax[j] = pmax[t], k.imin[j] = pmin[t];
    }
    for (int64_t q = row; q < HW; q += kRows) {
      const int32_t p = int32_t(q);
      Acc G[VEC];
      int32_t pos[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) pos[j] = p;
      masked_grad<VEC>(a, offset(a.sg, n, c, p, W, flat), offset(a.so, n, c, p, W, flat), G);
      write_input_grads<VEC>(a, k, G, pos, offset(a.sd, n, c, p, W, flat),
                             offset(a.sdr, n, c, p, W, flat));
    }
  }
}

// The parameter gradients from the backward's partials, (kPartials, N, C): blocks
// 0 .. 4 * channel_blocks - 1 each sum kSumChannels channels of one of the first four planes
// over n (dw1, db1, dw2, db2: a thread per channel and row group, the groups combined in
// order); spem_bn adds 2 * channel_blocks blocks for the plane sums of dx and dx (y - mean)
// (dbias, dweight and the writing pass's k2, k3: spem_bn_math.h); the last block sums the
// fifth plane over n and c into D and forms p's gradient (spem_math.h). Every sum has a
// fixed order: two runs give bitwise equal gradients.
constexpr int kSumChannels = 32;
constexpr int kSumRows = kThreads / kSumChannels;

template <typename T, typename Acc>
__device__ void store_bn_sum(const BackwardArgs<T, Acc>& a, int64_t plane, int64_t c, Acc s) {
  const Acc count = Acc(a.N) * Acc(a.H * a.W);
  if (plane == kBnSumDx)
    bn_bias_grads(s, count, a.training, &a.dbias[c], &a.coef[c]);
  else
    bn_weight_grads(s, a.invstd[c], count, a.training, &a.dweight[c], &a.coef[a.C + c]);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) param_grads(const BackwardArgs<T, Acc> a) {
  const int64_t NC = a.N * a.C, channel_blocks = (a.C + kSumChannels - 1) / kSumChannels;
  const int64_t sums = a.mean != nullptr ? 6 : 4;
  if (blockIdx.x < sums * channel_blocks) {
    __shared__ Acc rows[kSumRows][kSumChannels];
    const unsigned which = blockIdx.x / unsigned(channel_blocks);
    const int64_t plane = which < 4 ? which : which + 1;  // plane 4 is p's, summed below
    const int lane = threadIdx.x % kSumChannels, row = threadIdx.x / kSumChannels;
    const int64_t c =
        int64_t(blockIdx.x - which * unsigned(channel_blocks)) * kSumChannels + lane;
    const Acc* part = a.partials + plane * NC;
    Acc s = 0;
    if (c < a.C)
      for (int64_t n = row; n < a.N; n += kSumRows) s += part[n * a.C + c];
    rows[row][lane] = s;
    __syncthreads();
    if (row == 0 && c < a.C) {
      for (int r = 1; r < kSumRows; ++r) s += rows[r][lane];
      Acc* const grads[4] = {a.dw1, a.db1, a.dw2, a.db2};
      if (plane < 4)
        grads[plane][c] = s;
      else
        store_bn_sum(a, plane, c, s);
    }
    return;
  }
  const Acc* part = a.partials + 4 * NC;
  Acc D = 0;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < NC; k += kThreads) D += part[k];
  D = group_reduce(D, kThreads);
  if (threadIdx.x == 0) p_gradient(a.p, D, a.dp);
}

// --- spem_bn: BatchNorm's statistics, and the backward's two passes ---

// Each plane's mean and M2 into plane_stats (2, N, C): a group of threads per plane (as
// forward_planes), two sweeps (the second reads the plane again, from cache).
template <typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_stats_planes(const BnStatsArgs<T, Acc> a, int group, bool flat) {
  flat |= VEC > 1;  // vector loads run on flat planes only (choose_layout): no division
  const auto [lane, plane, n, c, active] = plane_task(a.C, group);
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W, step = group * VEC;
  Acc sum = 0;
  if (active)
    for (int64_t q = lane * VEC; q < HW; q += step) {
      Acc y[VEC];
      load<VEC>(a.y + offset(a.sy, n, c, int32_t(q), W, flat), y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += y[j];
    }
  const Acc mean = group_reduce(sum, group) / Acc(HW);
  Acc m2 = 0;
  if (active)
    for (int64_t q = lane * VEC; q < HW; q += step) {
      Acc y[VEC];
      load<VEC>(a.y + offset(a.sy, n, c, int32_t(q), W, flat), y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m2 += (y[j] - mean) * (y[j] - mean);
    }
  __syncthreads();  // group_reduce's shared values of the sum are read by now
  m2 = group_reduce(m2, group);
  if (active && lane == 0) {
    a.plane_stats[plane] = mean;
    a.plane_stats[a.N * a.C + plane] = m2;
  }
}

// The same for channels_last: a block per tile of channels of one sample (as forward_channels).
template <typename T, typename Acc, int VEC, int LC>
__global__ void __launch_bounds__(kThreads)
    bn_stats_channels(const BnStatsArgs<T, Acc> a, bool flat) {
  constexpr int kTile = LC * VEC, kRows = kThreads / LC;
  __shared__ Acc partial[kWarps * kTile];
  __shared__ Acc tile_mean[kTile];
  const auto [n, c0, lc, row, c] = tile_task<LC, VEC>(a.C);
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W;
  Acc sum[VEC], m2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sum[j] = m2[j] = 0;
  if (c < a.C)
    for (int64_t q = row; q < HW; q += kRows) {
      Acc y[VEC];
      load<VEC>(a.y + offset(a.sy, n, c, int32_t(q), W, flat), y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[j] += y[j];
    }
  const Acc total = tile_reduce<LC, VEC>(sum, partial);
  if (threadIdx.x < kTile) tile_mean[threadIdx.x] = total / Acc(HW);
  __syncthreads();
  Acc mean[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = tile_mean[lc * VEC + j];
  if (c < a.C)
    for (int64_t q = row; q < HW; q += kRows) {
      Acc y[VEC];
      load<VEC>(a.y + offset(a.sy, n, c, int32_t(q), W, flat), y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m2[j] += (y[j] - mean[j]) * (y[j] - mean[j]);
    }
  const Acc m2_total = tile_reduce<LC, VEC>(m2, partial);  // (its barrier follows the reads
                                                           // of the first: tile_mean's)
  const int64_t ct = c0 + threadIdx.x;
  if (threadIdx.x < kTile && ct < a.C) {
    a.plane_stats[n * a.C + ct] = tile_mean[threadIdx.x];
    a.plane_stats[(a.N + n) * a.C + ct] = m2_total;
  }
}

// A thread per channel: mean, invstd (and the running statistics' update), and the forward's
// alpha, beta (spem_bn_math.h).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) bn_finalize(const BnStatsArgs<T, Acc> a) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.C) return;
  finalize_channel(a.plane_stats, a.plane_stats + a.N * a.C, a.N, a.C, a.H * a.W, c, a.training,
                   a.momentum, a.eps, a.running_mean, a.running_var, a.mean, a.invstd);
  const ChannelNorm<Acc> k = channel_norm(a.mean, a.invstd, a.weight, a.bias, c);
  a.affine[c] = k.alpha;
  a.affine[a.C + c] = k.beta;
}

// One plane's end of the reduction pass, from SG = sum G and SD = sum G (y - mean): the SPEM
// partials, the plane sums of dx and dx (y - mean), and g, dM, dm (spem_bn_math.h).
template <typename T, typename Acc>
__device__ void bn_plane_backward(const BackwardArgs<T, Acc>& a, int64_t n, int64_t c, Acc SG,
                                  Acc SD, bool flat) {
  const ChannelNorm<Acc> k = channel_norm(a.mean, a.invstd, a.weight, a.bias, c);
  const PlaneGrads<Acc> pg = plane_backward(a, n, c, bn_spem_S(k.alpha, k.bias, SG, SD), true);
  const int64_t nc = n * a.C + c, NC = a.N * a.C;
  const int32_t imax = a.idx[2 * nc], imin = a.idx[2 * nc + 1];
  const Acc dev_max = to_acc(a.x[offset(a.sx, n, c, imax, int32_t(a.W), flat)]) - k.mean;
  const Acc dev_min = to_acc(a.x[offset(a.sx, n, c, imin, int32_t(a.W), flat)]) - k.mean;
  bn_plane_sums(pg, SG, SD, dev_max, dev_min, &a.partials[kBnSumDx * NC + nc],
                &a.partials[kBnSumDxDev * NC + nc]);
  a.partials[kBnGate * NC + nc] = pg.g;
  a.partials[(kBnGate + 1) * NC + nc] = pg.dM;
  a.partials[(kBnGate + 2) * NC + nc] = pg.dm;
}

template <typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_reduce_planes(const BackwardArgs<T, Acc> a, int group, bool flat) {
  flat |= VEC > 1;  // vector loads run on flat planes only (choose_layout): no division
  const auto [lane, plane, n, c, active] = plane_task(a.C, group);
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W, step = group * VEC;
  const Acc mean = a.mean[c];
  Pair<Acc> s{0, 0};
  if (active)
    for (int64_t q = lane * VEC; q < HW; q += step) {
      const int32_t p = int32_t(q);
      Acc G[VEC], y[VEC];
      masked_grad<VEC>(a, offset(a.sg, n, c, p, W, flat), offset(a.so, n, c, p, W, flat), G);
      load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s.a += G[j], s.b += G[j] * (y[j] - mean);
    }
  s = group_reduce(s, group);
  if (active && lane == 0) bn_plane_backward(a, n, c, s.a, s.b, flat);
}

template <typename T, typename Acc, int VEC, int LC>
__global__ void __launch_bounds__(kThreads)
    bn_reduce_channels(const BackwardArgs<T, Acc> a, bool flat) {
  constexpr int kTile = LC * VEC, kRows = kThreads / LC;
  __shared__ Pair<Acc> partial[kWarps * kTile];
  const auto [n, c0, lc, row, c] = tile_task<LC, VEC>(a.C);
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W;
  Pair<Acc> s[VEC];
  Acc mean[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s[j] = {0, 0}, mean[j] = c < a.C ? a.mean[c + j] : Acc(0);
  if (c < a.C)
    for (int64_t q = row; q < HW; q += kRows) {
      const int32_t p = int32_t(q);
      Acc G[VEC], y[VEC];
      masked_grad<VEC>(a, offset(a.sg, n, c, p, W, flat), offset(a.so, n, c, p, W, flat), G);
      load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[j].a += G[j], s[j].b += G[j] * (y[j] - mean[j]);
    }
  const Pair<Acc> mine = tile_reduce<LC, VEC>(s, partial);
  const int64_t ct = c0 + threadIdx.x;
  if (threadIdx.x < kTile && ct < a.C) bn_plane_backward(a, n, ct, mine.a, mine.b, flat);
}

// The writing pass's coefficients of channel c, for element j of a VEC group.
template <typename T, typename Acc, int VEC>
__device__ __forceinline__ void load_write_coefs(const BackwardArgs<T, Acc>& a, int64_t n,
                                                 int64_t c, int j, PlaneCoefs<Acc, VEC>& k,
                                                 Acc (&alpha)[VEC], Acc (&mean)[VEC],
                                                 Acc (&k2)[VEC], Acc (&k3)[VEC]) {
  const int64_t nc = n * a.C + c, NC = a.N * a.C;
  k.g[j] = a.partials[kBnGate * NC + nc];
  k.dM[j] = a.partials[(kBnGate + 1) * NC + nc];
  k.dm[j] = a.partials[(kBnGate + 2) * NC + nc];
  k.imax[j] = a.idx[2 * nc], k.imin[j] = a.idx[2 * nc + 1];
  const ChannelNorm<Acc> norm = channel_norm(a.mean, a.invstd, a.weight, a.bias, c);
  alpha[j] = norm.alpha, mean[j] = norm.mean, k2[j] = a.coef[c], k3[j] = a.coef[a.C + c];
}

// dy (bn_input_grad) from dx = G g (+ dM, dm at the extremes); dres = G.
template <int VEC, typename T, typename Acc>
__device__ __forceinline__ void write_bn_input_grads(const BackwardArgs<T, Acc>& a,
                                                     const PlaneCoefs<Acc, VEC>& k,
                                                     const Acc (&alpha)[VEC],
                                                     const Acc (&mean)[VEC],
                                                     const Acc (&k2)[VEC], const Acc (&k3)[VEC],
                                                     const Acc (&G)[VEC], const Acc (&y)[VEC],
                                                     const int32_t (&pos)[VEC], int64_t dy_off,
                                                     int64_t dres_off) {
  Acc d[VEC];
  input_grad<VEC>(k, G, pos, d);
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    d[j] = bn_input_grad(d[j], y[j], mean[j], alpha[j], k2[j], k3[j]);
  store<VEC>(a.dx + dy_off, d);
  if (a.dres != nullptr) store<VEC>(a.dres + dres_off, G);
}

template <typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_write_planes(const BackwardArgs<T, Acc> a, int group, bool flat) {
  flat |= VEC > 1;  // vector loads run on flat planes only (choose_layout): no division
  const auto [lane, plane, n, c, active] = plane_task(a.C, group);
  if (!active) return;  // no barrier follows
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W, step = group * VEC;
  PlaneCoefs<Acc, VEC> k;
  Acc alpha[VEC], mean[VEC], k2[VEC], k3[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    load_write_coefs<T, Acc, VEC>(a, n, c, j, k, alpha, mean, k2, k3);
  for (int64_t q = lane * VEC; q < HW; q += step) {
    const int32_t p = int32_t(q);
    Acc G[VEC], y[VEC];
    int32_t pos[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) pos[j] = p + j;
    masked_grad<VEC>(a, offset(a.sg, n, c, p, W, flat), offset(a.so, n, c, p, W, flat), G);
    load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
    write_bn_input_grads<VEC>(a, k, alpha, mean, k2, k3, G, y, pos,
                              offset(a.sd, n, c, p, W, flat), offset(a.sdr, n, c, p, W, flat));
  }
}

template <typename T, typename Acc, int VEC, int LC>
__global__ void __launch_bounds__(kThreads)
    bn_write_channels(const BackwardArgs<T, Acc> a, bool flat) {
  constexpr int kRows = kThreads / LC;
  const auto [n, c0, lc, row, c] = tile_task<LC, VEC>(a.C);
  if (c >= a.C) return;  // no barrier follows
  const int32_t W = a.W;
  const int64_t HW = a.H * a.W;
  PlaneCoefs<Acc, VEC> k;
  Acc alpha[VEC], mean[VEC], k2[VEC], k3[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    load_write_coefs<T, Acc, VEC>(a, n, c + j, j, k, alpha, mean, k2, k3);
  for (int64_t q = row; q < HW; q += kRows) {
    const int32_t p = int32_t(q);
    Acc G[VEC], y[VEC];
    int32_t pos[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) pos[j] = p;
    masked_grad<VEC>(a, offset(a.sg, n, c, p, W, flat), offset(a.so, n, c, p, W, flat), G);
    load<VEC>(a.x + offset(a.sx, n, c, p, W, flat), y);
    write_bn_input_grads<VEC>(a, k, alpha, mean, k2, k3, G, y, pos,
                              offset(a.sd, n, c, p, W, flat), offset(a.sdr, n, c, p, W, flat));
  }
}

// --- launch configuration ---

bool is_flat(const Strides& s, int64_t H, int64_t W) { return H == 1 || s.h == W * s.w; }

// Whether VEC consecutive elements along `inner` (the w or c stride, which must be 1) start
// 16-byte aligned at every position each kernel visits.
bool vectorizable(const void* data, int64_t inner_stride, std::initializer_list<int64_t> outer,
                  int vec) {
  if (data == nullptr) return true;
  if (inner_stride != 1 || reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  for (int64_t o : outer)
    if (o % vec != 0) return false;
  return true;
}

struct Layout {
  bool by_channel, flat, vec;
};

// Planes: positions contiguous (flat planes, w stride 1) and H*W a multiple of VEC.
// Channels: channels contiguous (c stride 1) and C a multiple of VEC.
template <typename T>
Layout choose_layout(std::initializer_list<std::pair<const void*, Strides>> tensors, int64_t C,
                     int64_t H, int64_t W, bool x_by_channel) {
  constexpr int vec = 16 / sizeof(T);
  Layout l{x_by_channel, true, true};
  for (const auto& [data, s] : tensors) {
    if (data == nullptr) continue;
    l.flat = l.flat && is_flat(s, H, W);
    l.vec = l.vec && (x_by_channel ? vectorizable(data, s.c, {s.n, s.h, s.w}, vec)
                                   : vectorizable(data, s.w, {s.n, s.c}, vec));
  }
  l.vec = l.vec && (x_by_channel ? C % vec == 0 : l.flat && (H * W) % vec == 0);
  return l;
}

// Threads per plane: about four VEC-loads each, 32..kThreads.
int plane_group(int64_t HW, int vec) {
  int group = 32;
  while (group < kThreads && int64_t(group) * vec * 4 < HW) group *= 2;
  return group;
}

// Whether x's layout has the channels kernels run (channels innermost).
bool by_channel(const Strides& sx, int64_t C) { return sx.c == 1 && C > 1; }

// The blocks of a pass over N x C planes of H x W: one per kThreads / group channels of one
// sample (planes kernels), or per tile of lanes * vec channels of one sample (channels
// kernels).
int64_t pass_blocks(bool channels, int vec, int lanes, int64_t N, int64_t C, int64_t H,
                    int64_t W) {
  if (channels) {
    const int64_t tile = int64_t(lanes) * vec;
    return N * ((C + tile - 1) / tile);
  }
  const int64_t planes_per_block = kThreads / plane_group(H * W, vec);
  return N * ((C + planes_per_block - 1) / planes_per_block);  // as plane_task takes them
}

// param_grads: `sums` per-channel sums of kSumChannels channels a block, and p's block.
int64_t param_grads_blocks(int64_t sums, int64_t C) {
  return sums * ((C + kSumChannels - 1) / kSumChannels) + 1;
}

int64_t finalize_blocks(int64_t C) { return (C + kThreads - 1) / kThreads; }

template <typename T>
struct Same {
  using type = T;
};

// One launch of kThreads-thread blocks. A grid larger than a launch takes fails here, before
// anything runs, rather than being cut to 32 bits (the bindings check every shape earlier,
// with largest_grid, to name it in the error).
template <typename... Params>
cudaError_t launch_kernel(void (*kernel)(Params...), int64_t blocks, cudaStream_t stream,
                          typename Same<Params>::type... args) {
  if (blocks < 1 || blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  void* params[] = {&args...};
  return cudaLaunchKernel(kernel, dim3(unsigned(blocks)), dim3(kThreads), params, 0, stream);
}

// A pass's two kernels, Kernels::planes<VEC> and Kernels::channels<VEC, LC>: VEC-element
// (16-byte) accesses over tiles of 8 lanes where the layout allows them, else one element
// at a time over 32 lanes; the planes or the channels kernel as x's layout says.
template <typename Kernels, typename T, typename Args>
cudaError_t launch_pass(const Args& a, const Layout& l, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = l.vec ? kVec : 1, lanes = l.vec ? 8 : 32;
  const int64_t blocks = pass_blocks(l.by_channel, vec, lanes, a.N, a.C, a.H, a.W);
  if (l.by_channel)
    return l.vec
               ? launch_kernel(Kernels::template channels<kVec, 8>(), blocks, stream, a, l.flat)
               : launch_kernel(Kernels::template channels<1, 32>(), blocks, stream, a, l.flat);
  const int group = plane_group(a.H * a.W, vec);
  return l.vec
             ? launch_kernel(Kernels::template planes<kVec>(), blocks, stream, a, group, l.flat)
             : launch_kernel(Kernels::template planes<1>(), blocks, stream, a, group, l.flat);
}

// Each pass's kernels by layout and vector width, for launch_pass: a function template cannot
// be a template argument, so each pass names its planes and channels kernels once here.
#define SPEM_PASS_KERNELS(Name, planes_kernel, channels_kernel) \
  template <typename T, typename Acc> \
  struct Name { \
    template <int VEC> \
    static auto planes() { \
      return planes_kernel<T, Acc, VEC>; \
    } \
    template <int VEC, int LC> \
    static auto channels() { \
      return channels_kernel<T, Acc, VEC, LC>; \
    } \
  };
SPEM_PASS_KERNELS(ForwardKernels, forward_planes, forward_channels)
SPEM_PASS_KERNELS(BackwardKernels, backward_planes, backward_channels)
SPEM_PASS_KERNELS(BnStatsKernels, bn_stats_planes, bn_stats_channels)
SPEM_PASS_KERNELS(BnReduceKernels, bn_reduce_planes, bn_reduce_channels)
SPEM_PASS_KERNELS(BnWriteKernels, bn_write_planes, bn_write_channels)
#undef SPEM_PASS_KERNELS

// The layout of a backward pass: every tensor it reads or writes.
template <typename T, typename Acc>
Layout backward_layout(const BackwardArgs<T, Acc>& a) {
  return choose_layout<T>({{a.grad, a.sg},
                           {a.x, a.sx},
                           {a.relu ? a.out : nullptr, a.so},
                           {a.dx, a.sd},
                           {a.dres, a.sdr}},
                          a.C, a.H, a.W, by_channel(a.sx, a.C));
}

}  // namespace

int64_t largest_grid(const Strides& sx, int64_t N, int64_t C, int64_t H, int64_t W,
                     int element_bytes) {
  const bool channels = by_channel(sx, C);
  return std::max({pass_blocks(channels, 1, 32, N, C, H, W),
                   pass_blocks(channels, 16 / element_bytes, 8, N, C, H, W),
                   param_grads_blocks(kBnPlanes, C), finalize_blocks(C)});
}

template <typename T, typename Acc>
cudaError_t launch_spem_forward(const ForwardArgs<T, Acc>& a, cudaStream_t stream) {
  if (a.N * a.C * a.H * a.W == 0) return cudaSuccess;
  const Layout l = choose_layout<T>({{a.x, a.sx}, {a.residual, a.sr}, {a.out, a.so}}, a.C, a.H,
                                    a.W, by_channel(a.sx, a.C));
  return launch_pass<ForwardKernels<T, Acc>, T>(a, l, stream);
}

template <typename T, typename Acc>
cudaError_t launch_spem_backward(const BackwardArgs<T, Acc>& a, cudaStream_t stream) {
  if (a.N * a.C * a.H * a.W == 0) return cudaSuccess;
  const cudaError_t err = launch_pass<BackwardKernels<T, Acc>, T>(a, backward_layout(a), stream);
  if (err != cudaSuccess) return err;
  return launch_kernel(param_grads<T, Acc>, param_grads_blocks(4, a.C), stream, a);
}

template <typename T, typename Acc>
cudaError_t launch_spem_bn_forward(const BnStatsArgs<T, Acc>& s, const ForwardArgs<T, Acc>& f,
                                   cudaStream_t stream) {
  if (s.N * s.C * s.H * s.W == 0) return cudaSuccess;
  if (s.training) {
    const Layout l = choose_layout<T>({{s.y, s.sy}}, s.C, s.H, s.W, by_channel(s.sy, s.C));
    const cudaError_t err = launch_pass<BnStatsKernels<T, Acc>, T>(s, l, stream);
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = launch_kernel(bn_finalize<T, Acc>, finalize_blocks(s.C), stream, s);
  if (err != cudaSuccess) return err;
  return launch_spem_forward(f, stream);
}

template <typename T, typename Acc>
cudaError_t launch_spem_bn_backward(const BackwardArgs<T, Acc>& a, cudaStream_t stream) {
  if (a.N * a.C * a.H * a.W == 0) return cudaSuccess;
  const Layout l = backward_layout(a);
  cudaError_t err = launch_pass<BnReduceKernels<T, Acc>, T>(a, l, stream);
  if (err != cudaSuccess) return err;
  err = launch_kernel(param_grads<T, Acc>, param_grads_blocks(6, a.C), stream, a);
  if (err != cudaSuccess) return err;
  return launch_pass<BnWriteKernels<T, Acc>, T>(a, l, stream);
}

#define SPEM_INSTANTIATE(T, Acc) \
  template cudaError_t launch_spem_forward<T, Acc>(const ForwardArgs<T, Acc>&, cudaStream_t); \
  template cudaError_t launch_spem_backward<T, Acc>(const BackwardArgs<T, Acc>&, cudaStream_t); \
  template cudaError_t launch_spem_bn_forward<T, Acc>(const BnStatsArgs<T, Acc>&, \
                                                      const ForwardArgs<T, Acc>&, \
                                                      cudaStream_t); \
  template cudaError_t launch_spem_bn_backward<T, Acc>(const BackwardArgs<T, Acc>&, \
                                                       cudaStream_t);
SPEM_INSTANTIATE(float, float)
SPEM_INSTANTIATE(__half, float)
SPEM_INSTANTIATE(__nv_bfloat16, float)
SPEM_INSTANTIATE(double, double)
#undef SPEM_INSTANTIATE

}  // namespace spem_native
