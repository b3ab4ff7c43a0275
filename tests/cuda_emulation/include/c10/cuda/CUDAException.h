// C10_CUDA_CHECK, emulated: a failed launch raises with the runtime's message (the kernel,
// the sizes, what was wrong).
#pragma once
#include <c10/util/Exception.h>

#include "emulated_cuda.h"

#define C10_CUDA_CHECK(EXPR)                                                         \
  do {                                                                               \
    const cudaError_t spem_emu_error = (EXPR);                                       \
    TORCH_CHECK(spem_emu_error == cudaSuccess, "CUDA error (emulated): ",            \
                cudaGetErrorString(spem_emu_error));                                 \
  } while (0)
