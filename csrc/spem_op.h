// Torch-side helpers shared by the CPU and CUDA bindings of the spem_native ops: argument
// checks, output allocation, parameter conversion. Shapes, dtypes and layouts are those of
// the backend contract, spem_kernels/backends/contract.py.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace spem_native {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // out, stats, idx
// dx, dres, dw1, db1, dw2, db2, dp
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor>;

// float64 math for float64 x, float32 otherwise.
at::ScalarType compute_dtype(at::ScalarType x_dtype);

// w1, b1, w2, b2, p in the compute dtype with their values contiguous: the tensors themselves
// when they already are (the usual case: no copy, no new tensor).
using ParamTensors = std::array<at::Tensor, 5>;
ParamTensors compute_params(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& b2, const at::Tensor& p, at::ScalarType acc);

// The gradients of the parameters `params` (w1, b1, w2, b2, p as the caller passed them):
// `result` has each parameter's shape and dtype; the kernels write `written` (compute dtype,
// contiguous), which is `result` itself when the dtypes agree.
struct ParamGrads {
  ParamTensors result, written;
  // Converts `written` into `result` where the dtypes differ (16-bit parameters).
  void finish();
};
ParamGrads allocate_param_grads(const ParamTensors& params, at::ScalarType acc);

void check_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                   const std::optional<at::Tensor>& residual);

void check_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                    const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& w1,
                    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                    const at::Tensor& p);

// out = empty_like(x) (x's memory format), stats (N, C, 2) compute dtype, idx (N, C, 2) int32.
ForwardResult allocate_forward(const at::Tensor& x);

// dx = empty_like(x); dres = empty_like(x) when written, else an empty (0,) tensor.
std::tuple<at::Tensor, at::Tensor> allocate_input_grads(const at::Tensor& x, bool write_dres);

}  // namespace spem_native
