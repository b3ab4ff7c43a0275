// Per-plane SPEM math shared by the CPU and CUDA kernels (SPEM.md). Includes no torch, so nvcc
// can compile the device code on any machine.
//
// Forward, per plane y = x[n, c]:
//   M = max(y), m = min(y)                     first row-major position on ties
//   A = w2 M + b2, B = w2 m + b2, q_i = p_i^2 / (p0^2 + p1^2), Z = w1 (q0 A + q1 B) + b1
//   g = sigmoid(A + B) sigmoid(Z)
// Backward, with S = sum(G y) over the plane, s1 = sigmoid(A + B), s2 = sigmoid(Z):
//   dZ = S s1 s2 (1 - s2), dU = S s1 s2 (1 - s1), dA = dU + dZ w1 q0, dB = dU + dZ w1 q1
//   dy = G g, plus dM = dA w2 at argmax and dm = dB w2 at argmin
//   per-(n, c) partials [dZ (q0 A + q1 B), dZ, dA M + dB m, dA + dB, dZ w1 w2 (M - m)]: the
//   last is dq0 - dq1 = dZ w1 (A - B), all that p's gradient needs, computed without the
//   cancellation of subtracting two large sums
// Parameter gradients: the first four partials summed over n are dw1, db1, dw2, db2; with
// D = the last one summed over n and c, P = p0^2 + p1^2 and q_i = p_i^2 / P,
//   dp_i = 2 p_i / P (dq_i - q0 dq0 - q1 dq1), i.e. dp0 = 2 p0 p1^2 D / P^2, dp1 = -2 p1 p0^2 D / P^2
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#ifdef __CUDACC__
#define SPEM_HD __host__ __device__ __forceinline__
#else
#define SPEM_HD inline
#endif

namespace spem_native {

constexpr int kPartials = 5;  // per (n, c): dw1, db1, dw2, db2, dq0 - dq1 before the sums

#ifdef __CUDACC__
SPEM_HD float spem_exp(float v) { return expf(v); }
#else
template <typename To, typename From>
inline To bit_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_as keeps the size");
  To to;
  __builtin_memcpy(&to, &from, sizeof(to));
  return to;
}

// The element type of a GCC/Clang vector, or the type itself for a scalar.
template <typename F, typename = void>
struct ElementOf {
  using type = F;
};
template <typename F>
struct ElementOf<F, std::void_t<decltype(std::declval<F>()[0])> > {
  using type = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<F>()[0])> >;
};

// e^x on the CPU for a float or a GCC/Clang vector of floats or doubles (the CPU kernels
// compute many planes' gates and gradients at once in vectors): one definition, so that every
// plane gets the same number whichever way it is computed. float32: Cody-Waite reduction
// e^x = 2^n e^r with |r| <= ln2 / 2 and Cephes' expf polynomial for e^r, within 1 ulp of expf;
// 2^n is applied in two factors so that overflow (inf), the subnormals and underflow (0) come
// out right; NaN stays NaN. float64 (gradchecks): exp lane by lane.
template <typename F>
inline F spem_exp(F in) {
  if constexpr (std::is_same<typename ElementOf<F>::type, double>::value) {
    F out;
    for (size_t l = 0; l < sizeof(F) / sizeof(double); ++l) out[l] = exp(in[l]);
    return out;
  } else {
    // The integers of F's width: what F's compare gives.
    using I = std::conditional_t<std::is_same<F, float>::value, int32_t, decltype(F{} < F{})>;
    const F zero = F{};
    const auto nan = in != in;  // a NaN goes through as 0 (no shift of garbage bits), comes out
    F x = nan ? zero : in;
    x = x > zero + 89.0f ? zero + 89.0f : x;
    x = x < zero - 104.0f ? zero - 104.0f : x;
    const F shift = zero + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, n
    const F t = x * 1.44269504088896341f + shift;
    const F n = t - shift;
    const F r = x - n * 0.693359375f + n * 2.12194440e-4f;
    F e = zero + 1.9875691500e-4f;
    e = e * r + 1.3981999507e-3f;
    e = e * r + 8.3334519073e-3f;
    e = e * r + 4.1665795894e-2f;
    e = e * r + 1.6666665459e-1f;
    e = e * r + 5.0000001201e-1f;
    e = e * r * r + r + 1.0f;
    const I n_int = bit_as<I>(t) - bit_as<int32_t>(12582912.0f), half = n_int >> 1;
    const F out = e * bit_as<F>((half + 127) << 23) * bit_as<F>((n_int - half + 127) << 23);
    return nan ? in : out;
  }
}
#endif
SPEM_HD double spem_exp(double v) { return exp(v); }

// For a scalar or (CPU) a vector of lanes: the constants broadcast.
template <typename Acc>
SPEM_HD Acc sigmoid(Acc v) {
  return 1 / (1 + spem_exp(-v));
}

// One channel's parameters in the compute dtype; q0, q1 come from the shared pair p.
template <typename Acc>
struct ChannelParams {
  Acc w1, b1, w2, b2, q0, q1;
};

template <typename Acc>
SPEM_HD ChannelParams<Acc> load_params(const Acc* w1, const Acc* b1, const Acc* w2,
                                       const Acc* b2, const Acc* p, int64_t c) {
  const Acc p0 = p[0] * p[0], p1 = p[1] * p[1];
  const Acc P = p0 + p1;
  return {w1[c], b1[c], w2[c], b2[c], p0 / P, p1 / P};
}

template <typename Acc>
struct Gate {
  Acc A, B, s1, s2;  // s1 = sigmoid(A + B), s2 = sigmoid(Z); the gate is s1 * s2
};

template <typename Acc>
SPEM_HD Gate<Acc> plane_gate(Acc M, Acc m, const ChannelParams<Acc>& c) {
  const Acc A = c.w2 * M + c.b2;
  const Acc B = c.w2 * m + c.b2;
  const Acc Z = c.w1 * (c.q0 * A + c.q1 * B) + c.b1;
  return {A, B, sigmoid(A + B), sigmoid(Z)};
}

// What the backward pass needs per plane once S is known.
template <typename Acc>
struct PlaneGrads {
  Acc g, dM, dm;
  Acc part[kPartials];
};

template <typename Acc>
SPEM_HD PlaneGrads<Acc> plane_grads(Acc S, Acc M, Acc m, const ChannelParams<Acc>& c) {
  const Gate<Acc> t = plane_gate(M, m, c);
  const Acc dZ = S * t.s1 * t.s2 * (1 - t.s2);
  const Acc dU = S * t.s2 * t.s1 * (1 - t.s1);
  const Acc dA = dU + dZ * c.w1 * c.q0;
  const Acc dB = dU + dZ * c.w1 * c.q1;
  return {t.s1 * t.s2,
          dA * c.w2,
          dB * c.w2,
          {dZ * (c.q0 * t.A + c.q1 * t.B), dZ, dA * M + dB * m, dA + dB,
           dZ * c.w1 * c.w2 * (M - m)}};
}

// p's gradient from D, the sum of dq0 - dq1 over every (n, c).
template <typename Acc>
SPEM_HD void p_gradient(const Acc* p, Acc D, Acc* dp) {
  const Acc a = p[0] * p[0], b = p[1] * p[1], P = a + b;
  const Acc s = Acc(2) * D / (P * P);
  dp[0] = s * p[0] * b;
  dp[1] = -s * p[1] * a;
}

// Running max and min of part of a plane with their positions, ignoring NaN (counted apart).
template <typename Acc>
struct Extremes {
  Acc max, min;
  int32_t imax, imin;
  int32_t nan;  // nonzero when the part holds a NaN: the plane's stats become NaN

  // Position 0 is right when nothing beats -inf / +inf: then every non-NaN element equals it.
  SPEM_HD static Extremes empty() { return {-INFINITY, INFINITY, 0, 0, 0}; }

  // Elements must come in increasing position: strict comparisons keep the first one.
  SPEM_HD void add(Acc v, int32_t pos) {
    if (v > max) max = v, imax = pos;
    if (v < min) min = v, imin = pos;
    nan |= v != v;
  }

  // Any order of merging gives the same result: ties go to the smaller position.
  SPEM_HD void merge(const Extremes& o) {
    if (o.max > max || (o.max == max && o.imax < imax)) max = o.max, imax = o.imax;
    if (o.min < min || (o.min == min && o.imin < imin)) min = o.min, imin = o.imin;
    nan |= o.nan;
  }
};

}  // namespace spem_native
