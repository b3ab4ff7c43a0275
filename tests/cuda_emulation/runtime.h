// What the emulation's Python side (module.cpp) and its kernel table (kernels.cpp) ask of
// the runtime (runtime.cpp): the schedule, the launch log, each kernel's launch bounds.
#pragma once

#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "emulated_cuda.h"

namespace spem_emu {

// Launches of one kernel instantiation so far.
struct LaunchRecord {
  std::string kernel;    // "forward_planes"
  std::string instance;  // "forward_planes<float, float, 4>"
  std::string dtype;     // its first template argument: "float", "__half", ...
  uint64_t launches = 0, blocks = 0, largest_grid = 0;
};

// Blocks run in an order drawn from `seed` (and the launch's number since), `workers` at
// once; within a block the threads' interleaving is drawn from it too.
void set_schedule(uint64_t seed, int workers);

std::vector<LaunchRecord> launch_log();
void clear_launch_log();

// Every function of this library that returns void, as "name<template arguments>" (the
// kernels among them: the instantiations compiled, to compare with what was launched).
std::vector<std::string> compiled_instances();

// Each kernel's __launch_bounds__ (threads per block), by name; kernels.cpp registers them.
void register_launch_bounds(std::initializer_list<std::pair<const char*, int>> bounds);
std::map<std::string, int> launch_bounds();

}  // namespace spem_emu
