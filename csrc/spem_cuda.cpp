// CUDA binding of the spem_native ops (spem's and spem_bn's): checks and allocates with torch,
// then calls the torch-free launchers of spem_cuda.cu on the current stream of x's device.
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
  const int64_t blocks = largest_grid(strides_of(x), x.size(0), x.size(1), x.size(2),
                                      x.size(3), static_cast<int>(x.element_size()));
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
void forward_into(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                  const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                  const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out,
                  const at::Tensor& stats, const at::Tensor& idx) {
  const ParamTensors prm = compute_params(w1, b1, w2, b2, p, compute_dtype(x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_forward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(launch_spem_forward(
        forward_args<T, Acc>(x, prm, residual, relu, out, stats, idx),
        c10::cuda::getCurrentCUDAStream()));
  });
}

ForwardResult spem_forward_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                                const std::optional<at::Tensor>& residual, bool relu) {
  check_forward(x, w1, b1, w2, b2, p, residual);
  check_grid(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [out, stats, idx] = allocate_forward(x);
  forward_into(x, w1, b1, w2, b2, p, residual, relu, out, stats, idx);
  return {out, stats, idx};
}

at::Tensor spem_output_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                            const std::optional<at::Tensor>& residual, bool relu) {
  check_forward(x, w1, b1, w2, b2, p, residual);
  check_grid(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor out = at::empty_like(x);
  forward_into(x, w1, b1, w2, b2, p, residual, relu, out, at::Tensor(), at::Tensor());
  return out;
}

BackwardResult spem_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& out, const at::Tensor& stats,
                                  const at::Tensor& idx, const at::Tensor& w1,
                                  const at::Tensor& b1, const at::Tensor& w2,
                                  const at::Tensor& b2, const at::Tensor& p, bool relu,
                                  bool write_dres) {
  check_backward(grad, x, out, stats, idx, w1, b1, w2, b2, p);
  check_grid(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [dx, dres] = allocate_input_grads(x, write_dres);
  const auto acc = compute_dtype(x.scalar_type());
  const ParamTensors prm = compute_params(w1, b1, w2, b2, p, acc);
  ParamGrads grads = allocate_param_grads({w1, b1, w2, b2, p}, acc);
  if (x.numel() == 0) {
    for (auto& g : grads.result) g.zero_();
    const auto& [dw1, db1, dw2, db2, dp] = grads.result;
    return {dx, dres, dw1, db1, dw2, db2, dp};
  }
  const at::Tensor stats_c = stats.contiguous(), idx_c = idx.contiguous();
  const at::Tensor partials = at::empty({kPartials, x.size(0), x.size(1)}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(launch_spem_backward(
        backward_args<T, Acc>(grad, x, out, stats_c, idx_c, prm, relu, dx,
                              write_dres ? dres : at::Tensor(), partials, grads.written),
        c10::cuda::getCurrentCUDAStream()));
  });
  grads.finish();
  const auto& [dw1, db1, dw2, db2, dp] = grads.result;
  return {dx, dres, dw1, db1, dw2, db2, dp};
}

// spem_bn's forward into out (and stats, idx where defined; see forward_into), mean, invstd.
void bn_forward_into(const at::Tensor& y, const std::optional<at::Tensor>& running_mean,
                     const std::optional<at::Tensor>& running_var,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                     const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                     const at::Tensor& p, const std::optional<at::Tensor>& residual,
                     bool training, double momentum, double eps, bool relu, const at::Tensor& out,
                     const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& mean,
                     const at::Tensor& invstd) {
  const auto acc = compute_dtype(y.scalar_type());
  const ParamTensors prm = compute_params(w1, b1, w2, b2, p, acc);
  BnTensors bn = bn_tensors(running_mean, running_var, weight, bias, acc);
  const at::Tensor plane_stats =
      training ? at::empty({2, y.size(0), y.size(1)}, mean.options()) : mean;
  const at::Tensor affine = at::empty({2, y.size(1)}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "spem_bn_forward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    ForwardArgs<T, Acc> f = forward_args<T, Acc>(y, prm, residual, relu, out, stats, idx);
    f.affine = data_of<const Acc>(affine);
    C10_CUDA_CHECK(launch_spem_bn_forward(
        bn_stats_args<T, Acc>(y, plane_stats, bn, mean, invstd, affine, training, momentum, eps),
        f, c10::cuda::getCurrentCUDAStream()));
  });
  if (training) bn.finish();
}

BnForwardResult spem_bn_forward_cuda(const at::Tensor& y,
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
  check_grid(y);
  const c10::cuda::CUDAGuard guard(y.device());
  auto [out, stats, idx, mean, invstd] = allocate_bn_forward(y);
  if (y.numel() == 0) return {out, stats, idx, mean.zero_(), invstd.zero_()};
  bn_forward_into(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                  training, momentum, eps, relu, out, stats, idx, mean, invstd);
  return {out, stats, idx, mean, invstd};
}

at::Tensor spem_bn_output_cuda(const at::Tensor& y, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                               const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                               const at::Tensor& p, const std::optional<at::Tensor>& residual,
                               bool training, double momentum, double eps, bool relu) {
  check_bn_forward(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                   training);
  check_grid(y);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor out = at::empty_like(y);
  if (y.numel() == 0) return out;
  const at::Tensor channel = at::empty({2, y.size(1)}, y.options().dtype(compute_dtype(y.scalar_type())));
  bn_forward_into(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                  training, momentum, eps, relu, out, at::Tensor(), at::Tensor(), channel[0],
                  channel[1]);
  return out;
}

BnBackwardResult spem_bn_backward_cuda(const at::Tensor& grad, const at::Tensor& y,
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
  check_grid(y);
  const c10::cuda::CUDAGuard guard(y.device());
  auto [dy, dres] = allocate_input_grads(y, write_dres);
  const auto acc = compute_dtype(y.scalar_type());
  const ParamTensors prm = compute_params(w1, b1, w2, b2, p, acc);
  ParamGrads grads = allocate_param_grads({w1, b1, w2, b2, p}, acc);
  BnParamGrads bn_grads = allocate_bn_param_grads(weight, bias, y, acc);
  if (y.numel() == 0) {
    for (auto& g : grads.result) g.zero_();
    bn_grads.dweight.zero_();
    bn_grads.dbias.zero_();
    const auto& [dw1, db1, dw2, db2, dp] = grads.result;
    return {dy, dres, bn_grads.dweight, bn_grads.dbias, dw1, db1, dw2, db2, dp};
  }
  const BnTensors bn = bn_tensors(std::nullopt, std::nullopt, weight, bias, acc);
  const at::Tensor stats_c = stats.contiguous(), idx_c = idx.contiguous();
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor partials = at::empty({kBnPlanes, y.size(0), y.size(1)}, stats.options());
  const at::Tensor coef = at::empty({2, y.size(1)}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "spem_bn_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    BackwardArgs<T, Acc> a =
        backward_args<T, Acc>(grad, y, out, stats_c, idx_c, prm, relu, dy,
                              write_dres ? dres : at::Tensor(), partials, grads.written);
    a.mean = data_of<const Acc>(mean_c);
    a.invstd = data_of<const Acc>(invstd_c);
    a.weight = data_or_null<const Acc>(bn.weight);
    a.bias = data_or_null<const Acc>(bn.bias);
    a.dweight = data_of<Acc>(bn_grads.written_dweight);
    a.dbias = data_of<Acc>(bn_grads.written_dbias);
    a.coef = data_of<Acc>(coef);
    a.training = training;
    C10_CUDA_CHECK(launch_spem_bn_backward(a, c10::cuda::getCurrentCUDAStream()));
  });
  grads.finish();
  bn_grads.finish();
  const auto& [dw1, db1, dw2, db2, dp] = grads.result;
  return {dy, dres, bn_grads.dweight, bn_grads.dbias, dw1, db1, dw2, db2, dp};
}

}  // namespace
}  // namespace spem_native

SPEM_TORCH_LIBRARY_IMPL(SPEM_LIBRARY, SPEM_CUDA_KEY, m) {
  m.impl("spem_forward", &spem_native::spem_forward_cuda);
  m.impl("spem_backward", &spem_native::spem_backward_cuda);
  m.impl("spem_output", &spem_native::spem_output_cuda);
  m.impl("spem_bn_forward", &spem_native::spem_bn_forward_cuda);
  m.impl("spem_bn_output", &spem_native::spem_bn_output_cuda);
  m.impl("spem_bn_backward", &spem_native::spem_bn_backward_cuda);
}
