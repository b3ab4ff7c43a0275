// The spem_native op schema and the checks and allocations every device's kernel shares.
#include "spem_op.h"

#include <torch/library.h>

#include <limits>

#include "spem_math.h"

namespace spem_native {

at::ScalarType compute_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

static at::Tensor as_compute(const at::Tensor& param, at::ScalarType acc) {
  if (param.scalar_type() == acc && param.is_contiguous()) return param;
  return param.reshape(-1).to(acc).contiguous();
}

ParamTensors compute_params(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& b2, const at::Tensor& p, at::ScalarType acc) {
  return {as_compute(w1, acc), as_compute(b1, acc), as_compute(w2, acc), as_compute(b2, acc),
          as_compute(p, acc)};
}

ParamGrads allocate_param_grads(const ParamTensors& params, at::ScalarType acc) {
  // at::empty with a parameter's sizes: contiguous, whatever the parameter's own layout.
  ParamGrads g;
  for (size_t k = 0; k < params.size(); ++k) {
    g.result[k] = at::empty(params[k].sizes(), params[k].options());
    g.written[k] = params[k].scalar_type() == acc
                       ? g.result[k]
                       : at::empty(params[k].sizes(), params[k].options().dtype(acc));
  }
  return g;
}

void ParamGrads::finish() {
  for (size_t k = 0; k < result.size(); ++k)
    if (!result[k].is_same(written[k])) result[k].copy_(written[k]);
}

static void check_float(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || d == at::kDouble,
              name, " must be float32, float16, bfloat16 or float64, got ", d);
}

static void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
              x.device());
}

static void check_params(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p) {
  const int64_t C = x.size(1);
  const char* names[] = {"w1", "b1", "w2", "b2", "p"};
  const at::Tensor* params[] = {&w1, &b1, &w2, &b2, &p};
  for (int k = 0; k < 5; ++k) {
    const int64_t want = k < 4 ? C : 2;
    TORCH_CHECK(params[k]->numel() == want, names[k], " must have ", want, " elements, got ",
                params[k]->numel());
    TORCH_CHECK(params[k]->is_floating_point(), names[k], " must be floating point");
    TORCH_CHECK(params[k]->device() == x.device(), names[k], " is on ", params[k]->device(),
                " but x is on ", x.device());
  }
}

static void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.sizes());
  check_float(x, "x");
  // Positions are int32 (idx's dtype).
  TORCH_CHECK(x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(),
              "H * W must fit in int32, got ", x.sizes());
}

void check_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                   const std::optional<at::Tensor>& residual) {
  check_x(x);
  check_params(x, w1, b1, w2, b2, p);
  if (residual.has_value()) check_like(*residual, x, "residual");
}

void check_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                    const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& w1,
                    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                    const at::Tensor& p) {
  check_x(x);
  check_params(x, w1, b1, w2, b2, p);
  check_like(grad, x, "grad");
  check_like(out, x, "out");
  const std::vector<int64_t> stat_shape = {x.size(0), x.size(1), 2};
  TORCH_CHECK(stats.sizes() == stat_shape && stats.scalar_type() == compute_dtype(x.scalar_type()),
              "stats must be (N, C, 2) ", compute_dtype(x.scalar_type()), ", got ", stats.sizes(),
              " ", stats.scalar_type());
  TORCH_CHECK(idx.sizes() == stat_shape && idx.scalar_type() == at::kInt,
              "idx must be (N, C, 2) int32, got ", idx.sizes(), " ", idx.scalar_type());
  TORCH_CHECK(stats.device() == x.device() && idx.device() == x.device(),
              "stats and idx must be on x's device");
}

ForwardResult allocate_forward(const at::Tensor& x) {
  const auto opts = x.options();
  return {at::empty_like(x),
          at::empty({x.size(0), x.size(1), 2}, opts.dtype(compute_dtype(x.scalar_type()))),
          at::empty({x.size(0), x.size(1), 2}, opts.dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor> allocate_input_grads(const at::Tensor& x, bool write_dres) {
  return {at::empty_like(x), write_dres ? at::empty_like(x) : at::empty({0}, x.options())};
}

}  // namespace spem_native

TORCH_LIBRARY(spem_native, m) {
  // The differentiable op (spem_autograd.cpp); the three below are its kernels.
  m.def("spem(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, Tensor? residual, "
        "bool relu) -> Tensor");
  m.def("spem_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, "
        "Tensor? residual, bool relu) -> (Tensor out, Tensor stats, Tensor idx)");
  // The output alone, for a forward that no backward follows: no stats or positions.
  m.def("spem_output(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, "
        "Tensor? residual, bool relu) -> Tensor");
  m.def("spem_backward(Tensor grad, Tensor x, Tensor out, Tensor stats, Tensor idx, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, bool relu, bool write_dres) "
        "-> (Tensor dx, Tensor dres, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2, Tensor dp)");
}
