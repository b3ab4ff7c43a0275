// CPU kernels of spem_bn: BatchNorm, then SPEM with the block tail (math: spem_bn_math.h,
// spem_math.h, SPEM.md). The same structure as the CUDA and Triton kernels:
// - forward: per plane its mean and M2 (training); per channel the finalisation (mean,
//   invstd, running statistics); per plane the fused pass (normalise, max/min, gate, tail);
// - backward: per plane the reduction pass (sum G, sum G (y - mean) -> the SPEM partials and
//   the plane sums of dx, dx (y - mean)); the sums over n, in order of n (parameter
//   gradients, the writing pass's k2, k3); per plane the writing pass (dy, dresidual).
// Every tensor is addressed through its own strides. Planes (n, c) are the parallel tasks;
// sums over a plane run in a fixed order and the sums over n in order of n, so results do
// not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "spem_bn_math.h"
#include "spem_math.h"
#include "spem_op.h"

namespace spem_native {
namespace {

constexpr int64_t kTileElements = 1 << 15;  // per parallel task, about

template <typename T>
struct Plane {  // one plane (n, c) of a tensor: element p (row-major) at data[off(p)]
  T* data;
  int64_t sh, sw, W;
  bool flat;
  int64_t off(int64_t p) const { return flat ? p * sw : (p / W) * sh + (p % W) * sw; }
  T& operator[](int64_t p) const { return data[off(p)]; }
};

template <typename T>
Plane<T> plane_of(const at::Tensor& t, int64_t n, int64_t c) {
  T* base = static_cast<T*>(t.data_ptr()) + n * t.stride(0) + c * t.stride(1);
  const bool flat = t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3);
  return {base, t.stride(2), t.stride(3), t.size(3), flat};
}

// Runs f(n, c) for every plane, in parallel over planes.
template <typename F>
void for_each_plane(const at::Tensor& y, F&& f) {
  const int64_t C = y.size(1), HW = y.size(2) * y.size(3);
  const int64_t grain = std::max<int64_t>(1, kTileElements / std::max<int64_t>(HW, 1));
  at::parallel_for(0, y.size(0) * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) f(nc / C, nc % C);
  });
}

// sum over a plane of f(q), q = 0 .. HW - 1, in kLanes interleaved partial sums added in a
// fixed order: the error of a sum of a plane of 1024 is ~kLanes times smaller than a serial
// float32 sum's (and the compiler vectorises it).
constexpr int kLanes = 16;

template <typename Acc, typename F>
Acc plane_sum(int64_t HW, F&& f) {
  Acc lanes[kLanes] = {};
  int64_t q = 0;
  for (; q + kLanes <= HW; q += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += f(q + l);
  for (; q < HW; ++q) lanes[q % kLanes] += f(q);
  Acc sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

template <typename Acc>
const Acc* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<Acc>() : nullptr;
}

BnForwardResult spem_bn_forward_cpu(const at::Tensor& y,
                                    const std::optional<at::Tensor>& running_mean,
                                    const std::optional<at::Tensor>& running_var,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                                    const at::Tensor& b1, const at::Tensor& w2,
                                    const at::Tensor& b2, const at::Tensor& p,
                                    const std::optional<at::Tensor>& residual, bool training,
                                    double momentum, double eps, bool relu) {
  check_bn_forward(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                   training);
  auto [out, stats, idx, mean, invstd] = allocate_bn_forward(y);
  if (y.numel() == 0) return {out, stats, idx, mean.zero_(), invstd.zero_()};
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const auto acc = compute_dtype(y.scalar_type());
  const ParamTensors prm = compute_params(w1, b1, w2, b2, p, acc);
  BnTensors bn = bn_tensors(running_mean, running_var, weight, bias, acc);
  const bool has_res = residual.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "spem_bn_forward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    std::vector<Acc> plane_stats(training ? 2 * N * C : 0);
    if (training)
      for_each_plane(y, [&](int64_t n, int64_t c) {
        const Plane<const T> yp = plane_of<const T>(y, n, c);
        const Acc mu =
            plane_sum<Acc>(HW, [&](int64_t q) { return static_cast<Acc>(yp[q]); }) / Acc(HW);
        const Acc m2 = plane_sum<Acc>(HW, [&](int64_t q) {
          const Acc d = static_cast<Acc>(yp[q]) - mu;
          return d * d;
        });
        plane_stats[n * C + c] = mu;
        plane_stats[(N + n) * C + c] = m2;
      });
    Acc* mean_d = mean.data_ptr<Acc>();
    Acc* invstd_d = invstd.data_ptr<Acc>();
    Acc* r_mean = bn.running_mean.defined() ? bn.running_mean.data_ptr<Acc>() : nullptr;
    Acc* r_var = bn.running_var.defined() ? bn.running_var.data_ptr<Acc>() : nullptr;
    std::vector<Acc> alpha(C), beta(C);
    at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        finalize_channel(plane_stats.data(), plane_stats.data() + N * C, N, C, HW, c, training,
                         Acc(momentum), Acc(eps), r_mean, r_var, mean_d, invstd_d);
        const ChannelNorm<Acc> k = channel_norm<Acc>(mean_d, invstd_d, data_or_null<Acc>(bn.weight),
                                                     data_or_null<Acc>(bn.bias), c);
        alpha[c] = k.alpha, beta[c] = k.beta;
      }
    });
    const Acc* P[5] = {prm[0].data_ptr<Acc>(), prm[1].data_ptr<Acc>(), prm[2].data_ptr<Acc>(),
                       prm[3].data_ptr<Acc>(), prm[4].data_ptr<Acc>()};
    Acc* stats_d = stats.data_ptr<Acc>();
    int32_t* idx_d = idx.data_ptr<int32_t>();
    for_each_plane(y, [&](int64_t n, int64_t c) {
      const Plane<const T> yp = plane_of<const T>(y, n, c);
      const Acc a = alpha[c], b = beta[c];
      Extremes<Acc> e = Extremes<Acc>::empty();
      for (int64_t q = 0; q < HW; ++q) e.add(static_cast<Acc>(yp[q]) * a + b, int32_t(q));
      const int64_t nc = n * C + c;
      const Acc M = e.nan ? Acc(NAN) : e.max, m = e.nan ? Acc(NAN) : e.min;
      stats_d[2 * nc] = M, stats_d[2 * nc + 1] = m;
      idx_d[2 * nc] = e.imax, idx_d[2 * nc + 1] = e.imin;
      const Gate<Acc> t = plane_gate(M, m, load_params(P[0], P[1], P[2], P[3], P[4], c));
      const Acc g = t.s1 * t.s2;
      const Plane<T> op = plane_of<T>(out, n, c);
      if (has_res) {
        const Plane<const T> rp = plane_of<const T>(*residual, n, c);
        for (int64_t q = 0; q < HW; ++q) {
          Acc v = g * (static_cast<Acc>(yp[q]) * a + b) + static_cast<Acc>(rp[q]);
          op[q] = static_cast<T>(relu && v < 0 ? Acc(0) : v);  // keeps NaN
        }
      } else {
        for (int64_t q = 0; q < HW; ++q) {
          Acc v = g * (static_cast<Acc>(yp[q]) * a + b);
          op[q] = static_cast<T>(relu && v < 0 ? Acc(0) : v);
        }
      }
    });
  });
  if (training) bn.finish();
  return {out, stats, idx, mean, invstd};
}

at::Tensor spem_bn_output_cpu(const at::Tensor& y, const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                              const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                              const at::Tensor& p, const std::optional<at::Tensor>& residual,
                              bool training, double momentum, double eps, bool relu) {
  return std::get<0>(spem_bn_forward_cpu(y, running_mean, running_var, weight, bias, w1, b1, w2,
                                         b2, p, residual, training, momentum, eps, relu));
}

BnBackwardResult spem_bn_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                      const at::Tensor& out, const at::Tensor& stats,
                                      const at::Tensor& idx, const at::Tensor& mean,
                                      const at::Tensor& invstd,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const at::Tensor& w1, const at::Tensor& b1,
                                      const at::Tensor& w2, const at::Tensor& b2,
                                      const at::Tensor& p, bool training, bool relu,
                                      bool write_dres) {
  check_bn_backward(grad, y, out, stats, idx, mean, invstd, weight, bias, w1, b1, w2, b2, p);
  auto [dy, dres] = allocate_input_grads(y, write_dres);
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const auto acc = compute_dtype(y.scalar_type());
  const ParamTensors prm = compute_params(w1, b1, w2, b2, p, acc);
  ParamGrads grads = allocate_param_grads({w1, b1, w2, b2, p}, acc);
  BnParamGrads bn_grads = allocate_bn_param_grads(weight, bias, y, acc);
  const BnTensors bn = bn_tensors(std::nullopt, std::nullopt, weight, bias, acc);
  const at::Tensor stats_c = stats.contiguous(), idx_c = idx.contiguous();
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "spem_bn_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const Acc* P[5] = {prm[0].data_ptr<Acc>(), prm[1].data_ptr<Acc>(), prm[2].data_ptr<Acc>(),
                       prm[3].data_ptr<Acc>(), prm[4].data_ptr<Acc>()};
    const Acc* mean_d = mean_c.data_ptr<Acc>();
    const Acc* invstd_d = invstd_c.data_ptr<Acc>();
    const Acc* weight_d = data_or_null<Acc>(bn.weight);
    const Acc* bias_d = data_or_null<Acc>(bn.bias);
    const Acc* stats_d = stats_c.data_ptr<Acc>();
    const int32_t* idx_d = idx_c.data_ptr<int32_t>();
    // per (n, c): the SPEM partials, then the plane sums of dx and dx (y - mean), g, dM, dm
    std::vector<Acc> part(kBnPlanes * N * C, Acc(0));
    const int64_t NC = N * C;
    auto masked = [&](const Plane<const T>& gp, const Plane<const T>& op, int64_t q) {
      const Acc G = static_cast<Acc>(gp[q]);
      return relu && !(static_cast<Acc>(op[q]) > 0) ? Acc(0) : G;
    };
    for_each_plane(y, [&](int64_t n, int64_t c) {
      const Plane<const T> gp = plane_of<const T>(grad, n, c), yp = plane_of<const T>(y, n, c),
                           op = plane_of<const T>(out, n, c);
      const Acc mu = mean_d[c];
      const Acc SG = plane_sum<Acc>(HW, [&](int64_t q) { return masked(gp, op, q); });
      const Acc SD = plane_sum<Acc>(
          HW, [&](int64_t q) { return masked(gp, op, q) * (static_cast<Acc>(yp[q]) - mu); });
      const ChannelNorm<Acc> k = channel_norm(mean_d, invstd_d, weight_d, bias_d, c);
      const int64_t nc = n * C + c;
      const PlaneGrads<Acc> pg = plane_grads(k.alpha * SD + k.bias * SG, stats_d[2 * nc],
                                             stats_d[2 * nc + 1],
                                             load_params(P[0], P[1], P[2], P[3], P[4], c));
      for (int j = 0; j < kPartials; ++j) part[j * NC + nc] = pg.part[j];
      const Acc dev_max = static_cast<Acc>(yp[idx_d[2 * nc]]) - mu;
      const Acc dev_min = static_cast<Acc>(yp[idx_d[2 * nc + 1]]) - mu;
      bn_plane_sums(pg, SG, SD, dev_max, dev_min, &part[kBnSumDx * NC + nc],
                    &part[kBnSumDxDev * NC + nc]);
      part[kBnGate * NC + nc] = pg.g;
      part[(kBnGate + 1) * NC + nc] = pg.dM;
      part[(kBnGate + 2) * NC + nc] = pg.dm;
    });
    // Sums over n, in order of n: dw1, db1, dw2, db2, then dbias, dweight and k2, k3; D over
    // (n, c) for p's gradient.
    std::vector<Acc> coef(2 * C);
    Acc* const sums_out[4] = {grads.written[0].data_ptr<Acc>(), grads.written[1].data_ptr<Acc>(),
                              grads.written[2].data_ptr<Acc>(), grads.written[3].data_ptr<Acc>()};
    Acc* dweight_d = bn_grads.written_dweight.data_ptr<Acc>();
    Acc* dbias_d = bn_grads.written_dbias.data_ptr<Acc>();
    const Acc count = Acc(N) * Acc(HW);
    Acc D = 0;
    for (int64_t c = 0; c < C; ++c) {
      Acc s[kBnPlanes] = {};
      for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j <= kBnSumDxDev; ++j) s[j] += part[j * NC + n * C + c];
      for (int j = 0; j < 4; ++j) sums_out[j][c] = s[j];
      D += s[4];
      dbias_d[c] = s[kBnSumDx];
      dweight_d[c] = invstd_d[c] * s[kBnSumDxDev];
      coef[c] = training ? s[kBnSumDx] / count : Acc(0);
      coef[C + c] = training ? s[kBnSumDxDev] * invstd_d[c] * invstd_d[c] / count : Acc(0);
    }
    p_gradient(P[4], D, grads.written[4].data_ptr<Acc>());
    const at::Tensor& dr = write_dres ? dres : dy;
    for_each_plane(y, [&](int64_t n, int64_t c) {
      const Plane<const T> gp = plane_of<const T>(grad, n, c), yp = plane_of<const T>(y, n, c),
                           op = plane_of<const T>(out, n, c);
      const Plane<T> dp = plane_of<T>(dy, n, c), drp = plane_of<T>(dr, n, c);
      const int64_t nc = n * C + c;
      const Acc g = part[kBnGate * NC + nc], dM = part[(kBnGate + 1) * NC + nc],
                dm = part[(kBnGate + 2) * NC + nc];
      const int32_t imax = idx_d[2 * nc], imin = idx_d[2 * nc + 1];
      const ChannelNorm<Acc> k = channel_norm(mean_d, invstd_d, weight_d, bias_d, c);
      const Acc k2 = coef[c], k3 = coef[C + c];
      for (int64_t q = 0; q < HW; ++q) {
        const Acc G = masked(gp, op, q);
        Acc d = G * g;
        if (q == imax) d += dM;
        if (q == imin) d += dm;
        dp[q] = static_cast<T>(k.alpha * (d - k2 - (static_cast<Acc>(yp[q]) - k.mean) * k3));
        if (write_dres) drp[q] = static_cast<T>(G);
      }
    });
  });
  grads.finish();
  bn_grads.finish();
  const auto& [dw1, db1, dw2, db2, dp] = grads.result;
  return {dy, dres, bn_grads.dweight, bn_grads.dbias, dw1, db1, dw2, db2, dp};
}

}  // namespace
}  // namespace spem_native

TORCH_LIBRARY_IMPL(spem_native, CPU, m) {
  m.impl("spem_bn_forward", &spem_native::spem_bn_forward_cpu);
  m.impl("spem_bn_output", &spem_native::spem_bn_output_cpu);
  m.impl("spem_bn_backward", &spem_native::spem_bn_backward_cpu);
}
