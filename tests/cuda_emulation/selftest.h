// The emulation's own checks (selftest.cpp), called from Python through module.cpp.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace spem_emu {

// What every thread of `blocks` 64-thread blocks got from a shuffle butterfly sum (496 each).
std::vector<int> run_butterfly(int blocks);

// `blocks` launches of one 256-thread block: what each thread read of its neighbour's slot
// (neighbour + 1 where the write came first), with or without a barrier in between.
std::vector<int> run_neighbour_read(int blocks, bool barrier);

// Misused launches and what each reported ("" for success).
std::map<std::string, std::string> misuse_outcomes();

}  // namespace spem_emu
