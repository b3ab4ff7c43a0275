// How the CPU kernels (spem_cpu.cpp) walk tensors: views through strides, the plane-major walk
// in groups of kLanes planes, the channel-major walk's blocks, and the row kernels that both
// walks' passes are made of (the block tail relu?(g y + residual) and its gradients). Written
// for any kernel of this shape: a row kernel takes a map f of each element of x (for SPEM the
// identity; a kernel that normalises x first, y = x * alpha[c] + beta[c], passes its own).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "spem_cpu_lanes.h"

namespace spem_native {

constexpr int64_t kTileElements = 1 << 15;  // per parallel task: 128 KiB of float32
constexpr int64_t kMaxChannelBlock = 256;

template <typename T>
struct View {
  T* data;
  int64_t sn, sc, sh, sw;

  View(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())),
        sn(t.stride(0)),
        sc(t.stride(1)),
        sh(t.stride(2)),
        sw(t.stride(3)) {}
  T* plane(int64_t n, int64_t c) const { return data + n * sn + c * sc; }
  T& at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return plane(n, c)[h * sh + w * sw];
  }
};

// Plane nc = n * C + c as (n, c), stepped without a division per plane.
struct PlaneIndex {
  int64_t n, c;
  PlaneIndex(int64_t nc, int64_t C) : n(nc / C), c(nc % C) {}
  void next(int64_t C) {
    if (++c == C) c = 0, ++n;
  }
};

// Planes [begin, end) in groups of `group` (at most kLanes), each plane passed over twice:
// first(j, at) for plane j of a group (at: its (n, c)), then once per group finish(nc0, count)
// (count: the planes in the group, which the task's end may cut short), then second(j, at).
// A group of kLanes planes lets finish compute for all of them at once in vectors (lane j:
// plane j); group 1 suits planes large enough that their own passes dominate.
template <typename First, typename Finish, typename Second>
void walk_groups(int64_t begin, int64_t end, int64_t C, int group, First first, Finish finish,
                 Second second) {
  for (int64_t nc0 = begin; nc0 < end; nc0 += group) {
    const int count = static_cast<int>(std::min<int64_t>(group, end - nc0));
    PlaneIndex at(nc0, C);
    for (int j = 0; j < count; ++j, at.next(C)) first(j, at);
    finish(nc0, count);
    at = PlaneIndex(nc0, C);
    for (int j = 0; j < count; ++j, at.next(C)) second(j, at);
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// Plane-major walk: `rows` rows of `len` elements; row r of a tensor starts at r * sh.
struct Rows {
  int64_t rows, len;
};

inline bool plane_is_flat(const at::Tensor& t) {
  return t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

inline Rows plane_rows(const std::vector<at::Tensor>& ts) {
  const auto& x = ts.front();
  const bool flat = std::all_of(ts.begin(), ts.end(), plane_is_flat);
  return flat ? Rows{1, x.size(2) * x.size(3)} : Rows{x.size(2), x.size(3)};
}

inline bool unit_stride(const std::vector<at::Tensor>& ts, int dim) {
  return std::all_of(ts.begin(), ts.end(),
                     [&](const at::Tensor& t) { return t.stride(dim) == 1; });
}

inline bool channel_major(const at::Tensor& x) { return x.stride(1) == 1 && x.size(1) > 1; }

// Channels per task in the channel-major walk: a tile of H*W*block elements.
inline int64_t channel_block(int64_t C, int64_t HW) {
  const int64_t block = std::clamp<int64_t>(kTileElements / HW / kLanes * kLanes,
                                            kChains * kLanes, kMaxChannelBlock);
  return std::min(C, block);
}

// The channel-major walk's sums over a plane, chunk by chunk: body(h, w) adds position (h, w)
// into a chunk's sums, flush() adds those into the totals after every kSumChunk positions and
// at the end. There each channel keeps one lane over all H W positions (C = 2 at 100x100:
// one float accumulator for 10000 values), whose rounding grows with H W; chunked, with
// kSumChunk + H W / kSumChunk (the plane-major walk's lanes split a plane likewise).
constexpr int64_t kSumChunk = 128;

template <typename Body, typename Flush>
void for_positions_in_chunks(int64_t H, int64_t W, Body body, Flush flush) {
  int64_t in_chunk = 0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      body(h, w);
      if (++in_chunk == kSumChunk) flush(), in_chunk = 0;
    }
  if (in_chunk > 0) flush();
}

// What a backward reads and writes, each through its strides (spem_bn: x is y, dx is dy).
template <typename T>
struct BackwardViews {
  View<const T> grad, x, out;
  View<T> dx, dres;
};

// relu?(gy + residual), for a value or a vector.
template <bool HasRes, bool Relu, typename V>
V block_tail(V gy, V residual) {
  V v = gy;
  if (HasRes) v += residual;
  if (Relu) v = relu(v);
  return v;
}

// out = relu?(g * f(x) + residual) over a row of `len` elements; gates(i) is the gate of
// elements i .. i + kLanes - 1 as a vector (a plane's row: the plane's gate in every lane;
// channel-major: each lane its channel's), and f may take i too (apply_map).
template <bool Unit, bool HasRes, bool Relu, typename T, typename Gates, typename F = Identity>
void write_out_row(const T* x, int64_t sx, const T* r, int64_t sr, T* o, int64_t so, int64_t len,
                   Gates gates, F f = {}) {
  using V = decltype(gates(0));
  using Acc = typename ElementOf<V>::type;
  if (Unit) sx = sr = so = 1;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    const V res = HasRes ? load<Acc, Unit>(r + i * sr, sr) : V{};
    store<Unit>(o + i * so, so,
                block_tail<HasRes, Relu>(gates(i) *
                                             apply_map(f, load<Acc, Unit>(x + i * sx, sx), i),
                                         res));
  }
  for (; i < len; ++i) {
    const Acc res = HasRes ? static_cast<Acc>(r[i * sr]) : Acc(0);
    const Acc gy = gates(i)[i % kLanes] * apply_map(f, static_cast<Acc>(x[i * sx]), i);
    o[i * so] = static_cast<T>(block_tail<HasRes, Relu>(gy, res));
  }
}

// sums += f(x) over one row of `len` elements, element i in lane i % kLanes.
template <bool Unit, typename T, typename Acc, typename F = Identity>
void sum_row(const T* x, int64_t sx, int64_t len, Vec<Acc>& sums, F f = {}) {
  if (Unit) sx = 1;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) sums += f(load<Acc, Unit>(x + i * sx, sx));
  for (; i < len; ++i) sums[i % kLanes] += f(static_cast<Acc>(x[i * sx]));
}

// S += G * f(x) over one row, in kLanes partial sums (G: grad through the ReLU).
template <bool Unit, bool Relu, typename T, typename Acc, typename F = Identity>
void dot_row(const T* grad, int64_t sg, const T* out, int64_t so, const T* x, int64_t sx,
             int64_t len, Vec<Acc>& sums, F f = {}) {
  using V = Vec<Acc>;
  if (Unit) sg = so = sx = 1;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    const V o = Relu ? load<Acc, Unit>(out + i * so, so) : V{};
    sums += relu_grad<Relu>(load<Acc, Unit>(grad + i * sg, sg), o) *
            f(load<Acc, Unit>(x + i * sx, sx));
  }
  for (; i < len; ++i) {
    const Acc o = Relu ? static_cast<Acc>(out[i * so]) : Acc(0);
    sums[i % kLanes] +=
        relu_grad<Relu>(static_cast<Acc>(grad[i * sg]), o) * f(static_cast<Acc>(x[i * sx]));
  }
}

// What the extremes add to the gradient reaching x: dM at position imax, dm at imin (as
// vectors: lane l's for the element in lane l; lane(l): lane l's alone).
template <typename V, typename P>
struct ExtremeGrads {
  V dM, dm;
  P imax, imin;
  ExtremeGrads<typename ElementOf<V>::type, typename ElementOf<P>::type> lane(int l) const {
    return {dM[l], dm[l], imax[l], imin[l]};
  }
  // d at position pos, + dM at the max, + dm at the min (in this order, as every kernel adds
  // them): selected in registers, so the extremes need no second visit.
  template <typename U, typename Q>
  U add(U d, Q pos) const {
    d = pos == imax ? d + dM : d;
    return pos == imin ? d + dm : d;
  }
};

// dx = G * g with the extremes' terms, and dres = G, over a row of `len` elements; gates(i),
// ext(i) and pos(i) are vectors whose lane i % kLanes holds element i's gate, ExtremeGrads
// and position in its plane (for i a multiple of kLanes: elements i .. i + kLanes - 1's).
template <bool Unit, bool Relu, bool WriteDres, typename T, typename Gates, typename Ext,
          typename Positions>
void input_grad_row(const T* grad, int64_t sg, const T* out, int64_t so, T* dx, int64_t sd,
                    T* dres, int64_t sdr, int64_t len, Gates gates, Ext ext, Positions pos) {
  using V = decltype(gates(0));
  using Acc = typename ElementOf<V>::type;
  if (Unit) sg = so = sd = sdr = 1;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    const V o = Relu ? load<Acc, Unit>(out + i * so, so) : V{};
    const V G = relu_grad<Relu>(load<Acc, Unit>(grad + i * sg, sg), o);
    store<Unit>(dx + i * sd, sd, ext(i).add(G * gates(i), pos(i)));
    if (WriteDres) store<Unit>(dres + i * sdr, sdr, G);
  }
  for (; i < len; ++i) {
    const Acc o = Relu ? static_cast<Acc>(out[i * so]) : Acc(0);
    const Acc G = relu_grad<Relu>(static_cast<Acc>(grad[i * sg]), o);
    const int l = static_cast<int>(i % kLanes);
    dx[i * sd] = static_cast<T>(ext(i).lane(l).add(G * gates(i)[l], pos(i)[l]));
    if (WriteDres) dres[i * sdr] = static_cast<T>(G);
  }
}

// Positions of a plane's row that starts at position pos0, in input_grad_row's form.
template <typename Acc>
auto row_positions(int64_t pos0) {
  return [pos0, iota = lane_iota<Acc>()](int64_t i) {
    return iota + static_cast<Pos<Acc>>(pos0 + i / kLanes * kLanes);
  };
}

}  // namespace spem_native
