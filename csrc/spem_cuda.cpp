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

// out = relu?(g x + residual), and each plane's stats and positions where stats and idx are
// defined (undefined: the output alone, for a forward that no backward follows).
void forward_into(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                  const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                  const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out,
                  const at::Tensor& stats, const at::Tensor& idx) {
  const auto acc = compute_dtype(x.scalar_type());
  const ParamTensors prm = compute_params(w1, b1, w2, b2, p, acc);
  const at::Tensor& res = residual.has_value() ? *residual : x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_forward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    const ForwardArgs<T, Acc> a{
        data_of<const T>(x), residual.has_value() ? data_of<const T>(res) : nullptr,
        data_of<T>(out), strides_of(x), strides_of(res), strides_of(out),
        data_of<const Acc>(prm[0]), data_of<const Acc>(prm[1]), data_of<const Acc>(prm[2]),
        data_of<const Acc>(prm[3]), data_of<const Acc>(prm[4]), data_or_null<Acc>(stats),
        data_or_null<int32_t>(idx), x.size(0), x.size(1), x.size(2), x.size(3), relu};
    C10_CUDA_CHECK(launch_spem_forward(a, c10::cuda::getCurrentCUDAStream()));
  });
}

ForwardResult spem_forward_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                                const std::optional<at::Tensor>& residual, bool relu) {
  check_forward(x, w1, b1, w2, b2, p, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [out, stats, idx] = allocate_forward(x);
  forward_into(x, w1, b1, w2, b2, p, residual, relu, out, stats, idx);
  return {out, stats, idx};
}

at::Tensor spem_output_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                            const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                            const std::optional<at::Tensor>& residual, bool relu) {
  check_forward(x, w1, b1, w2, b2, p, residual);
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
  const at::Tensor& dr = write_dres ? dres : dx;  // dres is written only with write_dres
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spem_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    const BackwardArgs<T, Acc> a{
        data_of<const T>(grad), data_of<const T>(x), data_of<const T>(out), data_of<T>(dx),
        write_dres ? data_of<T>(dres) : nullptr, strides_of(grad), strides_of(x),
        strides_of(out), strides_of(dx), strides_of(dr),
        data_of<const Acc>(prm[0]), data_of<const Acc>(prm[1]), data_of<const Acc>(prm[2]),
        data_of<const Acc>(prm[3]), data_of<const Acc>(prm[4]), data_of<const Acc>(stats_c),
        data_of<const int32_t>(idx_c), data_of<Acc>(partials), data_of<Acc>(grads.written[0]),
        data_of<Acc>(grads.written[1]), data_of<Acc>(grads.written[2]),
        data_of<Acc>(grads.written[3]), data_of<Acc>(grads.written[4]), x.size(0), x.size(1),
        x.size(2), x.size(3), relu};
    C10_CUDA_CHECK(launch_spem_backward(a, c10::cuda::getCurrentCUDAStream()));
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
  const at::Tensor& res = residual.has_value() ? *residual : y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "spem_bn_forward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    // (the running statistics: updated in training, read otherwise)
    const BnStatsArgs<T, Acc> s{
        data_of<const T>(y), strides_of(y), data_of<Acc>(plane_stats),
        data_or_null<const Acc>(bn.weight), data_or_null<const Acc>(bn.bias),
        data_or_null<Acc>(bn.running_mean), data_or_null<Acc>(bn.running_var),
        data_of<Acc>(mean), data_of<Acc>(invstd), data_of<Acc>(affine), y.size(0), y.size(1),
        y.size(2), y.size(3), training, Acc(momentum), Acc(eps)};
    ForwardArgs<T, Acc> f{
        data_of<const T>(y), residual.has_value() ? data_of<const T>(res) : nullptr,
        data_of<T>(out), strides_of(y), strides_of(res), strides_of(out),
        data_of<const Acc>(prm[0]), data_of<const Acc>(prm[1]), data_of<const Acc>(prm[2]),
        data_of<const Acc>(prm[3]), data_of<const Acc>(prm[4]), data_or_null<Acc>(stats),
        data_or_null<int32_t>(idx), y.size(0), y.size(1), y.size(2), y.size(3), relu};
    f.affine = data_of<const Acc>(affine);
    C10_CUDA_CHECK(launch_spem_bn_forward(s, f, c10::cuda::getCurrentCUDAStream()));
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
  const at::Tensor& dr = write_dres ? dres : dy;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "spem_bn_backward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using Acc = at::opmath_type<scalar_t>;
    BackwardArgs<T, Acc> a{
        data_of<const T>(grad), data_of<const T>(y), data_of<const T>(out), data_of<T>(dy),
        write_dres ? data_of<T>(dres) : nullptr, strides_of(grad), strides_of(y),
        strides_of(out), strides_of(dy), strides_of(dr),
        data_of<const Acc>(prm[0]), data_of<const Acc>(prm[1]), data_of<const Acc>(prm[2]),
        data_of<const Acc>(prm[3]), data_of<const Acc>(prm[4]), data_of<const Acc>(stats_c),
        data_of<const int32_t>(idx_c), data_of<Acc>(partials), data_of<Acc>(grads.written[0]),
        data_of<Acc>(grads.written[1]), data_of<Acc>(grads.written[2]),
        data_of<Acc>(grads.written[3]), data_of<Acc>(grads.written[4]), y.size(0), y.size(1),
        y.size(2), y.size(3), relu};
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

TORCH_LIBRARY_IMPL(spem_native, CUDA, m) {
  m.impl("spem_forward", &spem_native::spem_forward_cuda);
  m.impl("spem_backward", &spem_native::spem_backward_cuda);
  m.impl("spem_output", &spem_native::spem_output_cuda);
  m.impl("spem_bn_forward", &spem_native::spem_bn_forward_cuda);
  m.impl("spem_bn_output", &spem_native::spem_bn_output_cuda);
  m.impl("spem_bn_backward", &spem_native::spem_bn_backward_cuda);
}
