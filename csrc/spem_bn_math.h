// BatchNorm's per-channel math for spem_bn (SPEM.md, BatchNorm), shared by the CPU and CUDA
// kernels. Includes no torch, so nvcc can compile the device code on any machine.
//
// Forward: per plane, its mean and M2 (sum of squared deviations from that mean: no
// cancellation); per channel, the batch's mean and M2 from the planes' (equal counts HW):
//   mean = sum_n mean_n / N,  M2 = sum_n (M2_n + HW (mean_n - mean)^2),  var = M2 / (N HW)
// (running statistics: r <- (1 - momentum) r + momentum s, the variance unbiased); then
//   x = y alpha + beta,  alpha = weight invstd,  beta = bias - mean alpha   (as ATen forms them)
// and SPEM of x (spem_math.h).
// Backward, per plane, with G the masked gradient, x = alpha (y - mean) + bias:
//   SG = sum G, SD = sum G (y - mean), S = sum G x = alpha SD + bias SG   (SPEM's S, bn_spem_S)
//   the gradient reaching x: dx = G g (+ dM at argmax, dm at argmin), and its plane sums
//   sum dx = g SG + dM + dm,  sum dx (y - mean) = g SD + dM (y[argmax] - mean) + dm (...)
// per channel (sums over n): dbias = sum dx, dweight = invstd sum dx (y - mean) and, in
// training (where mean and invstd depend on y),
//   dy = alpha (dx - k2 - (y - mean) k3),  k2 = sum dx / count,  k3 = invstd^2 sum dx (y - mean) / count
// with count = N H W; outside training k2 = k3 = 0 (bn_bias_grads, bn_weight_grads,
// bn_input_grad below; the Triton kernels write the same expressions, and
// tests/test_bn_math.py checks them against these).
#pragma once

#include "spem_math.h"

namespace spem_native {

// The backward's per-(n, c) scratch, as (N, C) planes: SPEM's kPartials, then the plane sums
// of dx and dx (y - mean) (summed over n by the reduction), then the plane's g, dM, dm (read
// by the writing pass).
constexpr int kBnSumDx = kPartials, kBnSumDxDev = kPartials + 1, kBnGate = kPartials + 2;
constexpr int kBnPlanes = kPartials + 5;

SPEM_HD float spem_sqrt(float v) { return sqrtf(v); }
SPEM_HD double spem_sqrt(double v) { return sqrt(v); }

// One channel's normalisation: x = y alpha + beta = alpha (y - mean) + bias.
template <typename Acc>
struct ChannelNorm {
  Acc alpha, beta, mean, bias;
};

// weight and bias may be nullptr (BatchNorm without affine parameters: 1 and 0).
template <typename Acc>
SPEM_HD ChannelNorm<Acc> channel_norm(const Acc* mean, const Acc* invstd, const Acc* weight,
                                      const Acc* bias, int64_t c) {
  const Acc alpha = invstd[c] * (weight != nullptr ? weight[c] : Acc(1));
  const Acc b = bias != nullptr ? bias[c] : Acc(0);
  return {alpha, b - mean[c] * alpha, mean[c], b};
}

// Channel c's mean and invstd (and in training, with running statistics, their update) from
// the planes' mean and M2 at plane_mean[n * C + c], plane_m2[n * C + c], summed in order of n.
template <typename Acc>
SPEM_HD void finalize_channel(const Acc* plane_mean, const Acc* plane_m2, int64_t N, int64_t C,
                              int64_t HW, int64_t c, bool training, Acc momentum, Acc eps,
                              Acc* running_mean, Acc* running_var, Acc* mean, Acc* invstd) {
  Acc mu, var;
  if (training) {
    Acc sum = 0;
    for (int64_t n = 0; n < N; ++n) sum += plane_mean[n * C + c];
    mu = sum / Acc(N);
    Acc m2 = 0;
    for (int64_t n = 0; n < N; ++n) {
      const Acc d = plane_mean[n * C + c] - mu;
      m2 += plane_m2[n * C + c] + Acc(HW) * d * d;
    }
    const Acc count = Acc(N) * Acc(HW);
    var = m2 / count;
    if (running_mean != nullptr) {
      running_mean[c] = (Acc(1) - momentum) * running_mean[c] + momentum * mu;
      running_var[c] = (Acc(1) - momentum) * running_var[c] + momentum * m2 / (count - Acc(1));
    }
  } else {
    mu = running_mean[c];
    var = running_var[c];
  }
  mean[c] = mu;
  invstd[c] = Acc(1) / spem_sqrt(var + eps);
}

// SPEM's S = sum G x of one normalised plane, from SG and SD: alpha SD + bias SG. Where the
// bias is 0 (or absent) its term is left out, so that an infinite SG gives alpha SD, as sum G x
// does, not 0 inf = NaN. V: a scalar, or (CPU) a vector of lanes.
template <typename V>
SPEM_HD V bn_spem_S(V alpha, V bias, V SG, V SD) {
  const V bias_SG = bias * SG;
  return alpha * SD + (bias == V{} ? V{} : bias_SG);
}

// The plane sums of dx and dx (y - mean) from SG, SD and the plane's SPEM gradients;
// dev_max, dev_min: y - mean at the max's and the min's positions.
template <typename Acc>
SPEM_HD void bn_plane_sums(const PlaneGrads<Acc>& pg, Acc SG, Acc SD, Acc dev_max, Acc dev_min,
                           Acc* sum_dx, Acc* sum_dx_dev) {
  *sum_dx = pg.g * SG + pg.dM + pg.dm;
  *sum_dx_dev = pg.g * SD + pg.dM * dev_max + pg.dm * dev_min;
}

// Channel c's gradients from its planes' sums (over n) of dx and of dx (y - mean): dbias and
// the writing pass's k2 from the first, dweight and k3 from the second (k2 = k3 = 0 outside
// training, where mean and invstd are constants); count = N H W.
template <typename Acc>
SPEM_HD void bn_bias_grads(Acc sum_dx, Acc count, bool training, Acc* dbias, Acc* k2) {
  *dbias = sum_dx;
  *k2 = training ? sum_dx / count : Acc(0);
}

template <typename Acc>
SPEM_HD void bn_weight_grads(Acc sum_dx_dev, Acc invstd, Acc count, bool training, Acc* dweight,
                             Acc* k3) {
  *dweight = invstd * sum_dx_dev;
  *k3 = training ? sum_dx_dev * invstd * invstd / count : Acc(0);
}

// dy from dx at one position: alpha (dx - k2 - (y - mean) k3). Where k3 = 0 (eval) the last
// term is left out, so that an infinite y gives alpha dx, as the composition does. V: a
// scalar, or (CPU) a vector of lanes.
template <typename V>
SPEM_HD V bn_input_grad(V dx, V y, V mean, V alpha, V k2, V k3) {
  const V dev_k3 = (y - mean) * k3;
  return alpha * (dx - k2 - (k3 == V{} ? V{} : dev_k3));
}

}  // namespace spem_native
