// The spem_native op schemas (spem and spem_bn) and the checks and allocations every
// device's kernels share.
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

// --- spem_bn ---

static at::Tensor optional_as_compute(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? as_compute(*t, acc) : at::Tensor();
}

BnTensors bn_tensors(const std::optional<at::Tensor>& running_mean,
                     const std::optional<at::Tensor>& running_var,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, at::ScalarType acc) {
  BnTensors t{optional_as_compute(weight, acc), optional_as_compute(bias, acc),
              optional_as_compute(running_mean, acc), optional_as_compute(running_var, acc)};
  if (t.running_mean.defined() &&
      (!t.running_mean.is_same(*running_mean) || !t.running_var.is_same(*running_var))) {
    t.caller_mean = *running_mean;
    t.caller_var = *running_var;
  }
  return t;
}

void BnTensors::finish() {
  if (!caller_mean.defined()) return;
  if (!caller_mean.is_same(running_mean)) caller_mean.copy_(running_mean.view_as(caller_mean));
  if (!caller_var.is_same(running_var)) caller_var.copy_(running_var.view_as(caller_var));
}

BnParamGrads allocate_bn_param_grads(const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& y,
                                     at::ScalarType acc) {
  auto grad_of = [&](const std::optional<at::Tensor>& param) {
    if (!param.has_value() || !param->defined()) {
      const at::Tensor g = at::empty({y.size(1)}, y.options().dtype(acc));
      return std::make_pair(g, g);
    }
    const at::Tensor g = at::empty(param->sizes(), param->options());
    return std::make_pair(g, param->scalar_type() == acc
                                 ? g : at::empty(param->sizes(), param->options().dtype(acc)));
  };
  const auto [dweight, written_dweight] = grad_of(weight);
  const auto [dbias, written_dbias] = grad_of(bias);
  return {dweight, dbias, written_dweight, written_dbias};
}

void BnParamGrads::finish() {
  if (!dweight.is_same(written_dweight)) dweight.copy_(written_dweight);
  if (!dbias.is_same(written_dbias)) dbias.copy_(written_dbias);
}

static void check_channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& y,
                                 const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == y.size(1), name, " must have C = ", y.size(1), " elements, got ",
              t->numel());
  TORCH_CHECK(t->is_floating_point(), name, " must be floating point");
  TORCH_CHECK(t->device() == y.device(), name, " is on ", t->device(), " but y is on ",
              y.device());
}

void check_bn_forward(const at::Tensor& y, const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                      const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                      const at::Tensor& p, const std::optional<at::Tensor>& residual,
                      bool training) {
  check_forward(y, w1, b1, w2, b2, p, residual);
  check_channel_vector(running_mean, y, "running_mean");
  check_channel_vector(running_var, y, "running_var");
  check_channel_vector(weight, y, "weight");
  check_channel_vector(bias, y, "bias");
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var, "running_mean and running_var must be given together");
  TORCH_CHECK(training || has_mean, "training=False needs running_mean and running_var");
  TORCH_CHECK(!has_mean || (running_mean->is_contiguous() && running_var->is_contiguous()),
              "running_mean and running_var must be contiguous (they are updated in place)");
  TORCH_CHECK(!training || y.numel() != y.size(1),
              "Expected more than 1 value per channel when training, got input size ", y.sizes());
}

void check_bn_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& out,
                       const at::Tensor& stats, const at::Tensor& idx, const at::Tensor& mean,
                       const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                       const at::Tensor& p) {
  check_backward(grad, y, out, stats, idx, w1, b1, w2, b2, p);
  check_channel_vector(weight, y, "weight");
  check_channel_vector(bias, y, "bias");
  for (const at::Tensor* t : {&mean, &invstd})
    TORCH_CHECK(t->numel() == y.size(1) && t->scalar_type() == compute_dtype(y.scalar_type()) &&
                    t->device() == y.device(),
                "mean and invstd must be (C,) ", compute_dtype(y.scalar_type()), " on y's device");
}

BnForwardResult allocate_bn_forward(const at::Tensor& y) {
  auto [out, stats, idx] = allocate_forward(y);
  const auto acc = y.options().dtype(compute_dtype(y.scalar_type()));
  return {out, stats, idx, at::empty({y.size(1)}, acc), at::empty({y.size(1)}, acc)};
}

}  // namespace spem_native

SPEM_TORCH_LIBRARY(SPEM_LIBRARY, m) {
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
  // spem_bn: BatchNorm, then spem. The running statistics are updated in place in training.
  m.def("spem_bn(Tensor y, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
        "Tensor? bias, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, Tensor? residual, "
        "bool training, float momentum, float eps, bool relu) -> Tensor");
  // The output alone, for a forward that no backward follows (the statistics still updated).
  m.def("spem_bn_output(Tensor y, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor? weight, Tensor? bias, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, "
        "Tensor? residual, bool training, float momentum, float eps, bool relu) -> Tensor");
  m.def("spem_bn_forward(Tensor y, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor? weight, Tensor? bias, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, "
        "Tensor? residual, bool training, float momentum, float eps, bool relu) "
        "-> (Tensor out, Tensor stats, Tensor idx, Tensor mean, Tensor invstd)");
  m.def("spem_bn_backward(Tensor grad, Tensor y, Tensor out, Tensor stats, Tensor idx, "
        "Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor w1, Tensor b1, "
        "Tensor w2, Tensor b2, Tensor p, bool training, bool relu, bool write_dres) "
        "-> (Tensor dy, Tensor dres, Tensor dweight, Tensor dbias, Tensor dw1, Tensor db1, "
        "Tensor dw2, Tensor db2, Tensor dp)");
}
