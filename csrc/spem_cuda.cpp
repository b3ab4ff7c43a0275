// CUDA binding of the spem_native ops (spem's and spem_bn's): behind each op's entry point
// (spem_op_entries.h: checks, allocations), the tensors' data and strides go by name into the
// argument structs of spem_cuda.h, and the torch-free launchers of spem_cuda.cu run them on
// the current stream of x's device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "spem_bn_math.h"
#include "spem_cuda.h"
#include "spem_math.h"
#include "spem_op.h"
#include "spem_op_entries.h"

namespace spem_native {
namespace {

// The CUDA type with the same bits as a torch scalar type.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
T* data_of(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// An optional tensor's data: nullptr where it is absent (undefined).
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? data_of<T>(t) : nullptr;
}

// x (or y) must fit the kernels' grids: checked before anything is allocated, so that the
// error names the shape (see largest_grid).
void check_grid(const at::Tensor& x) {
  const int64_t blocks = largest_grid(strides_of(x), x.size(0), x.size(1), x.size(2), x.size(3),
                                      static_cast<int>(x.element_size()));
  TORCH_CHECK(blocks <= kMaxGridBlocks, "the CUDA kernels cannot take an input of shape ",
              x.sizes(), " and strides ", x.strides(), ": it needs ", blocks,
              " blocks in one launch, and a launch takes at most ", kMaxGridBlocks);
}

// What every kernel's arguments share: SPEM's parameters, the shape of x, the ReLU.
template <typename Acc, typename Args>
void set_params_and_shape(Args& a, const ParamTensors& prm, const at::Tensor& x, bool relu) {
  a.w1 = data_of<const Acc>(prm[0]);
  a.b1 = data_of<const Acc>(prm[1]);
  a.w2 = data_of<const Acc>(prm[2]);
  a.b2 = data_of<const Acc>(prm[3]);
  a.p = data_of<const Acc>(prm[4]);
  a.N = x.size(0);
  a.C = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  a.relu = relu;
}

// The fused forward's arguments: out = relu?(g x + residual), each plane's stats and
// positions where stats and idx are defined (undefined: the output alone).
template <typename T, typename Acc>
ForwardArgs<T, Acc> forward_args(const at::Tensor& x, const ParamTensors& prm,
                                 const std::optional<at::Tensor>& residual, bool relu,
                                 const at::Tensor& out, const at::Tensor& stats,
                                 const at::Tensor& idx) {
  ForwardArgs<T, Acc> a{};
  a.x = data_of<const T>(x);
  a.residual = residual.has_value() ? data_of<const T>(*residual) : nullptr;
  a.out = data_of<T>(out);
  a.sx = strides_of(x);
  a.sr = strides_of(residual.has_value() ? *residual : x);
  a.so = strides_of(out);
  a.stats = data_or_null<Acc>(stats);
  a.idx = data_or_null<int32_t>(idx);
  set_params_and_shape<Acc>(a, prm, x, relu);
  return a;
}

// The backward's arguments: dx (spem_bn: dy), and dres where it is written (defined).
template <typename T, typename Acc>
BackwardArgs<T, Acc> backward_args(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& out, const at::Tensor& stats,
                                   const at::Tensor& idx, const ParamTensors& prm, bool relu,
                                   const at::Tensor& dx, const at::Tensor& dres,
                                   const at::Tensor& partials, const ParamTensors& param_grads) {
  BackwardArgs<T, Acc> a{};
  a.grad = data_of<const T>(grad);
  a.x = data_of<const T>(x);
  a.out = data_of<const T>(out);
  a.dx = data_of<T>(dx);
  a.dres = data_or_null<T>(dres);
  a.sg = strides_of(grad);
  a.sx = strides_of(x);
  a.so = strides_of(out);
  a.sd = strides_of(dx);
  a.sdr = strides_of(dres.defined() ? dres : dx);
  a.stats = data_of<const Acc>(stats);
  a.idx = data_of<const int32_t>(idx);
  a.partials = data_of<Acc>(partials);
  a.dw1 = data_of<Acc>(param_grads[0]);
  a.db1 = data_of<Acc>(param_grads[1]);
  a.dw2 = data_of<Acc>(param_grads[2]);
  a.db2 = data_of<Acc>(param_grads[3]);
  a.dp = data_of<Acc>(param_grads[4]);
  set_params_and_shape<Acc>(a, prm, x, relu);
  return a;
}

// spem_bn's statistics pass and finalisation: the running statistics updated in training,
// read otherwise.
template <typename T, typename Acc>
BnStatsArgs<T, Acc> bn_stats_args(const at::Tensor& y, const at::Tensor& plane_stats,
                                  const BnTensors& bn, const at::Tensor& mean,
                                  const at::Tensor& invstd, const at::Tensor& affine,
                                  bool training, double momentum, double eps) {
  BnStatsArgs<T, Acc> s{};
  s.y = data_of<const T>(y);
  s.sy = strides_of(y);
  s.plane_stats = data_of<Acc>(plane_stats);
  s.weight = data_or_null<const Acc>(bn.weight);
  s.bias = data_or_null<const Acc>(bn.bias);
  s.running_mean = data_or_null<Acc>(bn.running_mean);
  s.running_var = data_or_null<Acc>(bn.running_var);
  s.mean = data_of<Acc>(mean);
  s.invstd = data_of<Acc>(invstd);
  s.affine = data_of<Acc>(affine);
  s.N = y.size(0);
  s.C = y.size(1);
  s.H = y.size(2);
  s.W = y.size(3);
  s.training = training;
  s.momentum = static_cast<Acc>(momentum);
  s.eps = static_cast<Acc>(eps);
  return s;
}

// out = relu?(g x + residual), and each plane's stats and positions where stats and idx are
// defined (undefined: the output alone, for a forward that no backward follows).
void forward_into(const at::Tensor& x, const ParamTensors& prm,
                  const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out,
                  const at::Tensor& stats, const at::Tensor& idx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_forward_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(launch_spem_forward(forward_args<T, Acc>(x, prm, residual, relu, out, stats,
                                                            idx),
                                       c10::cuda::getCurrentCUDAStream()));
  });
}

// spem's backward: dx, dres where written, the parameters' gradients.
void backward_into(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                   const at::Tensor& stats, const at::Tensor& idx, bool relu, bool write_dres,
                   BackwardSetup& s) {
  const at::Tensor stats_c = stats.contiguous(), idx_c = idx.contiguous();
  const at::Tensor partials = at::empty({kPartials, x.size(0), x.size(1)}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "spem_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(launch_spem_backward(backward_args<T, Acc>(grad, x, out, stats_c, idx_c,
                                                              s.params, relu, s.dx,
                                                              write_dres ? s.dres : at::Tensor(),
                                                              partials, s.grads.written),
                                        c10::cuda::getCurrentCUDAStream()));
  });
}

// spem_bn's forward into out (and stats, idx where defined; see forward_into), mean, invstd.
void bn_forward_into(const at::Tensor& y, const BnInputs& inputs, const ParamTensors& prm,
                     const std::optional<at::Tensor>& residual, bool training, double momentum,
                     double eps, bool relu, const at::Tensor& out, const at::Tensor& stats,
                     const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& invstd) {
  BnTensors bn = bn_tensors(inputs, compute_dtype(y.scalar_type()));
  const at::Tensor plane_stats =
      training ? at::empty({2, y.size(0), y.size(1)}, mean.options()) : mean;
  const at::Tensor affine = at::empty({2, y.size(1)}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "spem_bn_forward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    ForwardArgs<T, Acc> f = forward_args<T, Acc>(y, prm, residual, relu, out, stats, idx);
    f.affine = data_of<const Acc>(affine);
    C10_CUDA_CHECK(launch_spem_bn_forward(bn_stats_args<T, Acc>(y, plane_stats, bn, mean, invstd,
                                                                affine, training, momentum, eps),
                                          f, c10::cuda::getCurrentCUDAStream()));
  });
  if (training) bn.finish();
}

// spem_bn's backward: dy, dres where written, BatchNorm's and SPEM's parameters' gradients.
void bn_backward_into(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& out,
                      const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& mean,
                      const at::Tensor& invstd, bool training, bool relu, bool write_dres,
                      BnBackwardSetup& s) {
  const at::Tensor stats_c = stats.contiguous(), idx_c = idx.contiguous();
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor partials = at::empty({kBnPlanes, y.size(0), y.size(1)}, stats.options());
  const at::Tensor coef = at::empty({2, y.size(1)}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "spem_bn_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    BackwardArgs<T, Acc> a =
        backward_args<T, Acc>(grad, y, out, stats_c, idx_c, s.params, relu, s.dx,
                              write_dres ? s.dres : at::Tensor(), partials, s.grads.written);
    a.mean = data_of<const Acc>(mean_c);
    a.invstd = data_of<const Acc>(invstd_c);
    a.weight = data_or_null<const Acc>(s.bn.weight);
    a.bias = data_or_null<const Acc>(s.bn.bias);
    a.dweight = data_of<Acc>(s.bn_grads.written_dweight);
    a.dbias = data_of<Acc>(s.bn_grads.written_dbias);
    a.coef = data_of<Acc>(coef);
    a.training = training;
    C10_CUDA_CHECK(launch_spem_bn_backward(a, c10::cuda::getCurrentCUDAStream()));
  });
}

// The CUDA kernels of spem's and spem_bn's ops (spem_op_entries.h).
struct Cuda {
  static c10::cuda::CUDAGuard enter(const at::Tensor& x) {
    check_grid(x);
    return c10::cuda::CUDAGuard(x.device());
  }
  static constexpr auto forward = forward_into;
  static constexpr auto backward = backward_into;
  static constexpr auto bn_forward = bn_forward_into;
  static constexpr auto bn_backward = bn_backward_into;
};

}  // namespace
}  // namespace spem_native

SPEM_TORCH_LIBRARY_IMPL(SPEM_LIBRARY, SPEM_CUDA_KEY, m) {
  spem_native::register_spem_ops<spem_native::Cuda>(m);
  spem_native::register_spem_bn_ops<spem_native::Cuda>(m);
}
