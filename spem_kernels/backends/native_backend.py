"""Native backend: the C++/CUDA kernels of csrc/ (built and loaded by native_build).

The library registers the ops torch.ops.spem_native.spem_forward / spem_backward, whose
arguments and results are this module's `forward` / `backward` (backends/contract.py),
spem_native.spem_output (the output alone, for a forward no backward follows), and
spem_native.spem, the differentiable op with its autograd in C++ (`differentiable`), which
the eager call path uses: the cheapest on the host, and without a gradient to compute it runs
spem_output (see csrc/spem_autograd.cpp); and the same for spem_bn (spem_bn_forward /
spem_bn_backward / spem_bn).
"""
import threading

import torch

from . import contract, native_build

NAME = "native"
_lock = threading.Lock()
_reasons = None  # {"cpu": reason or None, "cuda": reason or None} once a build was tried
_fakes_registered = False


# The spem_native op behind each entry point of the contract: the op takes the entry point's
# arguments and returns what it returns.
OPS = {"differentiable": "spem", "forward": "spem_forward", "output": "spem_output",
       "backward": "spem_backward", "bn_differentiable": "spem_bn",
       "bn_forward": "spem_bn_forward", "bn_output": "spem_bn_output",
       "bn_backward": "spem_bn_backward"}


def _register_fakes():
    """Shapes for FakeTensor/torch.compile: the kernels allocate exactly these."""
    for entry_point, op in OPS.items():
        torch.library.register_fake(f"spem_native::{op}", contract.fake(entry_point))


def _ensure_built():
    global _reasons, _fakes_registered
    if _reasons is not None:  # no lock once built: torch.compile traces this, and cannot lock
        return _reasons
    with _lock:
        if _reasons is None:
            reasons = native_build.load()
            if reasons["cpu"] is None and not _fakes_registered:
                _register_fakes()
                _fakes_registered = True
            _reasons = reasons
        return _reasons


def is_available(device):
    if device.type not in ("cpu", "cuda"):
        return f"the native backend has no kernels for {device.type} tensors"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return _ensure_built()[device.type]


def forward(x, w1, b1, w2, b2, p, residual, relu):
    return _ops().spem_forward.default(x, w1, b1, w2, b2, p, residual, relu)


def backward(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres):
    return _ops().spem_backward.default(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu,
                                        write_dres)


def output(x, w1, b1, w2, b2, p, residual, relu):
    return _ops().spem_output.default(x, w1, b1, w2, b2, p, residual, relu)


def bn_output(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
              training, momentum, eps, relu):
    return _ops().spem_bn_output.default(y, running_mean, running_var, weight, bias, w1, b1, w2,
                                         b2, p, residual, training, momentum, eps, relu)


def differentiable(x, w1, b1, w2, b2, p, residual, relu):
    return _ops().spem.default(x, w1, b1, w2, b2, p, residual, relu)


def bn_forward(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
               training, momentum, eps, relu):
    return _ops().spem_bn_forward.default(y, running_mean, running_var, weight, bias, w1, b1,
                                          w2, b2, p, residual, training, momentum, eps, relu)


def bn_backward(grad, y, out, stats, idx, mean, invstd, weight, bias, w1, b1, w2, b2, p,
                training, relu, write_dres):
    return _ops().spem_bn_backward.default(grad, y, out, stats, idx, mean, invstd, weight, bias,
                                           w1, b1, w2, b2, p, training, relu, write_dres)


def bn_differentiable(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p, residual,
                      training, momentum, eps, relu):
    return _ops().spem_bn.default(y, running_mean, running_var, weight, bias, w1, b1, w2, b2, p,
                                  residual, training, momentum, eps, relu)


def _ops():
    """torch.ops.spem_native, built and registered on first use (a caller may skip
    is_available)."""
    _ensure_built()
    return torch.ops.spem_native
