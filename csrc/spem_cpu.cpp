// CPU kernels of the spem_native ops (math: spem_math.h and SPEM.md; SIMD building blocks:
// spem_cpu_lanes.h).
//
// The forward walks are in spem_cpu_forward.h (shared with spem_bn); the backward here walks
// the same way: plane-major (kLanes small planes at a time, larger ones one by one) or
// channel-major (lanes are channels). Every tensor is addressed through its own strides, so
// no input is copied.
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

#include "spem_cpu_forward.h"
#include "spem_cpu_lanes.h"
#include "spem_cpu_walk.h"
#include "spem_math.h"
#include "spem_op.h"
#include "spem_op_entries.h"

namespace spem_native {
namespace {

// --- backward ---

// Per plane: read stats, compute the gradients' coefficients once S is known (kLanes planes at
// a time, as the forward's gates), write partials, and hand the writing rows dM, dm with
// their saved positions (added there in the order of every kernel: G g, + dM, + dm).
template <typename T, typename Acc, bool Relu>
struct PlaneBackward {
  const Acc* stats;
  const int32_t* idx;
  Acc* part;
  Params<Acc> prm;
  int64_t C;

  // Lane j: plane nc0 + j, from its S; partials stored for the first `count`.
  PlaneGrads<Vec<Acc>> grads(const Vec<Acc>& S, int64_t nc0, int count) const {
    Vec<Acc> M{}, m{};
    for (int j = 0; j < count; ++j) M[j] = stats[2 * (nc0 + j)], m[j] = stats[2 * (nc0 + j) + 1];
    const PlaneGrads<Vec<Acc>> pg = plane_grads(S, M, m, prm.lanes(nc0, C));
    for (int j = 0; j < count; ++j)
      for (int k = 0; k < kPartials; ++k) part[kPartials * (nc0 + j) + k] = pg.part[k][j];
    return pg;
  }

  // One plane's, in lane 0: the same math without vectors, for large planes walked one by one.
  PlaneGrads<Vec<Acc>> grads_one(Acc S, int64_t nc) const {
    const PlaneGrads<Acc> pg =
        plane_grads(S, stats[2 * nc], stats[2 * nc + 1], prm.channel(nc % C));
    std::copy(pg.part, pg.part + kPartials, part + kPartials * nc);
    PlaneGrads<Vec<Acc>> lanes{};
    lanes.g[0] = pg.g, lanes.dM[0] = pg.dM, lanes.dm[0] = pg.dm;
    return lanes;
  }

  // Lane j of pg (plane nc0 + j), for input_grad_row: its dM, dm and their positions in
  // every lane.
  ExtremeGrads<Vec<Acc>, IVec<Acc>> extremes(const PlaneGrads<Vec<Acc>>& pg, int j,
                                             int64_t nc) const {
    return {Vec<Acc>{} + pg.dM[j], Vec<Acc>{} + pg.dm[j], IVec<Acc>{} + idx[2 * nc],
            IVec<Acc>{} + idx[2 * nc + 1]};
  }

  // Planes nc0 .. nc0 + count - 1 in lanes 0 .. count - 1 (the others never match).
  ExtremeGrads<Vec<Acc>, IVec<Acc>> extremes(const PlaneGrads<Vec<Acc>>& pg, int64_t nc0,
                                             int count) const {
    ExtremeGrads<Vec<Acc>, IVec<Acc>> e{pg.dM, pg.dm, IVec<Acc>{} - 1, IVec<Acc>{} - 1};
    for (int j = 0; j < count; ++j)
      e.imax[j] = idx[2 * (nc0 + j)], e.imin[j] = idx[2 * (nc0 + j) + 1];
    return e;
  }
};

// Planes of at most this many elements go through the plane-major backward kLanes at a time;
// larger ones one by one. Measured, backward alone, 1 thread, batch 32, grouped vs one by one:
// 8x8 bfloat16 1.46x faster, float32 even; 16x16 float32 1.6x slower, bfloat16 1.2x slower
// (so were groups of 2 to 8 planes sized to stay in L1: the second pass's re-reads of grad
// and out are not the whole story, and one plane at a time keeps memory streaming best).
constexpr int64_t kGroupedPlane = 128;

template <typename T, typename Acc, bool Unit, bool Relu, bool WriteDres>
void backward_plane_major(const BackwardViews<T>& v, const std::vector<at::Tensor>& ts,
                          const PlaneBackward<T, Acc, Relu>& pb) {
  const at::Tensor& x_t = ts[1];
  const int64_t C = x_t.size(1), HW = x_t.size(2) * x_t.size(3);
  const Rows walk = plane_rows(ts);
  const int64_t grain = std::max<int64_t>(kLanes, kTileElements / HW);
  const int group = HW <= kGroupedPlane ? kLanes : 1;
  at::parallel_for(0, x_t.size(0) * C, grain, [&](int64_t begin, int64_t end) {
    Vec<Acc> sums[kLanes];
    PlaneGrads<Vec<Acc>> grads;
    walk_groups(begin, end, C, group, [&](int j, const PlaneIndex& at) {
      Vec<Acc> S{};
      for (int64_t row = 0; row < walk.rows; ++row)
        dot_row<Unit, Relu, T, Acc>(v.grad.plane(at.n, at.c) + row * v.grad.sh, v.grad.sw,
                                    v.out.plane(at.n, at.c) + row * v.out.sh, v.out.sw,
                                    v.x.plane(at.n, at.c) + row * v.x.sh, v.x.sw, walk.len, S);
      sums[j] = S;
    }, [&](int64_t nc0, int count) {
      if (group == 1) {
        grads = pb.grads_one(sum_lanes<Acc>(sums[0]), nc0);
        return;
      }
      std::fill(sums + count, sums + kLanes, Vec<Acc>{});
      grads = pb.grads(fold_sums<Acc>(sums), nc0, count);
    }, [&](int j, const PlaneIndex& at) {
      const T *gp = v.grad.plane(at.n, at.c), *op = v.out.plane(at.n, at.c);
      T *dp = v.dx.plane(at.n, at.c), *drp = v.dres.plane(at.n, at.c);
      const Vec<Acc> g = Vec<Acc>{} + grads.g[j];
      const auto ext = pb.extremes(grads, j, at.n * C + at.c);
      for (int64_t row = 0; row < walk.rows; ++row)
        input_grad_row<Unit, Relu, WriteDres>(gp + row * v.grad.sh, v.grad.sw,
                                              op + row * v.out.sh, v.out.sw, dp + row * v.dx.sh,
                                              v.dx.sw, drp + row * v.dres.sh, v.dres.sw,
                                              walk.len, [&](int64_t) {
          return g;
        }, [&](int64_t) { return ext; }, row_positions<Acc>(row * walk.len));
    });
  });
}

template <typename T, typename Acc, bool Unit, bool Relu, bool WriteDres>
void backward_channel_major(const BackwardViews<T>& v, const std::vector<at::Tensor>& ts,
                            const PlaneBackward<T, Acc, Relu>& pb) {
  using V = Vec<Acc>;
  const at::Tensor& x_t = ts[1];
  const int64_t N = x_t.size(0), C = x_t.size(1), H = x_t.size(2), W = x_t.size(3);
  const int64_t block = channel_block(C, H * W), blocks = (C + block - 1) / block;
  const int64_t sgc = Unit ? 1 : v.grad.sc, sxc = Unit ? 1 : v.x.sc, soc = Unit ? 1 : v.out.sc;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    // Channel j of the block is lane j % kLanes of group j / kLanes.
    V sums[kMaxChannelBlock / kLanes];
    PlaneGrads<V> grads[kMaxChannelBlock / kLanes];
    ExtremeGrads<V, IVec<Acc>> ext[kMaxChannelBlock / kLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block;
      const int64_t cb = std::min(block, C - c0), full = cb / kLanes;
      const int64_t used = (cb + kLanes - 1) / kLanes;
      const T *gp = v.grad.plane(n, c0), *xp = v.x.plane(n, c0), *op = v.out.plane(n, c0);
      T *dp = v.dx.plane(n, c0), *drp = v.dres.plane(n, c0);
      // kChains groups at a time over every position, their sums in registers.
      for (int64_t k0 = 0; k0 < full; k0 += kChains) {
        V S[kChains] = {};
        const int64_t kn = std::min<int64_t>(kChains, full - k0);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) {
            const int64_t j0 = k0 * kLanes;
            const T* g = gp + h * v.grad.sh + w * v.grad.sw + j0 * sgc;
            const T* o = op + h * v.out.sh + w * v.out.sw + j0 * soc;
            const T* y = xp + h * v.x.sh + w * v.x.sw + j0 * sxc;
            for (int k = 0; k < kChains; ++k) {
              if (k >= kn) continue;
              const V ov = Relu ? load<Acc, Unit>(o + k * kLanes * soc, soc) : V{};
              S[k] += relu_grad<Relu>(load<Acc, Unit>(g + k * kLanes * sgc, sgc), ov) *
                      load<Acc, Unit>(y + k * kLanes * sxc, sxc);
            }
          }
        std::copy(S, S + kn, sums + k0);
      }
      if (full < used) {  // the last few channels, fewer than kLanes
        sums[full] = V{};
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w)
            dot_row<false, Relu, T, Acc>(gp + h * v.grad.sh + w * v.grad.sw +
                                             full * kLanes * sgc,
                                         sgc,
                                         op + h * v.out.sh + w * v.out.sw + full * kLanes * soc,
                                         soc, xp + h * v.x.sh + w * v.x.sw + full * kLanes * sxc,
                                         sxc, cb - full * kLanes, sums[full]);
      }
      for (int64_t k = 0; k < used; ++k)
        grads[k] = pb.grads(sums[k], n * C + c0 + k * kLanes,
                            static_cast<int>(std::min<int64_t>(kLanes, cb - k * kLanes)));
      for (int64_t k = 0; k < used; ++k)
        ext[k] = pb.extremes(grads[k], n * C + c0 + k * kLanes,
                             static_cast<int>(std::min<int64_t>(kLanes, cb - k * kLanes)));
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          input_grad_row<Unit, Relu, WriteDres>(gp + h * v.grad.sh + w * v.grad.sw, v.grad.sc,
                                                op + h * v.out.sh + w * v.out.sw, v.out.sc,
                                                dp + h * v.dx.sh + w * v.dx.sw, v.dx.sc,
                                                drp + h * v.dres.sh + w * v.dres.sw, v.dres.sc,
                                                cb, [&](int64_t j) {
            return grads[j / kLanes].g;
          }, [&](int64_t j) -> const ExtremeGrads<V, IVec<Acc>>& {
            return ext[j / kLanes];
          }, [&](int64_t) { return IVec<Acc>{} + static_cast<Pos<Acc>>(h * W + w); });
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

// The CPU's kernels for spem's ops (spem_op_entries.h).
struct CpuSpem {
  static NoDeviceGuard enter(const at::Tensor&) { return {}; }

  static void forward(const at::Tensor& x, const ParamTensors& prm,
                      const std::optional<at::Tensor>& residual, bool relu,
                      const at::Tensor& out, const at::Tensor& stats, const at::Tensor& idx) {
    with_bool(stats.defined(), [&](auto Save) {
      forward_walk<Save>(x, prm, residual, relu, out, stats, idx, [](auto) { return NoNorm(); });
    });
  }

  static void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                       const at::Tensor& stats, const at::Tensor& idx, bool relu,
                       bool write_dres, BackwardSetup& s);
};

void CpuSpem::backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                       const at::Tensor& stats, const at::Tensor& idx, bool relu,
                       bool write_dres, BackwardSetup& s) {
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor part = at::zeros({N, C, kPartials}, x.options().dtype(s.acc));
  const at::Tensor stats_c = stats.contiguous(), idx_c = idx.contiguous();
  const at::Tensor& dr = write_dres ? s.dres : s.dx;  // written only when write_dres
  const std::vector<at::Tensor> ts = {grad, x, out, s.dx, dr};
  const bool by_channel = channel_major(x);
  const bool unit = unit_stride(ts, by_channel ? 1 : 3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_backward_cpu",
                                  [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const BackwardViews<T> v{grad, x, out, s.dx, dr};
    with_bool(relu, [&](auto L) {
      const PlaneBackward<T, Acc, L> pb{stats_c.data_ptr<Acc>(), idx_c.data_ptr<int32_t>(),
                                        part.data_ptr<Acc>(), params_of<Acc>(s.params), C};
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
  AT_DISPATCH_FLOATING_TYPES(s.acc, "spem_reduce_partials", [&] {
    reduce_partials(part.data_ptr<scalar_t>(), N, C, s.params[4].data_ptr<scalar_t>(),
                    s.grads.written);
  });
}

}  // namespace
}  // namespace spem_native

SPEM_TORCH_LIBRARY_IMPL(SPEM_LIBRARY, CPU, m) {
  spem_native::register_spem_ops<spem_native::CpuSpem>(m);
}
