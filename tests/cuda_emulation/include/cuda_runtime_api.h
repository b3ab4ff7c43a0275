// The CUDA header of this name, emulated on the CPU (see emulated_cuda.h).
#pragma once
#include "emulated_cuda.h"
