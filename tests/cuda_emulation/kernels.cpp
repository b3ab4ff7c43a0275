// csrc/spem_cuda.cu itself, compiled as C++ for the emulated CUDA of emulated_cuda.h, and
// each kernel's __launch_bounds__ for the runtime's launch checks.
//
// The system headers the .cu uses come first, so that they are read before __CUDACC__ is
// defined; from there on the preprocessor takes the branches nvcc takes (spem_math.h's
// device math, for one).
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "emulated_cuda.h"
#include "runtime.h"

#define __CUDACC__ 1
#include "spem_cuda.cu"
#undef __CUDACC__

namespace {
using namespace spem_native;
// launch_bounds.inc: generated from csrc/*.cu by tests/cuda_emulation/__init__.py, a list
// of {"kernel", its __launch_bounds__ expression} read here in the .cu's own scope.
const bool launch_bounds_registered = (spem_emu::register_launch_bounds({
#include "launch_bounds.inc"
                                       }),
                                       true);
}  // namespace
