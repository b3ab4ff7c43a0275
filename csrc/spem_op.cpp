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

ParamTensors compute_params(const SpemParams& params, at::ScalarType acc) {
  return {as_compute(params.w1, acc), as_compute(params.b1, acc), as_compute(params.w2, acc),
          as_compute(params.b2, acc), as_compute(params.p, acc)};
}

void ParamGrads::finish() {
  for (size_t k = 0; k < result.size(); ++k)
    if (!result[k].is_same(written[k])) result[k].copy_(written[k]);
}

// --- checks ---

static void check_float(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || d == at::kDouble, name,
              " must be float32, float16, bfloat16 or float64, got ", d);
}

static void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
              x.device());
}

static void check_params(const at::Tensor& x, const SpemParams& params) {
  const int64_t C = x.size(1);
  const std::pair<const char*, const at::Tensor*> named[] = {{"w1", &params.w1},
                                                             {"b1", &params.b1},
                                                             {"w2", &params.w2},
                                                             {"b2", &params.b2},
                                                             {"p", &params.p}};
  for (const auto& [name, t] : named) {
    const int64_t want = t == &params.p ? 2 : C;
    TORCH_CHECK(t->numel() == want, name, " must have ", want, " elements, got ", t->numel());
    TORCH_CHECK(t->is_floating_point(), name, " must be floating point");
    TORCH_CHECK(t->device() == x.device(), name, " is on ", t->device(), " but x is on ",
                x.device());
  }
}

static void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.sizes());
  check_float(x, "x");
  // Positions are int32 (idx's dtype).
  TORCH_CHECK(x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(),
              "H * W must fit in int32, got ", x.sizes());
}

static void check_forward(const at::Tensor& x, const SpemParams& params,
                          const std::optional<at::Tensor>& residual) {
  check_x(x);
  check_params(x, params);
  if (residual.has_value()) check_like(*residual, x, "residual");
}

static void check_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                           const at::Tensor& stats, const at::Tensor& idx,
                           const SpemParams& params) {
  check_x(x);
  check_params(x, params);
  check_like(grad, x, "grad");
  check_like(out, x, "out");
  const std::vector<int64_t> stat_shape = {x.size(0), x.size(1), 2};
  TORCH_CHECK(stats.sizes() == stat_shape &&
                  stats.scalar_type() == compute_dtype(x.scalar_type()),
              "stats must be (N, C, 2) ", compute_dtype(x.scalar_type()), ", got ",
              stats.sizes(), " ", stats.scalar_type());
  TORCH_CHECK(idx.sizes() == stat_shape && idx.scalar_type() == at::kInt,
              "idx must be (N, C, 2) int32, got ", idx.sizes(), " ", idx.scalar_type());
  TORCH_CHECK(stats.device() == x.device() && idx.device() == x.device(),
              "stats and idx must be on x's device");
}

static bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

static void check_channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& y,
                                 const char* name) {
  if (!given(t)) return;
  TORCH_CHECK(t->numel() == y.size(1), name, " must have C = ", y.size(1), " elements, got ",
              t->numel());
  TORCH_CHECK(t->is_floating_point(), name, " must be floating point");
  TORCH_CHECK(t->device() == y.device(), name, " is on ", t->device(), " but y is on ",
              y.device());
}

static void check_bn_affine(const BnInputs& bn, const at::Tensor& y) {
  check_channel_vector(bn.weight, y, "weight");
  check_channel_vector(bn.bias, y, "bias");
}

// --- set-up ---

ParamTensors setup_forward(const at::Tensor& x, const SpemParams& params,
                           const std::optional<at::Tensor>& residual) {
  check_forward(x, params, residual);
  return compute_params(params, compute_dtype(x.scalar_type()));
}

ParamTensors setup_bn_forward(const at::Tensor& y, const BnInputs& bn, const SpemParams& params,
                              const std::optional<at::Tensor>& residual, bool training) {
  check_forward(y, params, residual);
  check_channel_vector(bn.running_mean, y, "running_mean");
  check_channel_vector(bn.running_var, y, "running_var");
  check_bn_affine(bn, y);
  const bool has_mean = given(bn.running_mean), has_var = given(bn.running_var);
  TORCH_CHECK(has_mean == has_var, "running_mean and running_var must be given together");
  TORCH_CHECK(training || has_mean, "training=False needs running_mean and running_var");
  TORCH_CHECK(!has_mean || (bn.running_mean->is_contiguous() && bn.running_var->is_contiguous()),
              "running_mean and running_var must be contiguous (they are updated in place)");
  TORCH_CHECK(!training || y.numel() != y.size(1),
              "Expected more than 1 value per channel when training, got input size ",
              y.sizes());
  return compute_params(params, compute_dtype(y.scalar_type()));
}

ForwardResult allocate_forward(const at::Tensor& x, bool save) {
  if (!save) return {at::empty_like(x), at::Tensor(), at::Tensor()};
  const auto opts = x.options();
  return {at::empty_like(x),
          at::empty({x.size(0), x.size(1), 2}, opts.dtype(compute_dtype(x.scalar_type()))),
          at::empty({x.size(0), x.size(1), 2}, opts.dtype(at::kInt))};
}

BnForwardResult allocate_bn_forward(const at::Tensor& y, bool save) {
  auto [out, stats, idx] = allocate_forward(y, save);
  const auto acc = y.options().dtype(compute_dtype(y.scalar_type()));
  return {out, stats, idx, at::empty({y.size(1)}, acc), at::empty({y.size(1)}, acc)};
}

// at::empty with a tensor's sizes: contiguous, whatever its own layout; `written` is the
// tensor itself where its dtype is the compute dtype, else a compute-dtype twin.
static std::pair<at::Tensor, at::Tensor> grad_and_written(const at::Tensor& t,
                                                          at::ScalarType acc) {
  const at::Tensor g = at::empty(t.sizes(), t.options());
  return {g, t.scalar_type() == acc ? g : at::empty(t.sizes(), t.options().dtype(acc))};
}

BackwardSetup setup_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                             const at::Tensor& stats, const at::Tensor& idx,
                             const SpemParams& params, bool write_dres) {
  check_backward(grad, x, out, stats, idx, params);
  BackwardSetup s;
  s.acc = compute_dtype(x.scalar_type());
  s.dx = at::empty_like(x);
  s.dres = write_dres ? at::empty_like(x) : at::empty({0}, x.options());
  s.params = compute_params(params, s.acc);
  const ParamTensors given = {params.w1, params.b1, params.w2, params.b2, params.p};
  for (size_t k = 0; k < given.size(); ++k)
    std::tie(s.grads.result[k], s.grads.written[k]) = grad_and_written(given[k], s.acc);
  s.empty = x.numel() == 0;
  if (s.empty)
    for (auto& g : s.grads.written) g.zero_();
  return s;
}

BackwardResult BackwardSetup::result() {
  grads.finish();
  const auto& [dw1, db1, dw2, db2, dp] = grads.result;
  return {dx, dres, dw1, db1, dw2, db2, dp};
}

BnTensors bn_tensors(const BnInputs& in, at::ScalarType acc) {
  auto compute = [&](const std::optional<at::Tensor>& t) {
    return given(t) ? as_compute(*t, acc) : at::Tensor();
  };
  BnTensors t{compute(in.weight), compute(in.bias), compute(in.running_mean),
              compute(in.running_var)};
  if (t.running_mean.defined() &&
      (!t.running_mean.is_same(*in.running_mean) || !t.running_var.is_same(*in.running_var))) {
    t.caller_mean = *in.running_mean;
    t.caller_var = *in.running_var;
  }
  return t;
}

void BnTensors::finish() {
  if (!caller_mean.defined()) return;
  if (!caller_mean.is_same(running_mean)) caller_mean.copy_(running_mean.view_as(caller_mean));
  if (!caller_var.is_same(running_var)) caller_var.copy_(running_var.view_as(caller_var));
}

void BnParamGrads::finish() {
  if (!dweight.is_same(written_dweight)) dweight.copy_(written_dweight);
  if (!dbias.is_same(written_dbias)) dbias.copy_(written_dbias);
}

BnBackwardSetup setup_bn_backward(const at::Tensor& grad, const at::Tensor& y,
                                  const at::Tensor& out, const at::Tensor& stats,
                                  const at::Tensor& idx, const at::Tensor& mean,
                                  const at::Tensor& invstd, const BnInputs& bn,
                                  const SpemParams& params, bool write_dres) {
  BnBackwardSetup s;
  static_cast<BackwardSetup&>(s) = setup_backward(grad, y, out, stats, idx, params, write_dres);
  check_bn_affine(bn, y);
  for (const at::Tensor* t : {&mean, &invstd})
    TORCH_CHECK(t->numel() == y.size(1) && t->scalar_type() == s.acc &&
                    t->device() == y.device(),
                "mean and invstd must be (C,) ", s.acc, " on y's device");
  s.bn = bn_tensors({std::nullopt, std::nullopt, bn.weight, bn.bias}, s.acc);
  // Absent weight or bias: a (C,) gradient in the compute dtype all the same.
  const at::Tensor channel = at::empty({y.size(1)}, y.options().dtype(s.acc));
  std::tie(s.bn_grads.dweight, s.bn_grads.written_dweight) =
      grad_and_written(given(bn.weight) ? *bn.weight : channel, s.acc);
  std::tie(s.bn_grads.dbias, s.bn_grads.written_dbias) =
      grad_and_written(given(bn.bias) ? *bn.bias : channel, s.acc);
  if (s.empty) {
    s.bn_grads.written_dweight.zero_();
    s.bn_grads.written_dbias.zero_();
  }
  return s;
}

BnBackwardResult BnBackwardSetup::result() {
  const auto [dy, dres_, dw1, db1, dw2, db2, dp] = BackwardSetup::result();
  bn_grads.finish();
  return {dy, dres_, bn_grads.dweight, bn_grads.dbias, dw1, db1, dw2, db2, dp};
}

}  // namespace spem_native

SPEM_TORCH_LIBRARY(SPEM_LIBRARY, m) {
  // The differentiable op (spem_autograd.cpp); the three below are its kernels.
  m.def(
      "spem(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, Tensor? residual, "
      "bool relu) -> Tensor");
  m.def(
      "spem_forward(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, "
      "Tensor? residual, bool relu) -> (Tensor out, Tensor stats, Tensor idx)");
  // The output alone, for a forward that no backward follows: no stats or positions.
  m.def(
      "spem_output(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, "
      "Tensor? residual, bool relu) -> Tensor");
  m.def(
      "spem_backward(Tensor grad, Tensor x, Tensor out, Tensor stats, Tensor idx, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, bool relu, bool write_dres) "
      "-> (Tensor dx, Tensor dres, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2, Tensor dp)");
  // spem_bn: BatchNorm, then spem. The running statistics are updated in place in training.
  m.def(
      "spem_bn(Tensor y, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
      "Tensor? bias, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, Tensor? residual, "
      "bool training, float momentum, float eps, bool relu) -> Tensor");
  // The output alone, for a forward that no backward follows (the statistics still updated).
  m.def(
      "spem_bn_output(Tensor y, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? weight, Tensor? bias, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, "
      "Tensor? residual, bool training, float momentum, float eps, bool relu) -> Tensor");
  m.def(
      "spem_bn_forward(Tensor y, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? weight, Tensor? bias, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor p, "
      "Tensor? residual, bool training, float momentum, float eps, bool relu) "
      "-> (Tensor out, Tensor stats, Tensor idx, Tensor mean, Tensor invstd)");
  m.def(
      "spem_bn_backward(Tensor grad, Tensor y, Tensor out, Tensor stats, Tensor idx, "
      "Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, Tensor p, bool training, bool relu, bool write_dres) "
      "-> (Tensor dy, Tensor dres, Tensor dweight, Tensor dbias, Tensor dw1, Tensor db1, "
      "Tensor dw2, Tensor db2, Tensor dp)");
}
