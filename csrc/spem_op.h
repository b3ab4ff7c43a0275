// Torch-side helpers shared by the CPU and CUDA bindings of the spem_native ops (spem and
// spem_bn): each op's set-up (argument checks, output allocation, parameter conversion),
// written once for every device. Shapes, dtypes and
// layouts are those of the backend contract, spem_kernels/backends/contract.py.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

// The library the ops register in, spem_native. The CUDA emulation (tests/cuda_emulation)
// compiles spem_op.cpp, spem_autograd.cpp and spem_cuda.cpp for the CPU into a library of
// its own (SPEM_LIBRARY), with the CUDA binding's kernels registered for CPU tensors
// (SPEM_CUDA_KEY), so that it loads beside the real one.
#ifndef SPEM_LIBRARY
#define SPEM_LIBRARY spem_native
#endif
#ifndef SPEM_CUDA_KEY
#define SPEM_CUDA_KEY CUDA
#endif
// TORCH_LIBRARY and TORCH_LIBRARY_IMPL with the names above expanded first.
#define SPEM_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define SPEM_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
// An op's name in the dispatcher: SPEM_OP("spem_forward") is "spem_native::spem_forward".
#define SPEM_OP(name) SPEM_STRINGIFY(SPEM_LIBRARY) "::" name
#define SPEM_STRINGIFY(x) SPEM_STRINGIFY_(x)
#define SPEM_STRINGIFY_(x) #x

// The parameters of spem's and spem_bn's forward ops as their schemas have them (spem_op.cpp):
// one list for every function the dispatcher calls with them.
#define SPEM_FORWARD_PARAMS \
  const at::Tensor &x, const at::Tensor &w1, const at::Tensor &b1, const at::Tensor &w2, \
      const at::Tensor &b2, const at::Tensor &p, const std::optional<at::Tensor>&residual, \
      bool relu
#define SPEM_BN_FORWARD_PARAMS \
  const at::Tensor &y, const std::optional<at::Tensor>&running_mean, \
      const std::optional<at::Tensor>&running_var, const std::optional<at::Tensor>&weight, \
      const std::optional<at::Tensor>&bias, const at::Tensor &w1, const at::Tensor &b1, \
      const at::Tensor &w2, const at::Tensor &b2, const at::Tensor &p, \
      const std::optional<at::Tensor>&residual, bool training, double momentum, double eps, \
      bool relu

namespace spem_native {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // out, stats, idx
// dx, dres, dw1, db1, dw2, db2, dp
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor>;
using BnForwardResult =  // out, stats, idx, mean, invstd
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BnBackwardResult =  // dy, dres, dweight, dbias, dw1, db1, dw2, db2, dp
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor>;

// SPEM's parameters as the caller passed them (C elements each, 2 for p, any shape and float
// dtype): one bundle from each op's entry point down.
struct SpemParams {
  at::Tensor w1, b1, w2, b2, p;
};

// spem_bn's BatchNorm tensors as the caller passed them, each possibly absent.
struct BnInputs {
  std::optional<at::Tensor> running_mean, running_var, weight, bias;
};

// float64 math for float64 x, float32 otherwise.
at::ScalarType compute_dtype(at::ScalarType x_dtype);

// w1, b1, w2, b2, p in the compute dtype with their values contiguous: the tensors themselves
// when they already are (the usual case: no copy, no new tensor).
using ParamTensors = std::array<at::Tensor, 5>;
ParamTensors compute_params(const SpemParams& params, at::ScalarType acc);

// The gradients of the parameters: `result` has each parameter's shape and dtype; the kernels
// write `written` (compute dtype, contiguous), which is `result` itself when the dtypes agree.
struct ParamGrads {
  ParamTensors result, written;
  // Converts `written` into `result` where the dtypes differ (16-bit parameters).
  void finish();
};

// spem_bn's BatchNorm tensors in the compute dtype with their values contiguous (the
// caller's own tensors when they already are: the usual case); undefined where absent.
// Running statistics of another dtype are updated in a converted copy: finish() writes
// them back.
struct BnTensors {
  at::Tensor weight, bias, running_mean, running_var;
  at::Tensor caller_mean, caller_var;  // the caller's running statistics, when converted
  void finish();
};
BnTensors bn_tensors(const BnInputs& bn, at::ScalarType acc);

// A gradient for each of weight and bias: their shape and dtype, or (C,) in the compute dtype
// where absent; `written` (compute dtype, contiguous) is what the kernels write.
struct BnParamGrads {
  at::Tensor dweight, dbias, written_dweight, written_dbias;
  void finish();
};

// --- each op's set-up, the same on every device: checks, allocations, conversions ---

// A forward's: the arguments checked (as the backend contract has them), the parameters in
// the compute dtype.
ParamTensors setup_forward(const at::Tensor& x, const SpemParams& params,
                           const std::optional<at::Tensor>& residual);
ParamTensors setup_bn_forward(const at::Tensor& y, const BnInputs& bn, const SpemParams& params,
                              const std::optional<at::Tensor>& residual, bool training);

// out = empty_like(x) (x's memory format); where `save` (a backward follows) stats (N, C, 2)
// compute dtype and idx (N, C, 2) int32, else undefined.
ForwardResult allocate_forward(const at::Tensor& x, bool save);
// out, stats, idx as allocate_forward; mean, invstd (C,) in the compute dtype.
BnForwardResult allocate_bn_forward(const at::Tensor& y, bool save);

// A backward's: the arguments checked; dx (like x) and dres (like x where written, else an
// empty tensor); the parameters in the compute dtype and their gradients allocated. Where x
// has no elements (`empty`) the parameter gradients are zeros and there is nothing to launch:
// result() is the whole answer.
struct BackwardSetup {
  at::ScalarType acc;
  at::Tensor dx, dres;
  ParamTensors params;
  ParamGrads grads;
  bool empty;
  // The backward's results once the kernels wrote dx, dres and grads.written.
  BackwardResult result();
};
BackwardSetup setup_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                             const at::Tensor& stats, const at::Tensor& idx,
                             const SpemParams& params, bool write_dres);

// spem_bn's: as BackwardSetup (x is y, dx is dy), and BatchNorm's weight and bias in the
// compute dtype and their gradients allocated.
struct BnBackwardSetup : BackwardSetup {
  BnTensors bn;
  BnParamGrads bn_grads;
  BnBackwardResult result();
};
BnBackwardSetup setup_bn_backward(const at::Tensor& grad, const at::Tensor& y,
                                  const at::Tensor& out, const at::Tensor& stats,
                                  const at::Tensor& idx, const at::Tensor& mean,
                                  const at::Tensor& invstd, const BnInputs& bn,
                                  const SpemParams& params, bool write_dres);

}  // namespace spem_native
