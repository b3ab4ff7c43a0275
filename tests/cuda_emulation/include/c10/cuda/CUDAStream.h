// c10's current CUDA stream, emulated: every emulated launch completes before it returns.
#pragma once
#include "emulated_cuda.h"

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
