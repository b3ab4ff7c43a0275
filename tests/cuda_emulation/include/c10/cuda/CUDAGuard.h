// c10's CUDA device guard, emulated: the emulated kernels run on the CPU, where the tensors
// are (see ../../emulated_cuda.h).
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
