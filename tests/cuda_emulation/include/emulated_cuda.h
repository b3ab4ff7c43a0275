// CUDA as the kernels of csrc/*.cu see it, on the CPU: a test tool (tests/cuda_emulation).
//
// The shadow headers beside this one (cuda_runtime.h, cuda_fp16.h, ...) all include it, so
// that spem_cuda.cu compiles unchanged as C++. What a kernel gets:
// - threadIdx, blockIdx, blockDim, gridDim: those of the CUDA thread the calling fiber plays;
// - __syncthreads(): a real barrier over the block's threads; __shfl_xor_sync: a real
//   exchange, each lane reading the value its partner held at the call, all 32 lanes taking
//   part (both are where the runtime switches fibers, so any order of the threads between
//   them can happen);
// - __shared__: per block, since a block's threads are fibers of one OS thread (runtime.cpp);
// - __half and __nv_bfloat16 with CUDA's conversions (round to nearest even);
// - cudaLaunchKernel: runs the grid on the runtime's workers after checking the launch
//   against what sm_80 and sm_90 accept.
// Misuse that a GPU would punish (a barrier or shuffle that some thread never reaches, a
// thread that exits before a barrier, an oversized launch) fails the launch with a message
// naming the kernel.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

// The message of the last failed launch on this thread, or CUDA's name for the error.
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();

// --- 16-bit floating point, as storage (torch's builds define __CUDA_NO_HALF_OPERATORS__) ---

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

float __half2float(__half h);
__half __float2half_rn(float f);
float __bfloat162float(__nv_bfloat16 h);
__nv_bfloat16 __float2bfloat16_rn(float f);

namespace spem_emu {

// The CUDA thread a fiber plays (set by the runtime before it switches to the fiber).
struct ThreadCoordinates {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local const ThreadCoordinates* current;

// The calling thread's value (size bytes at `value`) is replaced by that of lane
// lane ^ lane_mask of its warp, once every lane of the warp has made the same call.
void shuffle_xor(unsigned mask, void* value, size_t size, int lane_mask, int width);

// Runs `block` (one CUDA thread's body) for every thread of `grid` x `block_dim`, after
// checking the launch; `kernel` names the kernel (its symbol) in messages and the log.
cudaError_t launch(const void* kernel, dim3 grid, dim3 block_dim, size_t shared_mem,
                   std::function<void()> thread_body);

template <typename T>
struct Identity {
  using type = T;
};

template <typename... P, size_t... I>
std::tuple<std::decay_t<P>...> copy_arguments(void** args, std::index_sequence<I...>) {
  return std::tuple<std::decay_t<P>...>(*static_cast<std::decay_t<P>*>(args[I])...);
}

}  // namespace spem_emu

#define threadIdx (::spem_emu::current->thread_idx)
#define blockIdx (::spem_emu::current->block_idx)
#define blockDim (::spem_emu::current->block_dim)
#define gridDim (::spem_emu::current->grid_dim)

void __syncthreads();

// The position of the least significant set bit, from 1 (0 for none), as CUDA's.
inline int __ffs(int x) { return __builtin_ffs(x); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "a shuffle moves one 32- or 64-bit value");
  spem_emu::shuffle_xor(mask, &var, sizeof(T), lane_mask, width);
  return var;
}

// As CUDA's C++ template: the arguments are copied as the kernel's parameters (args[i]
// points at parameter i), so a launch outlives nothing of its caller's.
template <typename... P>
cudaError_t cudaLaunchKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                             size_t shared_mem = 0, cudaStream_t stream = nullptr) {
  (void)stream;  // launches complete before they return: one stream is as good as another
  auto params = spem_emu::copy_arguments<P...>(args, std::index_sequence_for<P...>());
  return spem_emu::launch(reinterpret_cast<const void*>(kernel), grid, block, shared_mem,
                          [kernel, &params] { std::apply(kernel, params); });
}
