// spem_native::spem and spem_native::spem_bn, the differentiable ops: their forward kernels,
// and their backward kernels as the gradient, wired in C++. A Python autograd.Function costs
// tens of microseconds of host time per call (the Python forward and backward, unpacking the
// saved tensors); here a call is one dispatch and the backward runs no Python at all. The
// formula is ops.py's `_gradients`: the backward kernel gives every gradient in its final
// form, only the residual's is chosen here (spem_bn's: ops.py's `_bn_gradients`).
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "spem_op.h"

namespace spem_native {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernel op `name` of the native library, typed (looked up once by each caller's static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

template <typename R>
using SpemSignature = R(SPEM_FORWARD_PARAMS);
template <typename R>
using SpemBnSignature = R(SPEM_BN_FORWARD_PARAMS);

// The forward without autograd: spem_output (Save false) or spem_forward.
template <bool Save>
auto call_forward(SPEM_FORWARD_PARAMS) {
  using R = std::conditional_t<Save, ForwardResult, at::Tensor>;
  static const auto op =
      kernel_op<SpemSignature<R>>(Save ? SPEM_OP("spem_forward") : SPEM_OP("spem_output"));
  return op.call(x, w1, b1, w2, b2, p, residual, relu);
}

template <bool Save>
auto call_bn_forward(SPEM_BN_FORWARD_PARAMS) {
  using R = std::conditional_t<Save, BnForwardResult, at::Tensor>;
  static const auto op = kernel_op<SpemBnSignature<R>>(Save ? SPEM_OP("spem_bn_forward")
                                                            : SPEM_OP("spem_bn_output"));
  return op.call(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                 training, momentum, eps, relu);
}

// What both Functions keep beside the saved tensors.
void save_flags(AutogradContext* ctx, bool relu, const std::optional<at::Tensor>& residual) {
  ctx->saved_data["relu"] = relu;
  ctx->saved_data["has_residual"] = residual.has_value();
}

// The residual's gradient: none without a residual; dL/dout itself without the ReLU; else
// what the backward kernel wrote (dres: dL/dout where out > 0).
at::Tensor residual_grad(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& dres) {
  if (!ctx->saved_data["has_residual"].toBool()) return at::Tensor();
  return ctx->saved_data["relu"].toBool() ? dres : grad;
}

// Whether the backward kernel writes dres (a residual behind a ReLU).
bool writes_dres(AutogradContext* ctx) {
  return ctx->saved_data["has_residual"].toBool() && ctx->saved_data["relu"].toBool();
}

class SpemFunction : public torch::autograd::Function<SpemFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, SPEM_FORWARD_PARAMS) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, stats, idx] = call_forward<true>(x, w1, b1, w2, b2, p, residual, relu);
    // The ReLU mask is read off the output: no full-size mask is kept.
    ctx->save_for_backward({x, relu ? out : x, stats, idx, w1, b1, w2, b2, p});
    save_flags(ctx, relu, residual);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op =
        kernel_op<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, bool, bool)>(SPEM_OP("spem_backward"));
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    auto [dx, dres, dw1, db1, dw2, db2, dp] =
        op.call(grad, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8],
                ctx->saved_data["relu"].toBool(), writes_dres(ctx));
    return {dx, dw1, db1, dw2, db2, dp, residual_grad(ctx, grad, dres), at::Tensor()};
  }
};

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class SpemBnFunction : public torch::autograd::Function<SpemBnFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, SPEM_BN_FORWARD_PARAMS) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, stats, idx, mean, invstd] =
        call_bn_forward<true>(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                              residual, training, momentum, eps, relu);
    if (training && running_mean.has_value() && running_mean->defined()) {
      torch::autograd::impl::bump_version(*running_mean);  // written in place by a kernel
      torch::autograd::impl::bump_version(*running_var);
    }
    // y, not the normalised tensor: the backward normalises again from mean and invstd.
    ctx->save_for_backward({y, relu ? out : y, stats, idx, mean, invstd,
                            weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), w1, b1,
                            w2, b2, p});
    save_flags(ctx, relu, residual);
    ctx->saved_data["training"] = training;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = kernel_op<BnBackwardResult(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool,
        bool)>(SPEM_OP("spem_bn_backward"));
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    auto [dy, dres, dweight, dbias, dw1, db1, dw2, db2, dp] =
        op.call(grad, s[0], s[1], s[2], s[3], s[4], s[5], defined_or_none(s[6]),
                defined_or_none(s[7]), s[8], s[9], s[10], s[11], s[12],
                ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(),
                writes_dres(ctx));
    return {dy,
            at::Tensor(),
            at::Tensor(),
            s[6].defined() ? dweight : at::Tensor(),
            s[7].defined() ? dbias : at::Tensor(),
            dw1,
            db1,
            dw2,
            db2,
            dp,
            residual_grad(ctx, grad, dres),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// Whether a gradient will be asked of a tensor (absent ones: no).
bool needs_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && (t->requires_grad() || t->_fw_grad(0).defined());
}

bool any_needs_grad(std::initializer_list<std::optional<at::Tensor>> ts) {
  return at::GradMode::is_enabled() &&
         std::any_of(ts.begin(), ts.end(), [](const auto& t) { return needs_grad(t); });
}

// A call whose output no gradient will be asked of (grad mode off, as under torch.no_grad, or
// no input that wants one) runs spem_output: the forward without the stats and positions
// that only a backward reads.
at::Tensor spem_autograd(SPEM_FORWARD_PARAMS) {
  if (!any_needs_grad({x, w1, b1, w2, b2, p, residual})) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward<false>(x, w1, b1, w2, b2, p, residual, relu);
  }
  return SpemFunction::apply(x, w1, b1, w2, b2, p, residual, relu);
}

// As spem_autograd: without a gradient to compute, spem_bn_output (the running statistics
// are still updated in training, as F.batch_norm does under torch.no_grad).
at::Tensor spem_bn_autograd(SPEM_BN_FORWARD_PARAMS) {
  if (!any_needs_grad({y, weight, bias, w1, b1, w2, b2, p, residual})) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_bn_forward<false>(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                                  residual, training, momentum, eps, relu);
  }
  return SpemBnFunction::apply(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                               residual, training, momentum, eps, relu);
}

}  // namespace
}  // namespace spem_native

SPEM_TORCH_LIBRARY_IMPL(SPEM_LIBRARY, Autograd, m) {
  m.impl("spem", &spem_native::spem_autograd);
  m.impl("spem_bn", &spem_native::spem_bn_autograd);
}

// Without autograd (inference mode): the forward alone.
SPEM_TORCH_LIBRARY_IMPL(SPEM_LIBRARY, CompositeExplicitAutograd, m) {
  m.impl("spem", &spem_native::call_forward<false>);
  m.impl("spem_bn", &spem_native::call_bn_forward<false>);
}
