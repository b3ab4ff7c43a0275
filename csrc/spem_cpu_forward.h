// The CPU forward walks of SPEM (spem_cpu.cpp) and of spem_bn (spem_bn_cpu.cpp): per plane
// the max and min, the gate, and the block tail relu?(g x + residual) written out, where x is
// what a Norm makes of each stored element (NoNorm: x itself; spem_bn: its BatchNorm,
// x = y alpha[c] + beta[c]). Two walks, picked by the layout:
// - plane-major (NCHW and anything else): at::parallel_for over planes (n, c), kLanes planes
//   at a time. A plane is walked row by row (one row of H*W when every tensor's plane is
//   flat) in kLanes lanes; the group's lanes are then folded so that lane j holds plane j's
//   max and min, the group's gates come out of one vector computation, and each plane is
//   written. Small planes (8x8: four vectors) thus cost little beyond their loads and stores,
//   and a group (64 KiB at 32x32 float32) stays in L2 between the reduction and the write, so
//   memory is read once per direction.
// - channel-major (channels_last, x.stride(1) == 1): at::parallel_for over (n, block of
//   channels); the lanes are the channels, contiguous in memory, and the block is sized to stay
//   in L2 between the two passes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "spem_cpu_lanes.h"
#include "spem_cpu_walk.h"
#include "spem_math.h"
#include "spem_op.h"

namespace spem_native {

// The Norm of SPEM itself: x as stored. plane(c): the map of channel c's elements;
// lanes(c0, count): that of channels c0 .. c0 + count - 1, lane j channel c0 + j.
struct NoNorm {
  Identity plane(int64_t) const { return {}; }
  template <typename Acc>
  Identity lanes(int64_t, int64_t) const {
    return {};
  }
};

// Per group of kLanes channels its map (channel-major rows: element j of a row is channel j):
// element i of a row through maps[i / kLanes], lane i % kLanes.
template <typename Map>
struct ByGroup {
  const Map* maps;
  template <typename V>
  V operator()(V v, int64_t i) const {
    if constexpr (std::is_arithmetic_v<V>)
      return maps[i / kLanes].lane(static_cast<int>(i % kLanes))(v);
    else
      return maps[i / kLanes](v);
  }
};

template <typename Acc>
struct Params {
  const Acc *w1, *b1, *w2, *b2, *p;
  ChannelParams<Acc> channel(int64_t c) const { return load_params(w1, b1, w2, b2, p, c); }

  // The parameters of kLanes consecutive planes nc0, nc0 + 1, ...: lane j has those of
  // channel (nc0 + j) % C.
  ChannelParams<Vec<Acc>> lanes(int64_t nc0, int64_t C) const {
    const ChannelParams<Acc> shared = channel(0);  // q0, q1 are every channel's
    ChannelParams<Vec<Acc>> v;
    v.q0 = Vec<Acc>{} + shared.q0;
    v.q1 = Vec<Acc>{} + shared.q1;
    for (int64_t j = 0, c = nc0 % C; j < kLanes; ++j, c = c + 1 == C ? 0 : c + 1)
      v.w1[j] = w1[c], v.b1[j] = b1[c], v.w2[j] = w2[c], v.b2[j] = b2[c];
    return v;
  }
};

// The gates of kLanes consecutive planes nc0, nc0 + 1, ... from their extremes (lane j: plane
// nc0 + j), storing (Track) the stats and positions of the first `count` (the other lanes are
// padding).
// Both walks get every gate from here: a plane's gate does not depend on the walk or group.
template <typename Acc, bool Track>
Vec<Acc> finish_planes(const LaneExtremes<Acc, Track>& e, const Params<Acc>& prm, int64_t nc0,
                       int count, int64_t C, Acc* stats, int32_t* idx) {
  const Vec<Acc> nan = Vec<Acc>{} + Acc(NAN);
  const Vec<Acc> M = e.nan != 0 ? nan : e.max, m = e.nan != 0 ? nan : e.min;
  for (int j = 0; Track && j < count; ++j) {
    const int64_t nc = nc0 + j;
    stats[2 * nc] = M[j], stats[2 * nc + 1] = m[j];
    idx[2 * nc] = static_cast<int32_t>(e.imax[j]),
            idx[2 * nc + 1] = static_cast<int32_t>(e.imin[j]);
  }
  const Gate<Vec<Acc>> t = plane_gate(M, m, prm.lanes(nc0, C));
  return t.s1 * t.s2;
}

// Track: the forward of a call that a backward may follow, which stores each plane's stats and
// positions; without, only the output is written.
template <typename T, typename Acc, bool Unit, bool HasRes, bool Relu, bool Track,
          typename Norm = NoNorm>
void forward_plane_major(const at::Tensor& x_t, const at::Tensor& r_t, const at::Tensor& o_t,
                         Acc* stats, int32_t* idx, const Params<Acc>& prm, Norm norm = {}) {
  const int64_t C = x_t.size(1), HW = x_t.size(2) * x_t.size(3);
  const Rows walk = plane_rows({x_t, r_t, o_t});
  const View<const T> x(x_t), r(r_t);
  const View<T> o(o_t);
  const int64_t grain = std::max<int64_t>(kLanes, kTileElements / HW);
  at::parallel_for(0, x_t.size(0) * C, grain, [&](int64_t begin, int64_t end) {
    LaneExtremes<Acc, Track> planes[kLanes];
    Vec<Acc> gates;
    walk_groups(begin, end, C, kLanes, [&](int j, const PlaneIndex& at) {
      LaneExtremes<Acc, Track> e;
      for (int64_t row = 0; row < walk.rows; ++row)
        e.template add_row<Unit>(x.plane(at.n, at.c) + row * x.sh, x.sw, walk.len,
                                 row * walk.len, norm.plane(at.c));
      planes[j] = e;
    }, [&](int64_t nc0, int count) {
      std::fill(planes + count, planes + kLanes, LaneExtremes<Acc, Track>());
      gates = finish_planes(fold_extremes(planes), prm, nc0, count, C, stats, idx);
    }, [&](int j, const PlaneIndex& at) {
      const T *xp = x.plane(at.n, at.c), *rp = r.plane(at.n, at.c);
      T* op = o.plane(at.n, at.c);
      const Vec<Acc> g = Vec<Acc>{} + gates[j];
      for (int64_t row = 0; row < walk.rows; ++row)
        write_out_row<Unit, HasRes, Relu>(xp + row * x.sh, x.sw, rp + row * r.sh, r.sw,
                                          op + row * o.sh, o.sw, walk.len,
                                          [&](int64_t) { return g; }, norm.plane(at.c));
    });
  });
}

template <typename T, typename Acc, bool Unit, bool HasRes, bool Relu, bool Track,
          typename Norm = NoNorm>
void forward_channel_major(const at::Tensor& x_t, const at::Tensor& r_t, const at::Tensor& o_t,
                           Acc* stats, int32_t* idx, const Params<Acc>& prm, Norm norm = {}) {
  using V = Vec<Acc>;
  const int64_t N = x_t.size(0), C = x_t.size(1), H = x_t.size(2), W = x_t.size(3);
  const int64_t block = channel_block(C, H * W), blocks = (C + block - 1) / block;
  const View<const T> x(x_t), r(r_t);
  const View<T> o(o_t);
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    // Channel j of the block is lane j % kLanes of group j / kLanes.
    LaneExtremes<Acc, Track> groups[kMaxChannelBlock / kLanes];
    V gate[kMaxChannelBlock / kLanes];
    using Map = decltype(norm.template lanes<Acc>(0, 0));
    Map maps[kMaxChannelBlock / kLanes];
    const int64_t sxc = Unit ? 1 : x.sc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block;
      const int64_t cb = std::min(block, C - c0), full = cb / kLanes;
      const int64_t used = (cb + kLanes - 1) / kLanes;
      const T *xp = x.plane(n, c0), *rp = r.plane(n, c0);
      T* op = o.plane(n, c0);
      for (int64_t k = 0; k < used; ++k)
        maps[k] = norm.template lanes<Acc>(c0 + k * kLanes,
                                           std::min<int64_t>(kLanes, cb - k * kLanes));
      // kChains groups at a time over every position, their extremes in registers.
      for (int64_t k0 = 0; k0 < full; k0 += kChains) {
        LaneExtremes<Acc, Track> e[kChains];
        const int64_t kn = std::min<int64_t>(kChains, full - k0);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            const T* y = xp + h * x.sh + w * x.sw + k0 * kLanes * sxc;
            const IVec<Acc> positions = IVec<Acc>{} + static_cast<Pos<Acc>>(h * W + w);
            for (int k = 0; k < kChains; ++k)
              if (k < kn)
                e[k].add(maps[k0 + k](load<Acc, Unit>(y + k * kLanes * sxc, sxc)), positions);
          }
        std::copy(e, e + kn, groups + k0);
      }
      if (full < used) {  // the last few channels, fewer than kLanes, one by one
        groups[full] = LaneExtremes<Acc, Track>();
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            const T* y = xp + h * x.sh + w * x.sw;
            for (int64_t j = full * kLanes; j < cb; ++j)
              groups[full].add_one(j % kLanes,
                                   maps[full].lane(j % kLanes)(static_cast<Acc>(y[j * sxc])),
                                   h * W + w);
          }
      }
      for (int64_t k = 0; k < used; ++k)
        gate[k] = finish_planes(groups[k], prm, n * C + c0 + k * kLanes,
                                static_cast<int>(std::min<int64_t>(kLanes, cb - k * kLanes)), C,
                                stats, idx);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          write_out_row<Unit, HasRes, Relu>(xp + h * x.sh + w * x.sw, x.sc,
                                            rp + h * r.sh + w * r.sw, r.sc,
                                            op + h * o.sh + w * o.sw, o.sc, cb, [&](int64_t j) {
            return gate[j / kLanes];
          }, ByGroup<Map>{maps});
    }
  });
}


template <typename Acc>
Params<Acc> params_of(const ParamTensors& p) {
  return {p[0].data_ptr<Acc>(), p[1].data_ptr<Acc>(), p[2].data_ptr<Acc>(), p[3].data_ptr<Acc>(),
          p[4].data_ptr<Acc>()};
}

// out = relu?(g x + residual), and with Track each plane's stats and positions; x through
// make_norm(Acc()), the Norm in x's compute type.
template <bool Track, typename MakeNorm>
void forward_walk(const at::Tensor& x, const ParamTensors& prm,
                  const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out,
                  const at::Tensor& stats, const at::Tensor& idx, MakeNorm make_norm) {
  const bool has_res = residual.has_value();
  const at::Tensor& res = has_res ? *residual : x;  // read only with a residual
  const bool by_channel = channel_major(x);
  const bool unit = unit_stride({x, res, out}, by_channel ? 1 : 3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_forward_cpu",
                                  [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    Acc* s = Track ? stats.data_ptr<Acc>() : nullptr;
    int32_t* i = Track ? idx.data_ptr<int32_t>() : nullptr;
    with_bool(unit, [&](auto U) {
      with_bool(has_res, [&](auto R) {
        with_bool(relu, [&](auto L) {
          const auto norm = make_norm(Acc());
          if (by_channel)
            forward_channel_major<T, Acc, U, R, L, Track>(x, res, out, s, i, params_of<Acc>(prm),
                                                          norm);
          else
            forward_plane_major<T, Acc, U, R, L, Track>(x, res, out, s, i, params_of<Acc>(prm),
                                                        norm);
        });
      });
    });
  });
}

}  // namespace spem_native
