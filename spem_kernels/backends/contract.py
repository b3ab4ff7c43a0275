"""The contract every kernel backend keeps: its entry points and what they return.

Backends (triton_backend, native_backend and the C++ library it loads) import this module;
the registry (backends/__init__.py), ops.py and the fake (torch.compile) registrations use
its allocations, so one definition of every output's shape, dtype and layout serves all.

Every kernel backend is a module with NAME and the entry points of `KernelBackend` below,
for each of the two ops of the family: spem (SPEM with the block tail) and spem_bn
(BatchNorm, then spem). `check` verifies a module against it when the registry loads it.

Parameters arrive as the caller passed them (C elements each, 2 for p, any shape and float
dtype); `stats` is (N, C, 2) [max, min] in the compute dtype, `idx` is (N, C, 2) int32
[argmax, argmin] as row-major h*W + w. Backward returns every gradient in its final form:
dx like x; `dres` the masked gradient G when `write_dres`, else an empty tensor; each
parameter's gradient with that parameter's shape and dtype, p's included (formed on the
device from dq0 - dq1 = dZ w1 w2 (M - m) summed over (n, c), computed directly rather than
as a difference of two large sums; see SPEM.md). A backward is at most two kernel launches
and moves no data between host and device, so a training step captures in a CUDA graph.

spem_bn's max and min (`stats`) are those of the normalised values x = y * alpha + beta
(alpha = weight * invstd, beta = bias - mean * alpha per channel). `mean` and `invstd` (C,
compute dtype) are what normalised y: the batch's statistics in training (biased variance),
the running ones otherwise; in training the running statistics, when given, are updated in
place (unbiased variance, `momentum`). Its backward gives dweight and dbias in weight's and
bias's shape and dtype, or (C,) in the compute dtype where they are None. A forward is at
most three launches (statistics, per-channel finalisation, the fused pass), a backward too
(a reduction pass, the parameter gradients, the writing pass). The "eager" backend is the
reference itself and needs none of this: autograd differentiates it (it keeps `Backend`).
"""
import inspect
from typing import Optional, Protocol

import torch
from torch import Tensor


class Backend(Protocol):
    """What every backend module has, the "eager" one (reference.py) included."""

    NAME: str  # the name the registry loads it by

    def is_available(self, device: torch.device) -> Optional[str]:
        """None when it runs on `device`, else a sentence saying why not."""


class KernelBackend(Backend, Protocol):
    """The entry points of a kernel backend module (`self` aside, a module's functions take
    these parameters, by these names). `differentiable` and `bn_differentiable` may be None:
    then ops.py wires the autograd around forward and backward."""

    def differentiable(self, x, w1, b1, w2, b2, p, residual, relu) -> Tensor:
        """The whole op with its autograd, where the backend wires it itself (native: C++)."""

    def forward(self, x, w1, b1, w2, b2, p, residual, relu) -> tuple[Tensor, Tensor, Tensor]:
        """(out, stats, idx)."""

    def output(self, x, w1, b1, w2, b2, p, residual, relu) -> Tensor:
        """The forward when no backward follows (grad mode off, or nothing wants a
        gradient): only the output allocated and written."""

    def backward(self, grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres
                 ) -> tuple[Tensor, ...]:
        """(dx, dres, dw1, db1, dw2, db2, dp)."""

    def bn_differentiable(self, y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                          residual, training, momentum, eps, relu) -> Tensor:
        """spem_bn with its autograd, as `differentiable` is spem's."""

    def bn_forward(self, y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                   residual, training, momentum, eps, relu) -> tuple[Tensor, ...]:
        """(out, stats, idx, mean, invstd)."""

    def bn_output(self, y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                  residual, training, momentum, eps, relu) -> Tensor:
        """spem_bn's output alone, as `output` is spem's."""

    def bn_backward(self, grad, y, out, stats, idx, mean, invstd, weight, bias, w1, b1, w2,
                    b2, p, training, relu, write_dres) -> tuple[Tensor, ...]:
        """(dy, dres, dweight, dbias, dw1, db1, dw2, db2, dp)."""


MAY_BE_NONE = ("differentiable", "bn_differentiable")


class BackendContractError(TypeError):
    """A backend module lacks an entry point of the contract, or takes other parameters."""


def entry_points(protocol=KernelBackend):
    """{name: signature without self} of the protocol's functions, in the order written."""
    return {name: _without_self(inspect.signature(fn))
            for cls in reversed(protocol.__mro__) if cls.__dict__.get("_is_protocol")
            for name, fn in cls.__dict__.items()
            if inspect.isfunction(fn) and not name.startswith("_")}


def _without_self(signature):
    return signature.replace(parameters=list(signature.parameters.values())[1:])


_MISSING = object()


def check(module, protocol=KernelBackend):
    """Raise BackendContractError naming everything `module` lacks of `protocol`: NAME, a
    missing or uncallable entry point, or one whose parameters are not the contract's (a
    backend may add parameters after them, with defaults)."""
    problems = [] if isinstance(getattr(module, "NAME", None), str) else ["NAME (a str) is missing"]
    for name, signature in entry_points(protocol).items():
        fn = getattr(module, name, _MISSING)
        if fn is _MISSING:
            problems.append(f"{name}{signature} is missing")
        elif fn is None and name in MAY_BE_NONE:
            continue
        elif not callable(fn):
            problems.append(f"{name} is not callable (a {type(fn).__name__})")
        else:
            problem = _parameters_problem(fn, signature)
            if problem:
                problems.append(f"{name} {problem}")
    if problems:
        raise BackendContractError(
            f"backend module {module.__name__} does not keep the backend contract "
            f"({protocol.__name__} in spem_kernels/backends/contract.py): "
            + "; ".join(problems))


def _parameters_problem(fn, signature):
    """None when fn takes the contract's parameters, by name and in order, and any others
    only after them with defaults; else what differs."""
    wanted = list(signature.parameters)
    params = list(inspect.signature(fn).parameters.values())
    names = [q.name for q in params[:len(wanted)]]
    extra = [q.name for q in params[len(wanted):] if q.default is inspect.Parameter.empty
             and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    if names == wanted and not extra:
        return None
    return (f"takes ({', '.join(q.name for q in params)}), the contract "
            f"({', '.join(wanted)})")


def compute_dtype(dtype):
    """Kernels compute in float64 for float64 inputs (gradcheck) and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward_outputs(x):
    """Uninitialised (out, stats, idx) as every backend's forward returns them; the fake
    (torch.compile) registrations use the same shapes, strides and dtypes."""
    N, C = x.shape[:2]
    return (torch.empty_like(x), x.new_empty((N, C, 2), dtype=compute_dtype(x.dtype)),
            x.new_empty((N, C, 2), dtype=torch.int32))


def backward_outputs(x, write_dres, params):
    """Uninitialised (dx, dres or an empty tensor, dw1, db1, dw2, db2, dp) as every backend's
    backward returns them; `params` are (w1, b1, w2, b2, p). Parameter gradients are
    contiguous, in their parameter's shape and dtype."""
    return (torch.empty_like(x), torch.empty_like(x) if write_dres else x.new_empty(0),
            *(t.new_empty(t.shape) for t in params))


def bn_forward_outputs(y):
    """Uninitialised (out, stats, idx, mean, invstd) of spem_bn's forward."""
    channel = y.new_empty((y.shape[1],), dtype=compute_dtype(y.dtype))
    return (*forward_outputs(y), channel, torch.empty_like(channel))


def bn_backward_outputs(y, write_dres, weight, bias, params):
    """Uninitialised (dy, dres or empty, dweight, dbias, dw1, db1, dw2, db2, dp) of spem_bn's
    backward; `params` are (w1, b1, w2, b2, p)."""
    dy, dres, *param_grads = backward_outputs(y, write_dres, params)
    channel = y.new_empty((y.shape[1],), dtype=compute_dtype(y.dtype))
    return (dy, dres, *(t.new_empty(t.shape) if t is not None else torch.empty_like(channel)
                        for t in (weight, bias)), *param_grads)


# What each entry point returns, allocated from its arguments (by the contract's names): what
# the kernels allocate, and so what the fake (torch.compile) registrations return.
OUTPUTS = {
    "differentiable": lambda x, **_: torch.empty_like(x),
    "forward": lambda x, **_: forward_outputs(x),
    "output": lambda x, **_: torch.empty_like(x),
    "backward": lambda x, write_dres, w1, b1, w2, b2, p, **_:
        backward_outputs(x, write_dres, (w1, b1, w2, b2, p)),
    "bn_differentiable": lambda y, **_: torch.empty_like(y),
    "bn_forward": lambda y, **_: bn_forward_outputs(y),
    "bn_output": lambda y, **_: torch.empty_like(y),
    "bn_backward": lambda y, write_dres, weight, bias, w1, b1, w2, b2, p, **_:
        bn_backward_outputs(y, write_dres, weight, bias, (w1, b1, w2, b2, p)),
}


def fake(entry_point):
    """A fake (torch.compile) implementation of an op whose arguments are `entry_point`'s:
    OUTPUTS[entry_point] of the arguments, positional or by name."""
    signature, allocate = entry_points()[entry_point], OUTPUTS[entry_point]

    def fake_impl(*args, **kwargs):
        return allocate(**signature.bind(*args, **kwargs).arguments)
    return fake_impl
