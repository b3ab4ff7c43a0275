// Torch-side helpers shared by the CPU and CUDA bindings of the spem_native ops: argument
// checks, output allocation, parameter conversion. Layouts are those of
// spem_kernels/backends/__init__.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace spem_native {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;   // out, stats, idx
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // dx, dres, dparams

// float64 math for float64 x, float32 otherwise.
at::ScalarType compute_dtype(at::ScalarType x_dtype);

// A parameter as a contiguous (numel,) tensor in the compute dtype (a no-op when it is one).
at::Tensor as_compute(const at::Tensor& param, at::ScalarType acc);

void check_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                   const std::optional<at::Tensor>& residual);

void check_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                    const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& w1,
                    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                    const at::Tensor& p);

// out = empty_like(x) (x's memory format), stats (N, C, 2) compute dtype, idx (N, C, 2) int32.
ForwardResult allocate_forward(const at::Tensor& x);

// dx = empty_like(x), dres = empty_like(x) or (0,), dparams (C, 6) compute dtype.
BackwardResult allocate_backward(const at::Tensor& x, bool write_dres);

}  // namespace spem_native
