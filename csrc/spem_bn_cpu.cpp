// CPU kernels of spem_bn: BatchNorm, then SPEM with the block tail (math: spem_bn_math.h,
// spem_math.h, SPEM.md). The same structure as the CUDA and Triton kernels, on the CPU
// kernels' SIMD blocks and walks (spem_cpu_lanes.h, spem_cpu_walk.h):
// - forward: per plane its mean and M2 (training); per channel the finalisation (mean,
//   invstd, running statistics, x = y alpha + beta); then SPEM's own forward walk
//   (spem_cpu_forward.h) with BatchNorm as its Norm: normalise, max/min, gate, tail;
// - backward: per plane the reduction pass (sum G, sum G (y - mean) -> the SPEM partials and
//   the plane sums of dx, dx (y - mean)); the sums over n, in order of n (parameter
//   gradients, the writing pass's k2, k3); per plane the writing pass (dy, dresidual).
// Both passes walk plane-major (NCHW and anything else; the backward's reduction kLanes
// planes at a time, folded so that the per-plane math runs in vectors) or channel-major
// (channels_last: the lanes are channels). Every tensor is addressed through its own strides.
// A plane's sums run in a fixed order and the sums over n in order of n, so results do not
// depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "spem_bn_math.h"
#include "spem_cpu_forward.h"
#include "spem_cpu_lanes.h"
#include "spem_cpu_walk.h"
#include "spem_math.h"
#include "spem_op.h"
#include "spem_op_entries.h"

namespace spem_native {
namespace {

template <typename Acc>
const Acc* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<Acc>() : nullptr;
}

// Lanes c0 .. c0 + count - 1 of a per-channel vector (the others 0).
template <typename Acc>
Vec<Acc> channel_lanes(const Acc* v, int64_t c0, int64_t count) {
  Vec<Acc> out{};
  for (int64_t j = 0; j < count; ++j) out[j] = v[c0 + j];
  return out;
}

// BatchNorm as the Norm of SPEM's forward walk: x = y alpha[c] + beta[c].
template <typename Acc>
struct BnNorm {
  const Acc *alpha, *beta;
  Affine<Acc> plane(int64_t c) const { return {alpha[c], beta[c]}; }
  template <typename A>
  Affine<Vec<A>> lanes(int64_t c0, int64_t count) const {
    return {channel_lanes(alpha, c0, count), channel_lanes(beta, c0, count)};
  }
};

// (v - mu)^2: mu one plane's mean, or a vector of channels' means (lane(l): lane l's map).
template <typename A>
struct SquaredDeviation {
  A mu;
  template <typename V>
  V operator()(V v) const {
    const V d = v - mu;
    return d * d;
  }
  SquaredDeviation<typename ElementOf<A>::type> lane(int l) const { return {mu[l]}; }
};

// --- forward: the planes' mean and M2 (training) ---

// Planes of fewer bytes than this are summed kLanes at a time, their sums folded into lanes
// (an 8x8 plane is four vectors: a reduction of its own would cost as much as its loads);
// larger ones one by one, each in L1 for its second pass.
constexpr int64_t kGroupedMomentsBytes = 4096;

template <typename T, typename Acc, bool Unit>
void moments_plane_major(const at::Tensor& y_t, Acc* mean, Acc* m2) {
  const int64_t C = y_t.size(1), HW = y_t.size(2) * y_t.size(3);
  const Rows walk = plane_rows({y_t});
  const View<const T> y(y_t);
  const int group = HW * int64_t(sizeof(T)) < kGroupedMomentsBytes ? kLanes : 1;
  const int64_t grain = std::max<int64_t>(kLanes, kTileElements / HW);
  // Lane j of the result: plane j's sum (sum_lanes gives a plane alone the same number).
  auto lanes_of = [&](Vec<Acc>* sums, int count) {
    if (group == 1) return Vec<Acc>{} + sum_lanes<Acc>(sums[0]);
    std::fill(sums + count, sums + kLanes, Vec<Acc>{});
    return fold_sums<Acc>(sums);
  };
  at::parallel_for(0, y_t.size(0) * C, grain, [&](int64_t begin, int64_t end) {
    Vec<Acc> sums[kLanes];
    for (int64_t nc0 = begin; nc0 < end; nc0 += group) {
      const int count = static_cast<int>(std::min<int64_t>(group, end - nc0));
      PlaneIndex at(nc0, C);
      for (int j = 0; j < count; ++j, at.next(C)) {
        sums[j] = Vec<Acc>{};
        for (int64_t row = 0; row < walk.rows; ++row)
          sum_row<Unit, T, Acc>(y.plane(at.n, at.c) + row * y.sh, y.sw, walk.len, sums[j]);
      }
      const Vec<Acc> mu = lanes_of(sums, count) / Acc(HW);
      at = PlaneIndex(nc0, C);
      for (int j = 0; j < count; ++j, at.next(C)) {  // again from L1: no cancellation
        sums[j] = Vec<Acc>{};
        for (int64_t row = 0; row < walk.rows; ++row)
          sum_row<Unit, T, Acc>(y.plane(at.n, at.c) + row * y.sh, y.sw, walk.len, sums[j],
                                SquaredDeviation<Acc>{mu[j]});
      }
      const Vec<Acc> dev = lanes_of(sums, count);
      for (int j = 0; j < count; ++j) mean[nc0 + j] = mu[j], m2[nc0 + j] = dev[j];
    }
  });
}

// Over (n, block of channels): lane j of group k is channel c0 + k kLanes + j, summed over
// the plane's positions in order; the block stays in L2 for the second pass.
template <typename T, typename Acc, bool Unit, typename F>
void channel_sums(const View<const T>& y, int64_t n, int64_t c0, int64_t cb, int64_t H,
                  int64_t W, Vec<Acc>* sums, F group_map) {
  const int64_t full = cb / kLanes, used = (cb + kLanes - 1) / kLanes;
  const int64_t sc = Unit ? 1 : y.sc;
  Vec<Acc> chunk[kMaxChannelBlock / kLanes];
  std::fill(sums, sums + used, Vec<Acc>{});
  std::fill(chunk, chunk + used, Vec<Acc>{});
  const T* yp = y.plane(n, c0);
  for_positions_in_chunks(H, W, [&](int64_t h, int64_t w) {
    const T* row = yp + h * y.sh + w * y.sw;
    for (int64_t k = 0; k < full; ++k)
      chunk[k] += group_map(k)(load<Acc, Unit>(row + k * kLanes * sc, sc));
    for (int64_t j = full * kLanes; j < cb; ++j)
      chunk[full][j % kLanes] += group_map(full).lane(j % kLanes)(static_cast<Acc>(row[j * sc]));
  }, [&] {
    for (int64_t k = 0; k < used; ++k) sums[k] += chunk[k], chunk[k] = Vec<Acc>{};
  });
}

template <typename T, typename Acc, bool Unit>
void moments_channel_major(const at::Tensor& y_t, Acc* mean, Acc* m2) {
  const int64_t N = y_t.size(0), C = y_t.size(1), H = y_t.size(2), W = y_t.size(3);
  const int64_t block = channel_block(C, H * W), blocks = (C + block - 1) / block;
  const View<const T> y(y_t);
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    Vec<Acc> sums[kMaxChannelBlock / kLanes], mu[kMaxChannelBlock / kLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block;
      const int64_t cb = std::min(block, C - c0), used = (cb + kLanes - 1) / kLanes;
      channel_sums<T, Acc, Unit>(y, n, c0, cb, H, W, sums, [](int64_t) { return Identity(); });
      for (int64_t k = 0; k < used; ++k) mu[k] = sums[k] / Acc(H * W);
      channel_sums<T, Acc, Unit>(y, n, c0, cb, H, W, sums,
                                 [&](int64_t k) { return SquaredDeviation<Vec<Acc>>{mu[k]}; });
      for (int64_t j = 0; j < cb; ++j) {
        mean[n * C + c0 + j] = mu[j / kLanes][j % kLanes];
        m2[n * C + c0 + j] = sums[j / kLanes][j % kLanes];
      }
    }
  });
}

// Per channel: mean and invstd (training: from the planes' moments, updating the running
// statistics), and alpha, beta of x = y alpha + beta.
template <typename Acc>
void finalize_channels(const Acc* plane_mean, const Acc* plane_m2, int64_t N, int64_t C,
                       int64_t HW, bool training, double momentum, double eps,
                       const BnTensors& bn, Acc* mean, Acc* invstd, Acc* alpha, Acc* beta) {
  Acc* r_mean = bn.running_mean.defined() ? bn.running_mean.data_ptr<Acc>() : nullptr;
  Acc* r_var = bn.running_var.defined() ? bn.running_var.data_ptr<Acc>() : nullptr;
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      finalize_channel(plane_mean, plane_m2, N, C, HW, c, training, Acc(momentum), Acc(eps),
                       r_mean, r_var, mean, invstd);
      const ChannelNorm<Acc> k = channel_norm<Acc>(mean, invstd, data_or_null<Acc>(bn.weight),
                                                   data_or_null<Acc>(bn.bias), c);
      alpha[c] = k.alpha, beta[c] = k.beta;
    }
  });
}

// The forward: BatchNorm's statistics, then SPEM's forward walk of x = y alpha + beta (Track:
// storing the planes' stats and positions for the backward).
template <bool Track>
void bn_forward_cpu(const at::Tensor& y, const BnInputs& inputs, const ParamTensors& prm,
                    const std::optional<at::Tensor>& residual, bool training, double momentum,
                    double eps, bool relu, const at::Tensor& out, const at::Tensor& stats,
                    const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& invstd) {
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  BnTensors bn = bn_tensors(inputs, compute_dtype(y.scalar_type()));
  const bool by_channel = channel_major(y);
  const bool unit = unit_stride({y}, by_channel ? 1 : 3);
  at::Tensor alpha = at::empty({C}, mean.options()), beta = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "spem_bn_moments",
                                  [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    std::vector<Acc> moments(training ? 2 * N * C : 0);
    if (training)
      with_bool(unit, [&](auto U) {
        if (by_channel)
          moments_channel_major<T, Acc, U>(y, moments.data(), moments.data() + N * C);
        else
          moments_plane_major<T, Acc, U>(y, moments.data(), moments.data() + N * C);
      });
    finalize_channels(moments.data(), moments.data() + N * C, N, C, HW, training, momentum, eps,
                      bn, mean.data_ptr<Acc>(), invstd.data_ptr<Acc>(), alpha.data_ptr<Acc>(),
                      beta.data_ptr<Acc>());
  });
  forward_walk<Track>(y, prm, residual, relu, out, stats, idx, [&](auto zero) {
    using Acc = decltype(zero);
    return BnNorm<Acc>{alpha.data_ptr<Acc>(), beta.data_ptr<Acc>()};
  });
  if (training) bn.finish();
}

// --- backward ---

// What both passes of the backward read: per channel mean, invstd and BatchNorm's affine
// parameters, per plane the forward's stats and positions, and the (N, C) planes of scratch
// (spem_bn_math.h: kBnPlanes).
template <typename T, typename Acc, bool Relu>
struct BnBackward {
  const BackwardViews<T>& v;
  const Acc *mean, *invstd, *weight, *bias, *stats;
  const int32_t* idx;
  Acc* part;
  Params<Acc> prm;
  int64_t NC, C, W;

  // y - mean at plane (n, c)'s position pos.
  Acc deviation(int64_t n, int64_t c, int32_t pos) const {
    return static_cast<Acc>(v.x.at(n, c, pos / W, pos % W)) - mean[c];
  }

  // Planes nc0 .. nc0 + count - 1 in lanes 0 .. count - 1, from their sums SG and SD: the
  // SPEM partials, the plane sums of dx and dx (y - mean), and g, dM, dm for the writing
  // pass, stored in the scratch.
  void plane_grads_of(const Vec<Acc>& SG, const Vec<Acc>& SD, int64_t nc0, int count) const {
    Vec<Acc> alpha{}, b{}, M{}, m{}, dev_max{}, dev_min{};
    for (int j = 0; j < count; ++j) {
      const int64_t nc = nc0 + j, c = nc % C, n = nc / C;
      const ChannelNorm<Acc> k = channel_norm(mean, invstd, weight, bias, c);
      alpha[j] = k.alpha, b[j] = k.bias;
      M[j] = stats[2 * nc], m[j] = stats[2 * nc + 1];
      dev_max[j] = deviation(n, c, idx[2 * nc]);
      dev_min[j] = deviation(n, c, idx[2 * nc + 1]);
    }
    const PlaneGrads<Vec<Acc>> pg =
        plane_grads(bn_spem_S(alpha, b, SG, SD), M, m, prm.lanes(nc0, C));
    Vec<Acc> sum_dx, sum_dx_dev;
    bn_plane_sums(pg, SG, SD, dev_max, dev_min, &sum_dx, &sum_dx_dev);
    for (int j = 0; j < count; ++j) {
      const int64_t nc = nc0 + j;
      for (int k = 0; k < kPartials; ++k) part[k * NC + nc] = pg.part[k][j];
      part[kBnSumDx * NC + nc] = sum_dx[j];
      part[kBnSumDxDev * NC + nc] = sum_dx_dev[j];
      part[kBnGate * NC + nc] = pg.g[j];
      part[(kBnGate + 1) * NC + nc] = pg.dM[j];
      part[(kBnGate + 2) * NC + nc] = pg.dm[j];
    }
  }
};

// SG += G, SD += G (y - mu) over one row (G: grad through the ReLU). Element i goes to lane
// i % kLanes of sums [k], k = 0 for a plane's row, i / kLanes for a channel-major row (whose
// element i is channel i: ByChannel); mu(k): the mean of the lanes of sums [k].
template <bool Unit, bool Relu, bool ByChannel, typename T, typename Acc, typename Mu>
void bn_sums_row(const T* grad, int64_t sg, const T* out, int64_t so, const T* y, int64_t sy,
                 int64_t len, Mu mu, Vec<Acc>* SG, Vec<Acc>* SD) {
  using V = Vec<Acc>;
  if (Unit) sg = so = sy = 1;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    const int64_t k = ByChannel ? i / kLanes : 0;
    const V o = Relu ? load<Acc, Unit>(out + i * so, so) : V{};
    const V G = relu_grad<Relu>(load<Acc, Unit>(grad + i * sg, sg), o);
    SG[k] += G;
    SD[k] += G * (load<Acc, Unit>(y + i * sy, sy) - mu(k));
  }
  for (; i < len; ++i) {
    const int64_t k = ByChannel ? i / kLanes : 0;
    const Acc o = Relu ? static_cast<Acc>(out[i * so]) : Acc(0);
    const Acc G = relu_grad<Relu>(static_cast<Acc>(grad[i * sg]), o);
    SG[k][i % kLanes] += G;
    SD[k][i % kLanes] += G * (static_cast<Acc>(y[i * sy]) - mu(k)[i % kLanes]);
  }
}

// A plane's (or, as vectors, kLanes planes') coefficients of the writing pass: g and the
// extremes' terms from the reduction, BatchNorm's alpha, mean and k2, k3.
template <typename V, typename P>
struct BnRowCoef {
  V g, alpha, k2, k3, mean;
  ExtremeGrads<V, P> ext;
  BnRowCoef<typename ElementOf<V>::type, typename ElementOf<P>::type> lane(int l) const {
    return {g[l], alpha[l], k2[l], k3[l], mean[l], ext.lane(l)};
  }
  // dy at position pos: dx = G g with the extremes' terms, then BatchNorm's backward
  // (bn_input_grad).
  template <typename U, typename Q>
  U dy(U G, U y, Q pos) const {
    return bn_input_grad(ext.add(G * g, pos), y, mean, alpha, k2, k3);
  }
};

// dy and dres = G over one row; coef(i), pos(i): vectors whose lane i % kLanes holds element
// i's coefficients and position in its plane (for i a multiple of kLanes: elements i ..
// i + kLanes - 1's).
template <bool Unit, bool Relu, bool WriteDres, typename T, typename Acc, typename Coef,
          typename Pos>
void bn_input_grad_row(const T* grad, int64_t sg, const T* out, int64_t so, const T* y,
                       int64_t sy, T* dy, int64_t sd, T* dres, int64_t sdr, int64_t len,
                       Coef coef, Pos pos) {
  using V = Vec<Acc>;
  if (Unit) sg = so = sy = sd = sdr = 1;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    const V o = Relu ? load<Acc, Unit>(out + i * so, so) : V{};
    const V G = relu_grad<Relu>(load<Acc, Unit>(grad + i * sg, sg), o);
    store<Unit>(dy + i * sd, sd, coef(i).dy(G, load<Acc, Unit>(y + i * sy, sy), pos(i)));
    if (WriteDres) store<Unit>(dres + i * sdr, sdr, G);
  }
  for (; i < len; ++i) {
    const Acc o = Relu ? static_cast<Acc>(out[i * so]) : Acc(0);
    const Acc G = relu_grad<Relu>(static_cast<Acc>(grad[i * sg]), o);
    const int l = static_cast<int>(i % kLanes);
    dy[i * sd] = static_cast<T>(coef(i).lane(l).dy(G, static_cast<Acc>(y[i * sy]), pos(i)[l]));
    if (WriteDres) dres[i * sdr] = static_cast<T>(G);
  }
}

// The reduction pass, plane-major: kLanes planes at a time, their sums folded into lanes.
template <typename T, typename Acc, bool Unit, bool Relu>
void reduce_plane_major(const std::vector<at::Tensor>& ts, const BnBackward<T, Acc, Relu>& b) {
  const auto& v = b.v;
  const int64_t C = b.C, HW = ts[1].size(2) * ts[1].size(3);
  const Rows walk = plane_rows(ts);
  const int64_t grain = std::max<int64_t>(kLanes, kTileElements / HW);
  at::parallel_for(0, b.NC, grain, [&](int64_t begin, int64_t end) {
    Vec<Acc> SG[kLanes], SD[kLanes];
    for (int64_t nc0 = begin; nc0 < end; nc0 += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, end - nc0));
      PlaneIndex at(nc0, C);
      for (int j = 0; j < count; ++j, at.next(C)) {
        SG[j] = SD[j] = Vec<Acc>{};
        const Vec<Acc> mu = Vec<Acc>{} + b.mean[at.c];
        for (int64_t row = 0; row < walk.rows; ++row)
          bn_sums_row<Unit, Relu, false, T, Acc>(v.grad.plane(at.n, at.c) + row * v.grad.sh,
                                                 v.grad.sw,
                                                 v.out.plane(at.n, at.c) + row * v.out.sh,
                                                 v.out.sw, v.x.plane(at.n, at.c) + row * v.x.sh,
                                                 v.x.sw, walk.len, [&](int64_t) { return mu; },
                                                 SG + j, SD + j);
      }
      std::fill(SG + count, SG + kLanes, Vec<Acc>{});
      std::fill(SD + count, SD + kLanes, Vec<Acc>{});
      const Vec<Acc> sg = fold_sums<Acc>(SG), sd = fold_sums<Acc>(SD);
      b.plane_grads_of(sg, sd, nc0, count);
    }
  });
}

// The reduction pass, channel-major: over (n, block of channels), the lanes are channels.
template <typename T, typename Acc, bool Unit, bool Relu>
void reduce_channel_major(const std::vector<at::Tensor>& ts, const BnBackward<T, Acc, Relu>& b) {
  const auto& v = b.v;
  const int64_t N = ts[1].size(0), C = b.C, H = ts[1].size(2), W = ts[1].size(3);
  const int64_t block = channel_block(C, H * W), blocks = (C + block - 1) / block;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    Vec<Acc> SG[kMaxChannelBlock / kLanes], SD[kMaxChannelBlock / kLanes],
        mu[kMaxChannelBlock / kLanes], chunk_g[kMaxChannelBlock / kLanes],
        chunk_d[kMaxChannelBlock / kLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block;
      const int64_t cb = std::min(block, C - c0), used = (cb + kLanes - 1) / kLanes;
      for (int64_t k = 0; k < used; ++k) {
        SG[k] = SD[k] = chunk_g[k] = chunk_d[k] = Vec<Acc>{};
        mu[k] =
            channel_lanes(b.mean, c0 + k * kLanes, std::min<int64_t>(kLanes, cb - k * kLanes));
      }
      for_positions_in_chunks(H, W, [&](int64_t h, int64_t w) {
        bn_sums_row<Unit, Relu, true, T, Acc>(v.grad.plane(n, c0) + h * v.grad.sh +
                                                  w * v.grad.sw,
                                              v.grad.sc,
                                              v.out.plane(n, c0) + h * v.out.sh + w * v.out.sw,
                                              v.out.sc,
                                              v.x.plane(n, c0) + h * v.x.sh + w * v.x.sw, v.x.sc,
                                              cb, [&](int64_t k) { return mu[k]; }, chunk_g,
                                              chunk_d);
      }, [&] {
        for (int64_t k = 0; k < used; ++k) {
          SG[k] += chunk_g[k], SD[k] += chunk_d[k];
          chunk_g[k] = chunk_d[k] = Vec<Acc>{};
        }
      });
      for (int64_t k = 0; k < used; ++k)
        b.plane_grads_of(SG[k], SD[k], n * C + c0 + k * kLanes,
                         static_cast<int>(std::min<int64_t>(kLanes, cb - k * kLanes)));
    }
  });
}

// The writing pass, plane-major: each plane with its own coefficients.
template <typename T, typename Acc, bool Unit, bool Relu, bool WriteDres>
void write_plane_major(const std::vector<at::Tensor>& ts, const BnBackward<T, Acc, Relu>& b,
                       const Acc* k2, const Acc* k3) {
  const auto& v = b.v;
  const int64_t C = b.C, HW = ts[1].size(2) * ts[1].size(3);
  const Rows walk = plane_rows(ts);
  const int64_t grain = std::max<int64_t>(1, kTileElements / HW);
  at::parallel_for(0, b.NC, grain, [&](int64_t begin, int64_t end) {
    PlaneIndex at(begin, C);
    for (int64_t nc = begin; nc < end; ++nc, at.next(C)) {
      const int64_t n = at.n, c = at.c;
      using V = Vec<Acc>;
      using I = IVec<Acc>;
      const ChannelNorm<Acc> k = channel_norm(b.mean, b.invstd, b.weight, b.bias, c);
      const Acc* part = b.part + nc;
      const BnRowCoef<V, I> coef{
          V{} + part[kBnGate * b.NC],
          V{} + k.alpha,
          V{} + k2[c],
          V{} + k3[c],
          V{} + k.mean,
          {V{} + part[(kBnGate + 1) * b.NC], V{} + part[(kBnGate + 2) * b.NC],
           I{} + b.idx[2 * nc], I{} + b.idx[2 * nc + 1]}};
      for (int64_t row = 0; row < walk.rows; ++row)
        bn_input_grad_row<Unit, Relu, WriteDres, T, Acc>(
            v.grad.plane(n, c) + row * v.grad.sh, v.grad.sw, v.out.plane(n, c) + row * v.out.sh,
            v.out.sw, v.x.plane(n, c) + row * v.x.sh, v.x.sw, v.dx.plane(n, c) + row * v.dx.sh,
            v.dx.sw, v.dres.plane(n, c) + row * v.dres.sh, v.dres.sw, walk.len,
            [&](int64_t) -> const BnRowCoef<V, I>& { return coef; },
            row_positions<Acc>(row * walk.len));
    }
  });
}

// The writing pass, channel-major: per (n, block of channels), coefficients per lane.
template <typename T, typename Acc, bool Unit, bool Relu, bool WriteDres>
void write_channel_major(const std::vector<at::Tensor>& ts, const BnBackward<T, Acc, Relu>& b,
                         const Acc* k2, const Acc* k3) {
  const auto& v = b.v;
  const int64_t N = ts[1].size(0), C = b.C, H = ts[1].size(2), W = ts[1].size(3);
  const int64_t block = channel_block(C, H * W), blocks = (C + block - 1) / block;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    using V = Vec<Acc>;
    using I = IVec<Acc>;
    BnRowCoef<V, I> coef[kMaxChannelBlock / kLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block;
      const int64_t cb = std::min(block, C - c0), used = (cb + kLanes - 1) / kLanes;
      for (int64_t k = 0; k < used; ++k) {
        BnRowCoef<V, I>& e = coef[k];
        e = {V{}, V{}, V{}, V{}, V{}, {V{}, V{}, I{} - 1, I{} - 1}};
        for (int64_t j = 0; j < std::min<int64_t>(kLanes, cb - k * kLanes); ++j) {
          const int64_t c = c0 + k * kLanes + j, nc = n * C + c;
          const ChannelNorm<Acc> cn = channel_norm(b.mean, b.invstd, b.weight, b.bias, c);
          e.g[j] = b.part[kBnGate * b.NC + nc];
          e.ext.dM[j] = b.part[(kBnGate + 1) * b.NC + nc];
          e.ext.dm[j] = b.part[(kBnGate + 2) * b.NC + nc];
          e.alpha[j] = cn.alpha, e.k2[j] = k2[c], e.k3[j] = k3[c], e.mean[j] = cn.mean;
          e.ext.imax[j] = b.idx[2 * nc], e.ext.imin[j] = b.idx[2 * nc + 1];
        }
      }
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          bn_input_grad_row<Unit, Relu, WriteDres, T, Acc>(
              v.grad.plane(n, c0) + h * v.grad.sh + w * v.grad.sw, v.grad.sc,
              v.out.plane(n, c0) + h * v.out.sh + w * v.out.sw, v.out.sc,
              v.x.plane(n, c0) + h * v.x.sh + w * v.x.sw, v.x.sc,
              v.dx.plane(n, c0) + h * v.dx.sh + w * v.dx.sw, v.dx.sc,
              v.dres.plane(n, c0) + h * v.dres.sh + w * v.dres.sw, v.dres.sc, cb,
              [&](int64_t i) -> const BnRowCoef<V, I>& { return coef[i / kLanes]; },
              [&](int64_t) { return I{} + static_cast<Pos<Acc>>(h * W + w); });
    }
  });
}

// The CPU's kernels for spem_bn's ops (spem_op_entries.h).
struct CpuSpemBn {
  static NoDeviceGuard enter(const at::Tensor&) { return {}; }

  static void bn_forward(const at::Tensor& y, const BnInputs& bn, const ParamTensors& prm,
                         const std::optional<at::Tensor>& residual, bool training,
                         double momentum, double eps, bool relu, const at::Tensor& out,
                         const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& mean,
                         const at::Tensor& invstd) {
    with_bool(stats.defined(), [&](auto Save) {
      bn_forward_cpu<Save>(y, bn, prm, residual, training, momentum, eps, relu, out, stats, idx,
                           mean, invstd);
    });
  }

  static void bn_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& out,
                          const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& mean,
                          const at::Tensor& invstd, bool training, bool relu, bool write_dres,
                          BnBackwardSetup& s);
};

void CpuSpemBn::bn_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& out,
                            const at::Tensor& stats, const at::Tensor& idx,
                            const at::Tensor& mean, const at::Tensor& invstd, bool training,
                            bool relu, bool write_dres, BnBackwardSetup& s) {
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const at::Tensor stats_c = stats.contiguous(), idx_c = idx.contiguous();
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor& dr = write_dres ? s.dres : s.dx;  // written only when write_dres
  const std::vector<at::Tensor> ts = {grad, y, out, s.dx, dr};
  const bool by_channel = channel_major(y);
  const bool unit = unit_stride(ts, by_channel ? 1 : 3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "spem_bn_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const int64_t NC = N * C;
    std::vector<Acc> part(kBnPlanes * NC, Acc(0));
    const BackwardViews<T> v{grad, y, out, s.dx, dr};
    const Acc* invstd_d = invstd_c.data_ptr<Acc>();
    std::vector<Acc> coef(2 * C);  // k2, k3
    with_bool(relu, [&](auto L) {
      const BnBackward<T, Acc, L> b{v,
                                    mean_c.data_ptr<Acc>(),
                                    invstd_d,
                                    data_or_null<Acc>(s.bn.weight),
                                    data_or_null<Acc>(s.bn.bias),
                                    stats_c.data_ptr<Acc>(),
                                    idx_c.data_ptr<int32_t>(),
                                    part.data(),
                                    params_of<Acc>(s.params),
                                    NC,
                                    C,
                                    y.size(3)};
      with_bool(unit, [&](auto U) {
        if (by_channel)
          reduce_channel_major<T, Acc, U, L>(ts, b);
        else
          reduce_plane_major<T, Acc, U, L>(ts, b);
      });
      // Sums over n, in order of n: dw1, db1, dw2, db2, then dbias, dweight and k2, k3; D
      // over (n, c) for p's gradient.
      const ParamTensors& written = s.grads.written;
      Acc* const sums_out[4] = {written[0].data_ptr<Acc>(), written[1].data_ptr<Acc>(),
                                written[2].data_ptr<Acc>(), written[3].data_ptr<Acc>()};
      Acc* dweight_d = s.bn_grads.written_dweight.data_ptr<Acc>();
      Acc* dbias_d = s.bn_grads.written_dbias.data_ptr<Acc>();
      const Acc count = Acc(N) * Acc(HW);
      std::vector<Acc> sums(kBnPlanes * C, Acc(0));
      for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j <= kBnSumDxDev; ++j)
          for (int64_t c = 0; c < C; ++c) sums[j * C + c] += part[j * NC + n * C + c];
      Acc D = 0;
      for (int64_t c = 0; c < C; ++c) {
        for (int j = 0; j < 4; ++j) sums_out[j][c] = sums[j * C + c];
        D += sums[4 * C + c];
        bn_bias_grads(sums[kBnSumDx * C + c], count, training, &dbias_d[c], &coef[c]);
        bn_weight_grads(sums[kBnSumDxDev * C + c], invstd_d[c], count, training, &dweight_d[c],
                        &coef[C + c]);
      }
      p_gradient(s.params[4].data_ptr<Acc>(), D, written[4].data_ptr<Acc>());
      with_bool(unit, [&](auto U) {
        with_bool(write_dres, [&](auto R) {
          if (by_channel)
            write_channel_major<T, Acc, U, L, R>(ts, b, coef.data(), coef.data() + C);
          else
            write_plane_major<T, Acc, U, L, R>(ts, b, coef.data(), coef.data() + C);
        });
      });
    });
  });
}

}  // namespace
}  // namespace spem_native

SPEM_TORCH_LIBRARY_IMPL(SPEM_LIBRARY, CPU, m) {
  spem_native::register_spem_bn_ops<spem_native::CpuSpemBn>(m);
}
