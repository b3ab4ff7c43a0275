// CPU kernels of the spem_native ops (math: spem_math.h and SPEM.md; SIMD building blocks:
// spem_cpu_lanes.h).
//
// Two walks over the data, picked by x's layout; every tensor is addressed through its own
// strides, so no input is copied:
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
// Sums over a plane run in a fixed order, and the per-(n, c) partials of the parameter
// gradients are summed over n in order: results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "spem_cpu_lanes.h"
#include "spem_math.h"
#include "spem_op.h"

namespace spem_native {
namespace {

constexpr int64_t kTileElements = 1 << 15;  // per parallel task: 128 KiB of float32
constexpr int64_t kMaxChannelBlock = 256;

template <typename T>
struct View {
  T* data;
  int64_t sn, sc, sh, sw;

  View(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())),
        sn(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  T* plane(int64_t n, int64_t c) const { return data + n * sn + c * sc; }
  T& at(int64_t n, int64_t c, int64_t pos, int64_t W) const {
    return plane(n, c)[(pos / W) * sh + (pos % W) * sw];
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

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) f(std::true_type{}); else f(std::false_type{});
}

// Plane-major walk: `rows` rows of `len` elements; row r of a tensor starts at r * sh.
struct Rows {
  int64_t rows, len;
};

bool plane_is_flat(const at::Tensor& t) {
  return t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

Rows plane_rows(const std::vector<at::Tensor>& ts) {
  const auto& x = ts.front();
  const bool flat = std::all_of(ts.begin(), ts.end(), plane_is_flat);
  return flat ? Rows{1, x.size(2) * x.size(3)} : Rows{x.size(2), x.size(3)};
}

bool unit_stride(const std::vector<at::Tensor>& ts, int dim) {
  return std::all_of(ts.begin(), ts.end(), [&](const at::Tensor& t) { return t.stride(dim) == 1; });
}

bool channel_major(const at::Tensor& x) { return x.stride(1) == 1 && x.size(1) > 1; }

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

// The gate g = sigmoid(A + B) sigmoid(Z) of every lane. spem_exp has a vector form in float32;
// float64 (gradchecks) goes lane by lane.
template <typename Acc>
Vec<Acc> gate_lanes(const Vec<Acc>& M, const Vec<Acc>& m, const ChannelParams<Vec<Acc>>& c) {
  Vec<Acc> g;
  if constexpr (std::is_same_v<Acc, float>) {
    const Gate<Vec<Acc>> t = plane_gate(M, m, c);
    g = t.s1 * t.s2;
  } else {
    for (int j = 0; j < kLanes; ++j) {
      const Gate<Acc> t = plane_gate(M[j], m[j], {c.w1[j], c.b1[j], c.w2[j], c.b2[j], c.q0[j],
                                                  c.q1[j]});
      g[j] = t.s1 * t.s2;
    }
  }
  return g;
}

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
    idx[2 * nc] = static_cast<int32_t>(e.imax[j]), idx[2 * nc + 1] = static_cast<int32_t>(e.imin[j]);
  }
  return gate_lanes<Acc>(M, m, prm.lanes(nc0, C));
}

// relu?(gy + residual), for a value or a vector.
template <bool HasRes, bool Relu, typename V>
V block_tail(V gy, V residual) {
  V v = gy;
  if (HasRes) v += residual;
  if (Relu) v = relu(v);
  return v;
}

// out = relu?(g * y + residual) over one row.
template <bool Unit, bool HasRes, bool Relu, typename T, typename Acc>
void write_out_row(const T* y, int64_t sy, const T* r, int64_t sr, T* o, int64_t so,
                   int64_t len, Acc g) {
  using V = Vec<Acc>;
  if (Unit) sy = sr = so = 1;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    const V res = HasRes ? load<Acc, Unit>(r + i * sr, sr) : V{};
    store<Unit>(o + i * so, so,
                block_tail<HasRes, Relu>(g * load<Acc, Unit>(y + i * sy, sy), res));
  }
  for (; i < len; ++i) {
    const Acc res = HasRes ? static_cast<Acc>(r[i * sr]) : Acc(0);
    o[i * so] = static_cast<T>(block_tail<HasRes, Relu>(g * static_cast<Acc>(y[i * sy]), res));
  }
}

// Track: the forward of a call that a backward may follow, which stores each plane's stats and
// positions; without, only the output is written.
template <typename T, typename Acc, bool Unit, bool HasRes, bool Relu, bool Track>
void forward_plane_major(const at::Tensor& x_t, const at::Tensor& r_t, const at::Tensor& o_t,
                         Acc* stats, int32_t* idx, const Params<Acc>& prm) {
  const int64_t C = x_t.size(1), HW = x_t.size(2) * x_t.size(3);
  const Rows walk = plane_rows({x_t, r_t, o_t});
  const View<const T> x(x_t), r(r_t);
  const View<T> o(o_t);
  const int64_t grain = std::max<int64_t>(kLanes, kTileElements / HW);
  at::parallel_for(0, x_t.size(0) * C, grain, [&](int64_t begin, int64_t end) {
    LaneExtremes<Acc, Track> planes[kLanes];
    Acc gate[kLanes];
    for (int64_t nc0 = begin; nc0 < end; nc0 += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, end - nc0));
      PlaneIndex at(nc0, C);
      for (int j = 0; j < kLanes; ++j, at.next(C)) {
        LaneExtremes<Acc, Track> e;
        const T* xp = x.plane(at.n, at.c);
        for (int64_t row = 0; j < count && row < walk.rows; ++row)
          e.template add_row<Unit>(xp + row * x.sh, x.sw, walk.len, row * walk.len);
        planes[j] = e;
      }
      const Vec<Acc> g =
          finish_planes(LaneExtremes<Acc, Track>::fold(planes), prm, nc0, count, C, stats, idx);
      std::memcpy(gate, &g, sizeof(gate));
      at = PlaneIndex(nc0, C);
      for (int j = 0; j < count; ++j, at.next(C)) {
        const T *xp = x.plane(at.n, at.c), *rp = r.plane(at.n, at.c);
        T* op = o.plane(at.n, at.c);
        for (int64_t row = 0; row < walk.rows; ++row)
          write_out_row<Unit, HasRes, Relu>(xp + row * x.sh, x.sw, rp + row * r.sh, r.sw,
                                            op + row * o.sh, o.sw, walk.len, gate[j]);
      }
    }
  });
}

// Channels per task in the channel-major walk: a tile of H*W*block elements.
int64_t channel_block(int64_t C, int64_t HW) {
  const int64_t block = std::clamp<int64_t>(kTileElements / HW / kLanes * kLanes,
                                            kChains * kLanes, kMaxChannelBlock);
  return std::min(C, block);
}

template <typename T, typename Acc, bool Unit, bool HasRes, bool Relu, bool Track>
void forward_channel_major(const at::Tensor& x_t, const at::Tensor& r_t, const at::Tensor& o_t,
                           Acc* stats, int32_t* idx, const Params<Acc>& prm) {
  using V = Vec<Acc>;
  const int64_t N = x_t.size(0), C = x_t.size(1), H = x_t.size(2), W = x_t.size(3);
  const int64_t block = channel_block(C, H * W), blocks = (C + block - 1) / block;
  const View<const T> x(x_t), r(r_t);
  const View<T> o(o_t);
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    // Channel j of the block is lane j % kLanes of group j / kLanes.
    LaneExtremes<Acc, Track> groups[kMaxChannelBlock / kLanes];
    V gate[kMaxChannelBlock / kLanes];
    const int64_t sxc = Unit ? 1 : x.sc, src = Unit ? 1 : r.sc, soc = Unit ? 1 : o.sc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block;
      const int64_t cb = std::min(block, C - c0), full = cb / kLanes;
      const int64_t used = (cb + kLanes - 1) / kLanes;
      const T *xp = x.plane(n, c0), *rp = r.plane(n, c0);
      T* op = o.plane(n, c0);
      // kChains groups at a time over every position, their extremes in registers.
      for (int64_t k0 = 0; k0 < full; k0 += kChains) {
        LaneExtremes<Acc, Track> e[kChains];
        const int64_t kn = std::min<int64_t>(kChains, full - k0);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            const T* y = xp + h * x.sh + w * x.sw + k0 * kLanes * sxc;
            const IVec<Acc> positions = IVec<Acc>{} + static_cast<Pos<Acc>>(h * W + w);
            for (int k = 0; k < kChains; ++k)
              if (k < kn) e[k].add(load<Acc, Unit>(y + k * kLanes * sxc, sxc), positions);
          }
        std::copy(e, e + kn, groups + k0);
      }
      if (full < used) {  // the last few channels, fewer than kLanes, one by one
        groups[full] = LaneExtremes<Acc, Track>();
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            const T* y = xp + h * x.sh + w * x.sw;
            for (int64_t j = full * kLanes; j < cb; ++j)
              groups[full].add_one(j % kLanes, static_cast<Acc>(y[j * sxc]), h * W + w);
          }
      }
      for (int64_t k = 0; k < used; ++k)
        gate[k] = finish_planes(groups[k], prm, n * C + c0 + k * kLanes,
                                static_cast<int>(std::min<int64_t>(kLanes, cb - k * kLanes)), C,
                                stats, idx);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const T* y = xp + h * x.sh + w * x.sw;
          const T* res = rp + h * r.sh + w * r.sw;
          T* out = op + h * o.sh + w * o.sw;
          for (int64_t k = 0; k < full; ++k) {
            const int64_t j = k * kLanes;
            const V rv = HasRes ? load<Acc, Unit>(res + j * src, src) : V{};
            store<Unit>(out + j * soc, soc,
                        block_tail<HasRes, Relu>(gate[k] * load<Acc, Unit>(y + j * sxc, sxc), rv));
          }
          for (int64_t j = full * kLanes; j < cb; ++j) {
            const Acc rv = HasRes ? static_cast<Acc>(res[j * src]) : Acc(0);
            const Acc gy = gate[full][j % kLanes] * static_cast<Acc>(y[j * sxc]);
            out[j * soc] = static_cast<T>(block_tail<HasRes, Relu>(gy, rv));
          }
        }
    }
  });
}

// --- backward ---

// S += G * y over one row, in kLanes partial sums.
template <bool Unit, bool Relu, typename T, typename Acc>
void dot_row(const T* grad, int64_t sg, const T* out, int64_t so, const T* y, int64_t sy,
             int64_t len, Vec<Acc>& sums) {
  using V = Vec<Acc>;
  if (Unit) sg = so = sy = 1;
  const V zero = V{};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    V G = load<Acc, Unit>(grad + i * sg, sg);
    if (Relu) G = load<Acc, Unit>(out + i * so, so) > zero ? G : zero;
    sums += G * load<Acc, Unit>(y + i * sy, sy);
  }
  for (; i < len; ++i) {
    const Acc G = static_cast<Acc>(grad[i * sg]);
    const bool keep = !Relu || static_cast<Acc>(out[i * so]) > 0;
    sums[i % kLanes] += keep ? G * static_cast<Acc>(y[i * sy]) : Acc(0);
  }
}

// dx = G * g (the extremes are added afterwards), dres = G. The outputs are fresh tensors:
// __restrict__ tells the compiler they alias nothing, which it needs to vectorise two stores.
template <bool Unit, bool Relu, bool WriteDres, typename T, typename Acc>
void input_grad_row(const T* __restrict__ grad, int64_t sg, const T* __restrict__ out,
                    int64_t so, T* __restrict__ dx, int64_t sd, T* __restrict__ dres,
                    int64_t sdr, int64_t len, Acc g) {
  if (Unit) sg = so = sd = sdr = 1;
  for (int64_t i = 0; i < len; ++i) {
    Acc G = static_cast<Acc>(grad[i * sg]);
    if (Relu) G = static_cast<Acc>(out[i * so]) > 0 ? G : Acc(0);
    dx[i * sd] = static_cast<T>(G * g);
    if (WriteDres) dres[i * sdr] = static_cast<T>(G);
  }
}

template <typename T>
struct BackwardViews {
  View<const T> grad, x, out;
  View<T> dx, dres;
};

// Per plane: read stats, compute the gradients' coefficients once S is known, write partials,
// and add dM, dm at the saved positions (recomputed there, in the same order as the kernels:
// G g, + dM, + dm, rounded once).
template <typename T, typename Acc, bool Relu>
struct PlaneBackward {
  const BackwardViews<T>& v;
  const Acc* stats;
  const int32_t* idx;
  Acc* part;
  Params<Acc> prm;
  int64_t C, W;

  PlaneGrads<Acc> grads(int64_t n, int64_t c, Acc S) const {
    const int64_t nc = n * C + c;
    const PlaneGrads<Acc> pg = plane_grads(S, stats[2 * nc], stats[2 * nc + 1], prm.channel(c));
    std::copy(pg.part, pg.part + kPartials, part + kPartials * nc);
    return pg;
  }

  void add_extremes(int64_t n, int64_t c, const PlaneGrads<Acc>& pg) const {
    const int64_t nc = n * C + c;
    const int32_t imax = idx[2 * nc], imin = idx[2 * nc + 1];
    auto fix = [&](int32_t pos) {
      Acc G = static_cast<Acc>(v.grad.at(n, c, pos, W));
      if (Relu && !(static_cast<Acc>(v.out.at(n, c, pos, W)) > 0)) G = 0;
      Acc d = G * pg.g;
      if (pos == imax) d += pg.dM;
      if (pos == imin) d += pg.dm;
      v.dx.at(n, c, pos, W) = static_cast<T>(d);
    };
    fix(imax);
    if (imin != imax) fix(imin);
  }
};

template <typename Acc>
Acc sum_lanes(const Vec<Acc>& sums) {
  Acc s = 0;
  for (int l = 0; l < kLanes; ++l) s += sums[l];
  return s;
}

template <typename T, typename Acc, bool Unit, bool Relu, bool WriteDres>
void backward_plane_major(const BackwardViews<T>& v, const std::vector<at::Tensor>& ts,
                          const PlaneBackward<T, Acc, Relu>& pb) {
  const at::Tensor& x_t = ts[1];
  const int64_t C = x_t.size(1), HW = x_t.size(2) * x_t.size(3);
  const Rows walk = plane_rows(ts);
  const int64_t grain = std::max<int64_t>(1, kTileElements / HW);
  at::parallel_for(0, x_t.size(0) * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      const T *gp = v.grad.plane(n, c), *xp = v.x.plane(n, c), *op = v.out.plane(n, c);
      T *dp = v.dx.plane(n, c), *drp = v.dres.plane(n, c);
      Vec<Acc> sums = {};
      for (int64_t row = 0; row < walk.rows; ++row)
        dot_row<Unit, Relu, T, Acc>(gp + row * v.grad.sh, v.grad.sw, op + row * v.out.sh, v.out.sw,
                            xp + row * v.x.sh, v.x.sw, walk.len, sums);
      const PlaneGrads<Acc> pg = pb.grads(n, c, sum_lanes<Acc>(sums));
      for (int64_t row = 0; row < walk.rows; ++row)
        input_grad_row<Unit, Relu, WriteDres>(
            gp + row * v.grad.sh, v.grad.sw, op + row * v.out.sh, v.out.sw, dp + row * v.dx.sh,
            v.dx.sw, drp + row * v.dres.sh, v.dres.sw, walk.len, pg.g);
      pb.add_extremes(n, c, pg);
    }
  });
}

template <typename T, typename Acc, bool Unit, bool Relu, bool WriteDres>
void backward_channel_major(const BackwardViews<T>& v, const std::vector<at::Tensor>& ts,
                            const PlaneBackward<T, Acc, Relu>& pb) {
  const at::Tensor& x_t = ts[1];
  const int64_t N = x_t.size(0), C = x_t.size(1), H = x_t.size(2), W = x_t.size(3);
  const int64_t block = channel_block(C, H * W), blocks = (C + block - 1) / block;
  const int64_t sgc = Unit ? 1 : v.grad.sc, sxc = Unit ? 1 : v.x.sc, soc = Unit ? 1 : v.out.sc;
  const int64_t sdc = Unit ? 1 : v.dx.sc, sdrc = Unit ? 1 : v.dres.sc;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    Acc sums[kMaxChannelBlock], gate[kMaxChannelBlock];
    PlaneGrads<Acc> grads[kMaxChannelBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block;
      const int64_t cb = std::min(block, C - c0);
      const T *gp = v.grad.plane(n, c0), *xp = v.x.plane(n, c0), *op = v.out.plane(n, c0);
      T *dp = v.dx.plane(n, c0), *drp = v.dres.plane(n, c0);
      std::fill_n(sums, cb, Acc(0));
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const T* g = gp + h * v.grad.sh + w * v.grad.sw;
          const T* o = op + h * v.out.sh + w * v.out.sw;
          const T* y = xp + h * v.x.sh + w * v.x.sw;
          for (int64_t j = 0; j < cb; ++j) {
            const Acc keep = !Relu || static_cast<Acc>(o[j * soc]) > 0 ? Acc(1) : Acc(0);
            sums[j] += static_cast<Acc>(g[j * sgc]) * keep * static_cast<Acc>(y[j * sxc]);
          }
        }
      for (int64_t j = 0; j < cb; ++j) {
        grads[j] = pb.grads(n, c0 + j, sums[j]);
        gate[j] = grads[j].g;
      }
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const T* g = gp + h * v.grad.sh + w * v.grad.sw;
          const T* o = op + h * v.out.sh + w * v.out.sw;
          T* d = dp + h * v.dx.sh + w * v.dx.sw;
          T* dr = drp + h * v.dres.sh + w * v.dres.sw;
          for (int64_t j = 0; j < cb; ++j) {
            Acc G = static_cast<Acc>(g[j * sgc]);
            if (Relu) G = static_cast<Acc>(o[j * soc]) > 0 ? G : Acc(0);
            d[j * sdc] = static_cast<T>(G * gate[j]);
            if (WriteDres) dr[j * sdrc] = static_cast<T>(G);
          }
        }
      for (int64_t j = 0; j < cb; ++j) pb.add_extremes(n, c0 + j, grads[j]);
    }
  });
}

// The parameter gradients from the per-(n, c) partials: sums over n, in order of n, then p's
// gradient from the last column summed over c (spem_math.h).
template <typename Acc>
void reduce_partials(const Acc* part, int64_t N, int64_t C, const Acc* p,
                     const ParamTensors& grads) {
  std::vector<Acc> sums(C * kPartials, Acc(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < C * kPartials; ++k) sums[k] += part[n * C * kPartials + k];
  Acc D = 0;
  for (int64_t c = 0; c < C; ++c) {
    for (int k = 0; k < 4; ++k) grads[k].data_ptr<Acc>()[c] = sums[c * kPartials + k];
    D += sums[c * kPartials + 4];
  }
  p_gradient(p, D, grads[4].data_ptr<Acc>());
}

template <typename Acc>
Params<Acc> params_of(const ParamTensors& p) {
  return {p[0].data_ptr<Acc>(), p[1].data_ptr<Acc>(), p[2].data_ptr<Acc>(),
          p[3].data_ptr<Acc>(), p[4].data_ptr<Acc>()};
}

// out = relu?(g x + residual), and with Track each plane's stats and positions.
template <bool Track>
void forward_cpu(const at::Tensor& x, const ParamTensors& prm,
                 const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out,
                 const at::Tensor& stats, const at::Tensor& idx) {
  const bool has_res = residual.has_value();
  const at::Tensor& res = has_res ? *residual : x;  // read only with a residual
  const bool by_channel = channel_major(x);
  const bool unit = unit_stride({x, res, out}, by_channel ? 1 : 3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_forward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    Acc* s = Track ? stats.data_ptr<Acc>() : nullptr;
    int32_t* i = Track ? idx.data_ptr<int32_t>() : nullptr;
    with_bool(unit, [&](auto U) {
      with_bool(has_res, [&](auto R) {
        with_bool(relu, [&](auto L) {
          if (by_channel)
            forward_channel_major<T, Acc, U, R, L, Track>(x, res, out, s, i, params_of<Acc>(prm));
          else
            forward_plane_major<T, Acc, U, R, L, Track>(x, res, out, s, i, params_of<Acc>(prm));
        });
      });
    });
  });
}

ForwardResult spem_forward_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                               const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                               const std::optional<at::Tensor>& residual, bool relu) {
  check_forward(x, w1, b1, w2, b2, p, residual);
  auto [out, stats, idx] = allocate_forward(x);
  if (out.numel() > 0)
    forward_cpu<true>(x, compute_params(w1, b1, w2, b2, p, compute_dtype(x.scalar_type())),
                      residual, relu, out, stats, idx);
  return {out, stats, idx};
}

at::Tensor spem_output_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                           const std::optional<at::Tensor>& residual, bool relu) {
  check_forward(x, w1, b1, w2, b2, p, residual);
  at::Tensor out = at::empty_like(x);
  if (out.numel() > 0)
    forward_cpu<false>(x, compute_params(w1, b1, w2, b2, p, compute_dtype(x.scalar_type())),
                       residual, relu, out, at::Tensor(), at::Tensor());
  return out;
}

BackwardResult spem_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& out, const at::Tensor& stats,
                                 const at::Tensor& idx, const at::Tensor& w1,
                                 const at::Tensor& b1, const at::Tensor& w2,
                                 const at::Tensor& b2, const at::Tensor& p, bool relu,
                                 bool write_dres) {
  check_backward(grad, x, out, stats, idx, w1, b1, w2, b2, p);
  auto [dx, dres] = allocate_input_grads(x, write_dres);
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc = compute_dtype(x.scalar_type());
  const ParamTensors prm = compute_params(w1, b1, w2, b2, p, acc);
  ParamGrads grads = allocate_param_grads({w1, b1, w2, b2, p}, acc);
  at::Tensor part = at::zeros({N, C, kPartials}, x.options().dtype(acc));
  if (dx.numel() > 0) {
    const at::Tensor stats_c = stats.contiguous(), idx_c = idx.contiguous();
    const at::Tensor& dr = write_dres ? dres : dx;  // written only when write_dres
    const std::vector<at::Tensor> ts = {grad, x, out, dx, dr};
    const bool by_channel = channel_major(x);
    const bool unit = unit_stride(ts, by_channel ? 1 : 3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_backward_cpu", [&] {
      using T = scalar_t;
      using Acc = at::opmath_type<T>;
      const BackwardViews<T> v{grad, x, out, dx, dr};
      with_bool(relu, [&](auto L) {
        const PlaneBackward<T, Acc, L> pb{v, stats_c.data_ptr<Acc>(), idx_c.data_ptr<int32_t>(),
                                          part.data_ptr<Acc>(), params_of<Acc>(prm), C,
                                          x.size(3)};
        with_bool(unit, [&](auto U) {
          with_bool(write_dres, [&](auto D) {
            if (by_channel)
              backward_channel_major<T, Acc, U, L, D>(v, ts, pb);
            else
              backward_plane_major<T, Acc, U, L, D>(v, ts, pb);
          });
        });
      });
    });
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "spem_reduce_partials", [&] {
    reduce_partials(part.data_ptr<scalar_t>(), N, C, prm[4].data_ptr<scalar_t>(), grads.written);
  });
  grads.finish();
  const auto& [dw1, db1, dw2, db2, dp] = grads.result;
  return {dx, dres, dw1, db1, dw2, db2, dp};
}

}  // namespace
}  // namespace spem_native

TORCH_LIBRARY_IMPL(spem_native, CPU, m) {
  m.impl("spem_forward", &spem_native::spem_forward_cpu);
  m.impl("spem_output", &spem_native::spem_output_cpu);
  m.impl("spem_backward", &spem_native::spem_backward_cpu);
}
