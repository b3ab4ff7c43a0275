"""The paths that the fuzz tests (test_fuzz.py) run every drawn example through: one entry of
PATHS each, name -> how to run the op's forward and backward on given inputs.

A path is an object with
    unavailable() -> None, or the reason it cannot run here (the test then leaves it out)
    max_elements  the largest example it takes (the Triton interpreter is slow)
    rounding      the rounding of its 16-bit results, in half ulps (1: to nearest)
    spem(tensors, grad_out, relu) -> Result
    spem_bn(tensors, grad_out, training, momentum, eps, relu) -> Result
with `tensors` as fuzz_cases builds them (inputs in their own layouts, never copied) and a
Result of the output, every input's gradient (None for a path that has no backward) and the
running statistics after the call. Three kinds:
- OpPath: the public ops (spem, spem_bn) with a backend, autograd included; and the same
  through the CUDA kernels executed on the CPU (tests/cuda_emulation), their C++ autograd op;
- KernelOpsPath: a torch.ops library with torch.ops.spem_native's signatures, its
  forward and backward ops called as ops.py calls a backend (backends/contract.py): the
  native library here; a library of the same ops built another way is one more entry;
- ExportPath: export.py's standard-op compositions (what an ONNX graph holds), forward only.
"""
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

import cuda_emulation
from op_checks import leaves
from spem_kernels import export, spem, spem_bn
from spem_kernels.backends import unavailable_reason

SPEM_INPUTS = ("x", "w1", "b1", "w2", "b2", "p", "residual")
BN_INPUTS = ("y", "running_mean", "running_var", "weight", "bias", "w1", "b1", "w2", "b2", "p",
             "residual")
# spem_bn's inputs that have a gradient (the running statistics are buffers).
BN_GRADS = ("y", "weight", "bias", "w1", "b1", "w2", "b2", "p", "residual")


@dataclass
class Result:
    out: torch.Tensor
    grads: Optional[dict]  # input name -> gradient (None where the input is None)
    running: tuple = (None, None)  # running_mean, running_var after the call


def _clone(t):
    return t.clone() if t is not None else None


class OpPath:
    """spem / spem_bn with backend=`backend`, differentiated by autograd (or, with
    `emulated`, the CUDA emulation's differentiable ops)."""

    def __init__(self, backend, max_elements=None, rounding=1, emulated=False):
        self.backend, self.max_elements, self.rounding = backend, max_elements, rounding
        self.emulated = emulated
        self._spem, self._spem_bn = ((cuda_emulation.spem, cuda_emulation.spem_bn) if emulated
                                     else (functools.partial(spem, backend=backend),
                                           functools.partial(spem_bn, backend=backend)))

    def unavailable(self):
        if self.emulated:
            cuda_emulation.set_schedule(cuda_emulation.SEED)  # builds it on first use
            return None
        return unavailable_reason(self.backend, torch.device("cpu"))

    def spem(self, tensors, grad_out, relu):
        t = leaves(tensors)
        out = self._spem(*t[:6], t[6], relu=relu)
        out.backward(grad_out)
        return Result(out.detach(), {n: v.grad if v is not None else None
                                     for n, v in zip(SPEM_INPUTS, t)})

    def spem_bn(self, tensors, grad_out, training, momentum, eps, relu):
        y, rm, rv, *rest = tensors
        rm, rv = _clone(rm), _clone(rv)
        t = leaves([y, *rest])
        out = self._spem_bn(t[0], rm, rv, *t[1:8], t[8], training=training,
                            momentum=momentum, eps=eps, relu=relu)
        out.backward(grad_out)
        return Result(out.detach(), {n: v.grad if v is not None else None
                                     for n, v in zip(BN_GRADS, t)}, (rm, rv))


class KernelOpsPath:
    """The forward and backward ops of a torch.ops library (`namespace`, loaded by
    `load()`, which returns None or why it cannot load), called as ops.py's autograd
    formulas call a backend's: the backward gets out for the ReLU mask, and the residual's
    gradient is the masked one the backward writes (with ReLU) or dL/dout itself."""

    def __init__(self, namespace, load, max_elements=None, rounding=1):
        self.namespace, self.load, self.max_elements = namespace, load, max_elements
        self.rounding = rounding

    def unavailable(self):
        return self.load()

    def _ops(self):
        return getattr(torch.ops, self.namespace)

    def spem(self, tensors, grad_out, relu):
        x, w1, b1, w2, b2, p, res = tensors
        ops = self._ops()
        with torch.no_grad():
            out, stats, idx = ops.spem_forward(x, w1, b1, w2, b2, p, res, relu)
            dx, dres, *param_grads = ops.spem_backward(
                grad_out, x, out if relu else x, stats, idx, w1, b1, w2, b2, p, relu,
                res is not None and relu)
        dres = None if res is None else dres if relu else grad_out
        return Result(out, dict(zip(SPEM_INPUTS, (dx, *param_grads, dres))))

    def spem_bn(self, tensors, grad_out, training, momentum, eps, relu):
        y, rm, rv, weight, bias, w1, b1, w2, b2, p, res = tensors
        rm, rv = _clone(rm), _clone(rv)
        ops = self._ops()
        with torch.no_grad():
            out, stats, idx, mean, invstd = ops.spem_bn_forward(
                y, rm, rv, weight, bias, w1, b1, w2, b2, p, res, training, momentum, eps, relu)
            dy, dres, dweight, dbias, *param_grads = ops.spem_bn_backward(
                grad_out, y, out if relu else y, stats, idx, mean, invstd, weight, bias, w1, b1,
                w2, b2, p, training, relu, res is not None and relu)
        dres = None if res is None else dres if relu else grad_out
        grads = (dy, dweight if weight is not None else None,
                 dbias if bias is not None else None, *param_grads, dres)
        return Result(out, dict(zip(BN_GRADS, grads)), (rm, rv))


class ExportPath:
    """export.py's compositions in standard ops (ONNX export records them): forward only."""
    max_elements, rounding = None, 1

    def unavailable(self):
        return None

    def spem(self, tensors, grad_out, relu):
        return Result(export.spem(*tensors[:6], tensors[6], relu), None)

    def spem_bn(self, tensors, grad_out, training, momentum, eps, relu):
        y, rm, rv, *rest = tensors
        rm, rv = _clone(rm), _clone(rv)
        out = export.spem_bn(y, rm, rv, *rest, training=training, momentum=momentum, eps=eps,
                             relu=relu)
        return Result(out, None, (rm, rv))


def _native_library():
    return unavailable_reason("native", torch.device("cpu"))


# Triton on CPU tensors is its interpreter, ~0.1-0.4 s an example at these sizes: it takes
# the smaller examples (a quarter to a third of those drawn). Its float32 -> bfloat16 cast
# truncates (triton 3.6 interpreter.py, _convert_float without a rounding mode), where a
# GPU's rounds to nearest: its bfloat16 results are allowed a whole ulp.
TRITON_MAX_ELEMENTS = 600
_TRITON_ROUNDING = 2 if os.environ.get("TRITON_INTERPRET") == "1" else 1

PATHS = {
    "native": OpPath("native"),
    "native-kernels": KernelOpsPath("spem_native", _native_library),
    "triton": OpPath("triton", max_elements=TRITON_MAX_ELEMENTS, rounding=_TRITON_ROUNDING),
    "onnx-composition": ExportPath(),
    "cuda-emulated": OpPath(None, emulated=True),
}
