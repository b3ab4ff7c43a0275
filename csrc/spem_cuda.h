// Launchers of the SPEM CUDA kernels (spem_cuda.cu). Torch-free: raw pointers and strides, so
// nvcc compiles the device code without torch's headers; spem_cuda.cpp binds them to tensors.
// Instantiated for (T, Acc) = (float, float), (__half, float), (__nv_bfloat16, float),
// (double, double).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

namespace spem_native {

// Element (n, c, h, w) of a tensor sits at data + n * n_ + c * c_ + h * h_ + w * w_.
struct Strides {
  int64_t n, c, h, w;
};

template <typename T, typename Acc>
struct ForwardArgs {
  const T* x;
  const T* residual;  // nullptr without a residual
  T* out;
  Strides sx, sr, so;
  const Acc *w1, *b1, *w2, *b2, *p;  // contiguous: C, C, C, C and 2 values
  Acc* stats;                        // (N, C, 2): max, min
  int32_t* idx;                      // (N, C, 2): their row-major positions
  int64_t N, C, H, W;
  bool relu;
};

template <typename T, typename Acc>
struct BackwardArgs {
  const T* grad;
  const T* x;
  const T* out;  // read only with relu (the mask is out > 0)
  T* dx;
  T* dres;       // nullptr unless the masked gradient is written
  Strides sg, sx, so, sd, sdr;
  const Acc *w1, *b1, *w2, *b2, *p;
  const Acc* stats;
  const int32_t* idx;
  Acc* partials;               // (5, N, C) scratch: the per-(n, c) partials of spem_math.h
  Acc *dw1, *db1, *dw2, *db2;  // C values each: the partials summed over n
  Acc* dp;                     // 2 values: p's gradient
  int64_t N, C, H, W;
  bool relu;
};

// On `stream`: the forward is one kernel launch, the backward two (input gradients and
// partials, then their reduction into the parameter gradients); returns the launch error.
template <typename T, typename Acc>
cudaError_t launch_spem_forward(const ForwardArgs<T, Acc>& args, cudaStream_t stream);

template <typename T, typename Acc>
cudaError_t launch_spem_backward(const BackwardArgs<T, Acc>& args, cudaStream_t stream);

}  // namespace spem_native
