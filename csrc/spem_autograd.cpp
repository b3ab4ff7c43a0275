// spem_native::spem and spem_native::spem_bn, the differentiable ops: their forward kernels,
// and their backward kernels as the gradient, wired in C++. A Python autograd.Function costs tens of microseconds of host time
// per call (the Python forward and backward, unpacking the saved tensors); here a call is one
// dispatch and the backward runs no Python at all. The formula is ops.py's `_gradients`: the
// backward kernel gives every gradient in its final form, only the residual's is chosen here
// (spem_bn's: ops.py's `_bn_gradients`).
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <initializer_list>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "spem_op.h"

namespace spem_native {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The argument types of spem_forward / spem_output and of spem_bn_forward / spem_bn_output
// (R: what each returns).
template <typename R>
using SpemSignature = R(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, bool);
template <typename R>
using SpemBnSignature = R(const at::Tensor&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, bool, double, double, bool);

// The kernel op `name` of the native library, typed (looked up once by each caller's static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

ForwardResult call_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                           const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                           const std::optional<at::Tensor>& residual, bool relu) {
  static const auto op = kernel_op<SpemSignature<ForwardResult>>(SPEM_OP("spem_forward"));
  return op.call(x, w1, b1, w2, b2, p, residual, relu);
}

at::Tensor call_output(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                       const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                       const std::optional<at::Tensor>& residual, bool relu) {
  static const auto op = kernel_op<SpemSignature<at::Tensor>>(SPEM_OP("spem_output"));
  return op.call(x, w1, b1, w2, b2, p, residual, relu);
}

BackwardResult call_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                             const at::Tensor& stats, const at::Tensor& idx,
                             const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                             const at::Tensor& b2, const at::Tensor& p, bool relu,
                             bool write_dres) {
  static const auto op =
      kernel_op<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, bool, bool)>(SPEM_OP("spem_backward"));
  return op.call(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres);
}

class SpemFunction : public torch::autograd::Function<SpemFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            const at::Tensor& p, const std::optional<at::Tensor>& residual,
                            bool relu) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, stats, idx] = call_forward(x, w1, b1, w2, b2, p, residual, relu);
    // The ReLU mask is read off the output: no full-size mask is kept.
    ctx->save_for_backward({x, relu ? out : at::Tensor(), stats, idx, w1, b1, w2, b2, p});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_residual"] = residual.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const variable_list s = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const at::Tensor& grad = grads[0];
    auto [dx, dres, dw1, db1, dw2, db2, dp] = call_backward(
        grad, s[0], relu ? s[1] : s[0], s[2], s[3], s[4], s[5], s[6], s[7], s[8], relu,
        has_residual && relu);
    // Without the ReLU the residual's gradient is dL/dout itself.
    const at::Tensor dresidual = !has_residual ? at::Tensor() : relu ? dres : grad;
    return {dx, dw1, db1, dw2, db2, dp, dresidual, at::Tensor()};
  }
};

BnForwardResult call_bn_forward(const at::Tensor& y, const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                                const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                const at::Tensor& p, const std::optional<at::Tensor>& residual,
                                bool training, double momentum, double eps, bool relu) {
  static const auto op =
      kernel_op<SpemBnSignature<BnForwardResult>>(SPEM_OP("spem_bn_forward"));
  return op.call(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                 training, momentum, eps, relu);
}

BnBackwardResult call_bn_backward(const at::Tensor& grad, const at::Tensor& y,
                                  const at::Tensor& out, const at::Tensor& stats,
                                  const at::Tensor& idx, const at::Tensor& mean,
                                  const at::Tensor& invstd,
                                  const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                                  const at::Tensor& b1, const at::Tensor& w2,
                                  const at::Tensor& b2, const at::Tensor& p, bool training,
                                  bool relu, bool write_dres) {
  static const auto op = kernel_op<BnBackwardResult(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, bool, bool, bool)>(SPEM_OP("spem_bn_backward"));
  return op.call(grad, y, out, stats, idx, mean, invstd, weight, bias, w1, b1, w2, b2, p,
                 training, relu, write_dres);
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class SpemBnFunction : public torch::autograd::Function<SpemBnFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            const at::Tensor& p, const std::optional<at::Tensor>& residual,
                            bool training, double momentum, double eps, bool relu) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, stats, idx, mean, invstd] =
        call_bn_forward(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                        residual, training, momentum, eps, relu);
    if (training && running_mean.has_value() && running_mean->defined()) {
      torch::autograd::impl::bump_version(*running_mean);  // written in place by a kernel
      torch::autograd::impl::bump_version(*running_var);
    }
    // y, not the normalised tensor: the backward normalises again from mean and invstd.
    ctx->save_for_backward({y, relu ? out : at::Tensor(), stats, idx, mean, invstd,
                            weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), w1, b1,
                            w2, b2, p});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["training"] = training;
    ctx->saved_data["has_residual"] = residual.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const variable_list s = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const at::Tensor& grad = grads[0];
    auto [dy, dres, dweight, dbias, dw1, db1, dw2, db2, dp] = call_bn_backward(
        grad, s[0], relu ? s[1] : s[0], s[2], s[3], s[4], s[5], defined_or_none(s[6]),
        defined_or_none(s[7]), s[8], s[9], s[10], s[11], s[12],
        ctx->saved_data["training"].toBool(), relu, has_residual && relu);
    const at::Tensor dresidual = !has_residual ? at::Tensor() : relu ? dres : grad;
    return {dy, at::Tensor(), at::Tensor(), s[6].defined() ? dweight : at::Tensor(),
            s[7].defined() ? dbias : at::Tensor(), dw1, db1, dw2, db2, dp, dresidual,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool needs_grad(const at::Tensor& t) { return t.requires_grad() || t._fw_grad(0).defined(); }

// A call whose output no gradient will be asked of (grad mode off, as under torch.no_grad, or
// no input that wants one) runs spem_output: the forward without the stats and positions
// that only a backward reads.
at::Tensor spem_autograd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                         const std::optional<at::Tensor>& residual, bool relu) {
  const bool any = needs_grad(x) || needs_grad(w1) || needs_grad(b1) || needs_grad(w2) ||
                   needs_grad(b2) || needs_grad(p) || (residual && needs_grad(*residual));
  if (!(any && at::GradMode::is_enabled())) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_output(x, w1, b1, w2, b2, p, residual, relu);
  }
  return SpemFunction::apply(x, w1, b1, w2, b2, p, residual, relu);
}

// Without autograd (inference mode): the forward alone.
at::Tensor spem_inference(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& p,
                          const std::optional<at::Tensor>& residual, bool relu) {
  return call_output(x, w1, b1, w2, b2, p, residual, relu);
}

at::Tensor call_bn_output(const at::Tensor& y, const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                          const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                          const at::Tensor& p, const std::optional<at::Tensor>& residual,
                          bool training, double momentum, double eps, bool relu) {
  static const auto op = kernel_op<SpemBnSignature<at::Tensor>>(SPEM_OP("spem_bn_output"));
  return op.call(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                 training, momentum, eps, relu);
}

bool any_needs_grad(std::initializer_list<const std::optional<at::Tensor>*> ts) {
  return std::any_of(ts.begin(), ts.end(), [](const std::optional<at::Tensor>* t) {
    return t->has_value() && (*t)->defined() && needs_grad(**t);
  });
}

// As spem_autograd: without a gradient to compute, spem_bn_output (the running statistics
// are still updated in training, as F.batch_norm does under torch.no_grad).
at::Tensor spem_bn_autograd(const at::Tensor& y, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            const at::Tensor& p, const std::optional<at::Tensor>& residual,
                            bool training, double momentum, double eps, bool relu) {
  const bool any = needs_grad(y) || needs_grad(w1) || needs_grad(b1) || needs_grad(w2) ||
                   needs_grad(b2) || needs_grad(p) || any_needs_grad({&weight, &bias, &residual});
  if (!(any && at::GradMode::is_enabled())) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_bn_output(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                          residual, training, momentum, eps, relu);
  }
  return SpemBnFunction::apply(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                               residual, training, momentum, eps, relu);
}

at::Tensor spem_bn_inference(const at::Tensor& y, const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& w1,
                             const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                             const at::Tensor& p, const std::optional<at::Tensor>& residual,
                             bool training, double momentum, double eps, bool relu) {
  return call_bn_output(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                        training, momentum, eps, relu);
}


}  // namespace
}  // namespace spem_native

SPEM_TORCH_LIBRARY_IMPL(SPEM_LIBRARY, Autograd, m) {
  m.impl("spem", &spem_native::spem_autograd);
  m.impl("spem_bn", &spem_native::spem_bn_autograd);
}

SPEM_TORCH_LIBRARY_IMPL(SPEM_LIBRARY, CompositeExplicitAutograd, m) {
  m.impl("spem", &spem_native::spem_inference);
  m.impl("spem_bn", &spem_native::spem_bn_inference);
}
