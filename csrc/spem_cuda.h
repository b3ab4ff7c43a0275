// Launchers of the SPEM CUDA kernels (spem_cuda.cu), spem's and spem_bn's. Torch-free: raw pointers and strides, so
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
  Acc* stats;                        // (N, C, 2): max, min (nullptr: the output alone, for a
                                     // forward that no backward follows)
  int32_t* idx;                      // (N, C, 2): their row-major positions
  int64_t N, C, H, W;
  bool relu;
  // spem_bn: (2, C) alpha then beta, the planes are x * alpha + beta (BatchNorm); spem: none
  const Acc* affine = nullptr;
};

// spem_bn's BatchNorm statistics (training) and per-channel finalisation.
template <typename T, typename Acc>
struct BnStatsArgs {
  const T* y;
  Strides sy;
  Acc* plane_stats;                 // (2, N, C) scratch: each plane's mean and M2
  const Acc *weight, *bias;         // C values each, or nullptr (no affine parameters)
  Acc *running_mean, *running_var;  // C values each, or nullptr; updated in training
  Acc *mean, *invstd;               // C values each: what normalises y
  Acc* affine;                      // (2, C): alpha, beta for the fused forward
  int64_t N, C, H, W;
  bool training;
  Acc momentum, eps;
};

template <typename T, typename Acc>
struct BackwardArgs {
  const T* grad;
  const T* x;
  const T* out;  // read only with relu (the mask is out > 0)
  T* dx;
  T* dres;  // nullptr unless the masked gradient is written
  Strides sg, sx, so, sd, sdr;
  const Acc *w1, *b1, *w2, *b2, *p;
  const Acc* stats;
  const int32_t* idx;
  Acc* partials;               // (5, N, C) scratch: the per-(n, c) partials of spem_math.h
                               // (spem_bn: (kBnPlanes, N, C), spem_bn_math.h)
  Acc *dw1, *db1, *dw2, *db2;  // C values each: the partials summed over n
  Acc* dp;                     // 2 values: p's gradient
  int64_t N, C, H, W;
  bool relu;
  // spem_bn only (mean is nullptr for spem): x is y, dx is dy
  const Acc *mean = nullptr, *invstd = nullptr;  // C values each, from the forward
  const Acc *weight = nullptr, *bias = nullptr;  // C values each, or nullptr
  Acc *dweight = nullptr, *dbias = nullptr;      // C values each
  Acc* coef = nullptr;                           // (2, C) scratch: k2, k3 of the writing pass
  bool training = false;
};

// The most blocks one launch takes (gridDim.x on sm_80 and sm_90; y and z are not used).
constexpr int64_t kMaxGridBlocks = 2147483647;

// The largest grid any launch of the ops makes for x (or y) of this shape and strides, with
// elements of `element_bytes`: the bindings refuse a shape past kMaxGridBlocks before they
// allocate anything, naming it.
int64_t largest_grid(const Strides& sx, int64_t N, int64_t C, int64_t H, int64_t W,
                     int element_bytes);

// On `stream`: the forward is one kernel launch, the backward two (input gradients and
// partials, then their reduction into the parameter gradients); returns the launch error.
template <typename T, typename Acc>
cudaError_t launch_spem_forward(const ForwardArgs<T, Acc>& args, cudaStream_t stream);

template <typename T, typename Acc>
cudaError_t launch_spem_backward(const BackwardArgs<T, Acc>& args, cudaStream_t stream);

// spem_bn: the forward three launches (statistics in training, finalisation, the fused pass
// with fwd.affine = stats.affine), the backward three (reduction pass, parameter gradients,
// writing pass).
template <typename T, typename Acc>
cudaError_t launch_spem_bn_forward(const BnStatsArgs<T, Acc>& stats,
                                   const ForwardArgs<T, Acc>& fwd, cudaStream_t stream);

template <typename T, typename Acc>
cudaError_t launch_spem_bn_backward(const BackwardArgs<T, Acc>& args, cudaStream_t stream);

}  // namespace spem_native
