// Each kernel op's entry point, written once for every device: the dispatcher's signature,
// the arguments bundled (SpemParams, BnInputs) and checked, the outputs allocated, an empty
// input answered without a launch; then the device's kernels, through `Device`:
//
//   Device::enter(x)  checks that x fits the device's kernels and returns what must live
//                     while they run (CUDA: the guard of x's device)
//   Device::forward(x, prm, residual, relu, out, stats, idx)
//   Device::backward(grad, x, out, stats, idx, relu, write_dres, setup)
//   Device::bn_forward(y, bn, prm, residual, training, momentum, eps, relu, out, stats, idx,
//                      mean, invstd)
//   Device::bn_backward(grad, y, out, stats, idx, mean, invstd, training, relu, write_dres,
//                       setup)
//
// The forwards get undefined stats and idx for the output alone (spem_output,
// spem_bn_output). A device defines the members of the ops it registers
// (register_spem_ops, register_spem_bn_ops).
#pragma once

#include <torch/library.h>

#include <type_traits>

#include "spem_op.h"

namespace spem_native {

// A device whose kernels need nothing alive around them (the CPU).
struct NoDeviceGuard {};

// spem_forward (Save) and spem_output.
template <typename Device, bool Save>
std::conditional_t<Save, ForwardResult, at::Tensor> spem_forward_entry(SPEM_FORWARD_PARAMS) {
  const ParamTensors prm = setup_forward(x, {w1, b1, w2, b2, p}, residual);
  [[maybe_unused]] const auto device = Device::enter(x);
  const auto [out, stats, idx] = allocate_forward(x, Save);
  if (x.numel() > 0) Device::forward(x, prm, residual, relu, out, stats, idx);
  if constexpr (Save) {
    return {out, stats, idx};
  } else {
    return out;
  }
}

template <typename Device>
BackwardResult spem_backward_entry(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& out, const at::Tensor& stats,
                                   const at::Tensor& idx, const at::Tensor& w1,
                                   const at::Tensor& b1, const at::Tensor& w2,
                                   const at::Tensor& b2, const at::Tensor& p, bool relu,
                                   bool write_dres) {
  BackwardSetup s = setup_backward(grad, x, out, stats, idx, {w1, b1, w2, b2, p}, write_dres);
  [[maybe_unused]] const auto device = Device::enter(x);
  if (!s.empty) Device::backward(grad, x, out, stats, idx, relu, write_dres, s);
  return s.result();
}

// spem_bn_forward (Save) and spem_bn_output. An empty y has mean and invstd 0.
template <typename Device, bool Save>
std::conditional_t<Save, BnForwardResult, at::Tensor>
spem_bn_forward_entry(SPEM_BN_FORWARD_PARAMS) {
  const BnInputs bn{running_mean, running_var, weight, bias};
  const ParamTensors prm = setup_bn_forward(y, bn, {w1, b1, w2, b2, p}, residual, training);
  [[maybe_unused]] const auto device = Device::enter(y);
  const auto [out, stats, idx, mean, invstd] = allocate_bn_forward(y, Save);
  if (y.numel() > 0) {
    Device::bn_forward(y, bn, prm, residual, training, momentum, eps, relu, out, stats, idx,
                       mean, invstd);
  } else {
    mean.zero_();
    invstd.zero_();
  }
  if constexpr (Save) {
    return {out, stats, idx, mean, invstd};
  } else {
    return out;
  }
}

template <typename Device>
BnBackwardResult spem_bn_backward_entry(const at::Tensor& grad, const at::Tensor& y,
                                        const at::Tensor& out, const at::Tensor& stats,
                                        const at::Tensor& idx, const at::Tensor& mean,
                                        const at::Tensor& invstd,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& w1, const at::Tensor& b1,
                                        const at::Tensor& w2, const at::Tensor& b2,
                                        const at::Tensor& p, bool training, bool relu,
                                        bool write_dres) {
  BnBackwardSetup s = setup_bn_backward(grad, y, out, stats, idx, mean, invstd,
                                        {std::nullopt, std::nullopt, weight, bias},
                                        {w1, b1, w2, b2, p}, write_dres);
  [[maybe_unused]] const auto device = Device::enter(y);
  if (!s.empty) {
    Device::bn_backward(grad, y, out, stats, idx, mean, invstd, training, relu, write_dres, s);
  }
  return s.result();
}

template <typename Device>
void register_spem_ops(torch::Library& m) {
  m.impl("spem_forward", &spem_forward_entry<Device, true>);
  m.impl("spem_output", &spem_forward_entry<Device, false>);
  m.impl("spem_backward", &spem_backward_entry<Device>);
}

template <typename Device>
void register_spem_bn_ops(torch::Library& m) {
  m.impl("spem_bn_forward", &spem_bn_forward_entry<Device, true>);
  m.impl("spem_bn_output", &spem_bn_forward_entry<Device, false>);
  m.impl("spem_bn_backward", &spem_bn_backward_entry<Device>);
}

}  // namespace spem_native
