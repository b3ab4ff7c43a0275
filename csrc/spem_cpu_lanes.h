// The SIMD building blocks of the CPU kernels (spem_cpu.cpp), in one place so that every CPU
// kernel loads, reduces and stores planes with the same pieces:
// - Vec<Acc>: kLanes values of the compute type as one GCC/Clang vector (IVec: the integers of
//   the same width, what a compare gives). The compiler lowers them to the target's SIMD:
//   AVX-512 registers with -march=native on this CPU, pairs of AVX2 registers in a portable
//   x86-64-v3 build. No intrinsics.
// - load / store: kLanes elements of the stored type <-> a vector of the compute type, converted
//   in registers. bfloat16 is the high half of a float32: a 16-bit shift one way, and the other
//   round-to-nearest-even in integer arithmetic, exactly as c10::BFloat16 rounds.
// - LaneExtremes: per-lane running max and min with their first positions; `fold` turns the
//   lanes of kLanes planes (their extremes, or sums) into one vector whose lane j is plane j's,
//   so that the per-plane math that follows (gate, gradients) runs on vectors too.
// Results never depend on how planes are grouped: every lane computes on its own, and ties are
// settled by position, not by the order of merging.
#pragma once

// A vector argument wider than the target's registers (x86-64-v3 builds) only draws a note
// about the calling convention; these functions are inlined into one library.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "spem_math.h"

namespace spem_native {

constexpr int kLanes = 16;  // one AVX-512 register of float32
// How many LaneExtremes (5 vectors each) a walk keeps in registers at once: 4 take 20 of
// AVX-512's 32 registers; AVX2 has 16 registers of half the width.
#ifdef __AVX512F__
constexpr int kChains = 4;
#else
constexpr int kChains = 1;
#endif

template <typename Acc>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(kLanes * sizeof(int32_t))));
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(kLanes * sizeof(double))));
  typedef int64_t I __attribute__((vector_size(kLanes * sizeof(int64_t))));
};
template <typename Acc>
using Vec = typename Lanes<Acc>::V;
template <typename Acc>
using IVec = typename Lanes<Acc>::I;

// A position stored with the width of Acc, so one SIMD compare mask selects value and position.
template <typename Acc>
using Pos = std::conditional_t<sizeof(Acc) == 8, int64_t, int32_t>;

typedef uint16_t Bits16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Bits32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t Halves __attribute__((vector_size(kLanes * sizeof(uint32_t))));  // of Bits32

// kLanes elements at p, p + s, ... (Unit: s = 1) as the compute type.
template <typename Acc, bool Unit, typename T>
Vec<Acc> load(const T* p, int64_t s) {
  Vec<Acc> v;
  if constexpr (Unit && std::is_same_v<T, Acc>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (Unit && std::is_same_v<T, c10::BFloat16>) {
    // Each bfloat16 becomes the high half of a 32-bit lane whose low half is 0: one shuffle.
    // (__builtin_convertvector and a shift give the same, in five instructions with GCC 12.)
    Bits16 h;
    std::memcpy(&h, p, sizeof(h));
    v = bit_as<Vec<Acc>>(__builtin_shufflevector(Bits16{}, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20,
                                                 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11,
                                                 27, 12, 28, 13, 29, 14, 30, 15, 31));
  } else {
    for (int l = 0; l < kLanes; ++l) v[l] = static_cast<Acc>(p[l * (Unit ? 1 : s)]);
  }
  return v;
}

// v rounded to T, stored at p, p + s, ... (Unit: s = 1).
template <bool Unit, typename T, typename V>
void store(T* p, int64_t s, V v) {
  using Acc = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (Unit && std::is_same_v<T, Acc>) {
    std::memcpy(p, &v, sizeof(v));
  } else if constexpr (Unit && std::is_same_v<T, c10::BFloat16>) {
    // c10::detail::round_to_nearest_even, lane-wise: NaN becomes the quiet NaN 0x7FC0. The
    // result is the high half of each rounded lane: one shuffle keeps those.
    const Bits32 u = bit_as<Bits32>(v);
    const Bits32 rounded = v != v ? Bits32{} + 0x7FC00000 : u + ((u >> 16) & 1) + 0x7FFF;
    const Halves halves = bit_as<Halves>(rounded);
    const Bits16 h = __builtin_shufflevector(halves, halves, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19,
                                             21, 23, 25, 27, 29, 31);
    std::memcpy(p, &h, sizeof(h));
  } else {
    for (int l = 0; l < kLanes; ++l) p[l * (Unit ? 1 : s)] = static_cast<T>(v[l]);
  }
}

template <typename Acc>
IVec<Acc> lane_iota() {
  IVec<Acc> iota;
  for (int l = 0; l < kLanes; ++l) iota[l] = l;
  return iota;
}

// How a kernel sees an element of x: its value in the compute type, from the stored one. For
// SPEM the identity; a kernel that normalises x first (y = x * alpha[c] + beta[c]) passes its
// own map, applied to vectors and to single values alike.
struct Identity {
  template <typename V>
  V operator()(V v) const {
    return v;
  }
  Identity lane(int) const { return {}; }
};

// x = y a + b (a BatchNorm): a, b one channel's values, or vectors whose lane j is channel
// j's; lane(l): lane l's map alone.
template <typename A>
struct Affine {
  A a, b;
  template <typename V>
  V operator()(V v) const {
    return v * a + b;
  }
  Affine<typename ElementOf<A>::type> lane(int l) const { return {a[l], b[l]}; }
};

// f(v), or f(v, i) for a map that differs along a row (element i of it).
template <typename F, typename V>
V apply_map(const F& f, V v, int64_t i) {
  if constexpr (std::is_invocable_v<const F&, V, int64_t>)
    return f(v, i);
  else
    return f(v);
}

// Per-lane running max/min with first positions; each lane must see increasing positions.
// Without Positions (a forward that no backward follows) only the values are kept: a max and a
// min instruction per vector instead of two compares and four blends. The values are the same.
template <typename Acc, bool Positions = true>
struct LaneExtremes {
  using V = Vec<Acc>;
  using I = IVec<Acc>;
  V max, min;
  I imax, imin, nan;  // positions: 0 without Positions

  LaneExtremes() : imax{}, imin{}, nan{} {
    for (int l = 0; l < kLanes; ++l) max[l] = -INFINITY, min[l] = INFINITY;
  }

  void add(V v, I pos) {
    if constexpr (Positions) {
      const I up = v > max, down = v < min;
      max = up ? v : max;
      imax = up ? pos : imax;
      min = down ? v : min;
      imin = down ? pos : imin;
    } else {
      max = v > max ? v : max;  // NaN keeps max: the max instruction's own rule
      min = v < min ? v : min;
    }
    nan |= v != v;
  }

  void add_one(int l, Acc v, int64_t pos) {
    if (v > max[l]) max[l] = v, imax[l] = Positions ? pos : 0;
    if (v < min[l]) min[l] = v, imin[l] = Positions ? pos : 0;
    if (v != v) nan[l] = 1;
  }

  // f(y[0]), f(y[s]), ..., f(y[(len - 1) s]) at positions pos0, pos0 + 1, ...: element i goes
  // to lane i % kLanes.
  template <bool Unit, typename T, typename F = Identity>
  void add_row(const T* y, int64_t stride, int64_t len, int64_t pos0, F f = {}) {
    const int64_t s = Unit ? 1 : stride;
    const I iota = lane_iota<Acc>();
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      add(f(load<Acc, Unit>(y + i * s, s)), iota + static_cast<Pos<Acc>>(pos0 + i));
    for (; i < len; ++i) add_one(i % kLanes, f(static_cast<Acc>(y[i * s])), pos0 + i);
  }

  // Lane-wise merge with `o`, whose lanes hold the same planes: the extreme value, and of equal
  // ones the smaller position (so the order of merging does not matter).
  void merge(const LaneExtremes& o) {
    if constexpr (Positions) {
      const I up = (o.max > max) | ((o.max == max) & (o.imax < imax));
      const I down = (o.min < min) | ((o.min == min) & (o.imin < imin));
      max = up ? o.max : max;
      imax = up ? o.imax : imax;
      min = down ? o.min : min;
      imin = down ? o.imin : imin;
    } else {
      max = o.max > max ? o.max : max;
      min = o.min < min ? o.min : min;
    }
    nan |= o.nan;
  }
};

// --- folding kLanes planes' lanes into one vector ---
//
// fold(items, combine): item j reduced over its lanes into lane j of one result, for kLanes
// items at once (items is overwritten). log2(kLanes) rounds: round h takes two items a, b and
// splits them into lo (the lower h lanes of each run of 2h: a's in the first half, b's in the
// second) and hi (the upper h lanes), then combines lo with hi lane-wise, which halves both the
// items and the lanes each item spans. A plane of 8x8 float32 is four vectors: this costs it
// about one combine, where reducing one plane's lanes alone would cost four. Every plane's
// lanes meet in the same pattern whatever its slot, so the result does not depend on grouping.

// Output lane l of round h: from a for l < kLanes / 2, else from b, the k-th (k = l % (kLanes
// / 2)) of the lower (upper: hi) h lanes of each run of 2h.
constexpr int fold_lane(int l, int h, bool hi) {
  const int k = l % (kLanes / 2);
  return (l < kLanes / 2 ? 0 : kLanes) + k / h * 2 * h + k % h + (hi ? h : 0);
}

template <int H, bool Hi, typename V, int... L>
V fold_pick(V a, V b, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(a, b, fold_lane(L, H, Hi)...);
}

template <int H, bool Hi, typename V>
V fold_half(const V& a, const V& b) {
  return fold_pick<H, Hi>(a, b, std::make_integer_sequence<int, kLanes>{});
}

template <int H, bool Hi, typename Acc, bool Positions>
LaneExtremes<Acc, Positions> fold_half(const LaneExtremes<Acc, Positions>& a,
                                       const LaneExtremes<Acc, Positions>& b) {
  LaneExtremes<Acc, Positions> e;
  e.max = fold_half<H, Hi>(a.max, b.max);
  e.min = fold_half<H, Hi>(a.min, b.min);
  e.imax = fold_half<H, Hi>(a.imax, b.imax);
  e.imin = fold_half<H, Hi>(a.imin, b.imin);
  e.nan = fold_half<H, Hi>(a.nan, b.nan);
  return e;
}

template <int H, typename Item, typename Combine>
void fold_round(Item* items, Combine combine) {  // 2H items in, H out
  for (int k = 0; k < H; ++k)
    items[k] = combine(fold_half<H, false>(items[2 * k], items[2 * k + 1]),
                       fold_half<H, true>(items[2 * k], items[2 * k + 1]));
  if constexpr (H > 1) fold_round<H / 2>(items, combine);
}

template <typename Item, typename Combine>
Item fold(Item* items, Combine combine) {
  fold_round<kLanes / 2>(items, combine);
  return items[0];
}

// Lane j: the extremes of planes[j] (ties still to the first position).
template <typename Acc, bool Positions>
LaneExtremes<Acc, Positions> fold_extremes(LaneExtremes<Acc, Positions>* planes) {
  return fold(planes,
              [](LaneExtremes<Acc, Positions> lo, const LaneExtremes<Acc, Positions>& hi) {
    lo.merge(hi);
    return lo;
  });
}

// Lane j: the sum of sums[j]'s lanes, always added in the same tree.
template <typename Acc>
Vec<Acc> fold_sums(Vec<Acc>* sums) {
  return fold(sums, [](const Vec<Acc>& lo, const Vec<Acc>& hi) { return lo + hi; });
}

// The sum of one vector's lanes in fold_sums's tree: the same number for a plane either way.
template <typename Acc>
Acc sum_lanes(Vec<Acc> v) {
  for (int h = kLanes / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) v[l] += v[l + h];
  return v[0];
}

// x -> max(x, 0) for a value or a vector; NaN stays NaN, as torch.relu keeps it.
template <typename V>
V relu(V v) {
  const V zero{};
  return v < zero ? zero : v;
}

// The gradient through a ReLU from its output, as torch's ReLU backward (threshold_backward)
// takes it: 0 where out <= 0, else G. A NaN output passes G (NaN <= 0 is false), and so does
// +inf. 16-bit outputs are read as stored (SPEM.md, Backward).
template <bool Relu, typename V>
V relu_grad(V G, V out) {
  if constexpr (Relu) return out <= V{} ? V{} : G;
  return G;
}

}  // namespace spem_native
