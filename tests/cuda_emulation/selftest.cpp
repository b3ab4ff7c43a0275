// Kernels that check the emulation itself (tests/test_cuda_emulated.py): that a shuffle
// reads what the partner held at the call, that the scheduler interleaves threads between
// barriers, and that misuse a GPU punishes fails the launch.
#include "selftest.h"

#include <vector>

#include "emulated_cuda.h"
#include "runtime.h"

namespace spem_emu {
namespace {

// Every lane gets the sum of the warp's lane numbers (496) by a butterfly; any lane reading
// a partner's value after the partner moved on would get another number.
__global__ void butterfly_sum(int* out) {
  int v = int(threadIdx.x % 32);
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Each thread writes its slot, then reads its neighbour's: with the barrier every read sees
// the neighbour's write; without it, only if the scheduler happened to run the writer first.
__global__ void neighbour_read(int* out, bool barrier) {
  __shared__ int slot[256];
  slot[threadIdx.x] = int(threadIdx.x) + 1;
  if (barrier) __syncthreads();
  out[threadIdx.x] = slot[(threadIdx.x + 1) % blockDim.x];
  __syncthreads();
  slot[threadIdx.x] = 0;  // the next block on this worker starts from zeros again
}

__global__ void exit_before_barrier() {
  if (threadIdx.x % 2 == 1) return;
  __syncthreads();
}

__global__ void divergent_shuffles() {
  const int lane = int(threadIdx.x % 32);
  (void)__shfl_xor_sync(0xffffffffu, lane, lane < 16 ? 1 : 2);
}

__global__ void shuffle_after_exit() {
  if (threadIdx.x == 0) return;
  (void)__shfl_xor_sync(0xffffffffu, 1, 1);
}

__global__ void barrier_in_one_warp() {
  if (threadIdx.x < 32) __syncthreads();
}

__global__ void __launch_bounds__(64) bounded() {}

template <typename... P>
cudaError_t launch_one(void (*kernel)(P...), dim3 grid, dim3 block, P... args) {
  void* params[] = {&args...};
  return cudaLaunchKernel(kernel, grid, block, params);
}

// What a failed launch reported, or "" where it succeeded.
std::string outcome(cudaError_t err) { return err == cudaSuccess ? "" : cudaGetErrorString(err); }

}  // namespace

std::vector<int> run_butterfly(int blocks) {
  std::vector<int> out(size_t(blocks) * 64, -1);
  if (launch_one(butterfly_sum, dim3(blocks), dim3(64), out.data()) != cudaSuccess) out.clear();
  return out;
}

std::vector<int> run_neighbour_read(int blocks, bool barrier) {
  std::vector<int> out(256, -1), all;
  for (int b = 0; b < blocks; ++b) {
    if (launch_one(neighbour_read, dim3(1), dim3(256), out.data(), barrier) != cudaSuccess)
      return {};
    all.insert(all.end(), out.begin(), out.end());
  }
  return all;
}

std::map<std::string, std::string> misuse_outcomes() {
  register_launch_bounds({{"bounded", 64}});
  return {
      {"exit_before_barrier", outcome(launch_one(exit_before_barrier, dim3(2), dim3(64)))},
      {"divergent_shuffles", outcome(launch_one(divergent_shuffles, dim3(1), dim3(32)))},
      {"shuffle_after_exit", outcome(launch_one(shuffle_after_exit, dim3(1), dim3(64)))},
      {"barrier_in_one_warp", outcome(launch_one(barrier_in_one_warp, dim3(1), dim3(64)))},
      {"over_launch_bounds", outcome(launch_one(bounded, dim3(1), dim3(128)))},
      {"within_launch_bounds", outcome(launch_one(bounded, dim3(1), dim3(64)))},
      {"empty_grid", outcome(launch_one(bounded, dim3(0), dim3(32)))},
      {"grid_y_too_large", outcome(launch_one(bounded, dim3(1, 65536), dim3(32)))},
      {"block_too_large", outcome(launch_one(bounded, dim3(1), dim3(2048)))},
  };
}

}  // namespace spem_emu
