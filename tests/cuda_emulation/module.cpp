// The emulation's Python module (tests/cuda_emulation/__init__.py loads it): its schedule,
// its launch log, its own checks, and 16-bit conversions to compare with torch's. The ops
// themselves (torch.ops.spem_cuda_emulated.*) register when the module loads.
#include <torch/extension.h>

#include "runtime.h"
#include "selftest.h"

namespace {

// Bits of float32 values rounded to float16 or bfloat16 the emulation's way.
at::Tensor rounded_bits(const at::Tensor& values, bool bfloat16) {
  const at::Tensor v = values.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(v.sizes(), v.options().dtype(at::kShort));
  const float* in = v.data_ptr<float>();
  int16_t* bits = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < v.numel(); ++i)
    bits[i] = int16_t(bfloat16 ? __float2bfloat16_rn(in[i]).bits : __float2half_rn(in[i]).bits);
  return out;
}

// float32 values of float16 or bfloat16 bits, the emulation's way.
at::Tensor widened(const at::Tensor& bits16, bool bfloat16) {
  const at::Tensor b = bits16.to(at::kShort).contiguous();
  at::Tensor out = at::empty(b.sizes(), b.options().dtype(at::kFloat));
  const int16_t* in = b.data_ptr<int16_t>();
  float* v = out.data_ptr<float>();
  for (int64_t i = 0; i < b.numel(); ++i) {
    const uint16_t u = uint16_t(in[i]);
    v[i] = bfloat16 ? __bfloat162float(__nv_bfloat16{u}) : __half2float(__half{u});
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_schedule", &spem_emu::set_schedule, py::arg("seed"), py::arg("workers"),
        "Blocks in an order drawn from seed, `workers` at once; threads interleaved by it too.");
  m.def("launch_log", [] {
    py::list out;
    for (const auto& r : spem_emu::launch_log())
      out.append(py::dict(py::arg("kernel") = r.kernel, py::arg("instance") = r.instance,
                          py::arg("dtype") = r.dtype, py::arg("launches") = r.launches,
                          py::arg("blocks") = r.blocks, py::arg("largest_grid") = r.largest_grid));
    return out;
  });
  m.def("clear_launch_log", &spem_emu::clear_launch_log);
  m.def("compiled_instances", &spem_emu::compiled_instances);
  m.def("launch_bounds", &spem_emu::launch_bounds);
  m.def("run_butterfly", &spem_emu::run_butterfly);
  m.def("run_neighbour_read", &spem_emu::run_neighbour_read);
  m.def("misuse_outcomes", &spem_emu::misuse_outcomes);
  m.def("rounded_bits", &rounded_bits);
  m.def("widened", &widened);
}
