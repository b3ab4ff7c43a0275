// CUDA binding of the spem_native ops: checks and allocates with torch, then calls the
// torch-free launchers of spem_cuda.cu on the current stream of x's device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

ForwardResult spem_forward_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                                const std::optional<at::Tensor>& residual, bool relu) {
  check_forward(x, w1, b1, w2, b2, p, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [out, stats, idx] = allocate_forward(x);
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
        data_of<const Acc>(prm[3]), data_of<const Acc>(prm[4]), data_of<Acc>(stats),
        data_of<int32_t>(idx), x.size(0), x.size(1), x.size(2), x.size(3), relu};
    C10_CUDA_CHECK(launch_spem_forward(a, c10::cuda::getCurrentCUDAStream()));
  });
  return {out, stats, idx};
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

}  // namespace
}  // namespace spem_native

TORCH_LIBRARY_IMPL(spem_native, CUDA, m) {
  m.impl("spem_forward", &spem_native::spem_forward_cuda);
  m.impl("spem_backward", &spem_native::spem_backward_cuda);
}
