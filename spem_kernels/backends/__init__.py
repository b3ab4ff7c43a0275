"""Backend registry: which implementations of the SPEM op exist and where they can run.

Every kernel backend is a module with the same entry points:

    is_available(device) -> str | None      None when it runs on `device`, else the reason
    differentiable(x, w1, b1, w2, b2, p, residual, relu) -> out, or None
                                            the whole op with its autograd, where the backend
                                            wires it itself (else ops.py does)
    forward(x, w1, b1, w2, b2, p, residual, relu) -> (out, stats, idx)
    backward(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres)
        -> (dx, dres, dw1, db1, dw2, db2, dp)

Parameters arrive as the caller passed them (C elements each, 2 for p, any shape and float
dtype); `stats` is (N, C, 2) [max, min] in the compute dtype, `idx` is (N, C, 2) int32
[argmax, argmin] as row-major h*W + w. Backward returns every gradient in its final form:
dx like x; `dres` the masked gradient G when `write_dres`, else an empty tensor; each
parameter's gradient with that parameter's shape and dtype, p's included (formed on the
device from dq0 - dq1 = dZ w1 w2 (M - m) summed over (n, c), computed directly rather than
as a difference of two large sums; see SPEM.md). A backward is at most two kernel launches
and moves no data between host and device, so a training step captures in a CUDA graph.
The "eager" backend is the reference itself and needs none of this: autograd
differentiates it.
"""
import importlib

import torch

NAMES = ("triton", "native", "eager")


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


def compiled_backends(device):
    """The fused backends that run compiled kernels on `device`, in the order "auto" tries
    them. Triton on CPU tensors exists only as its interpreter: a test tool, never timed."""
    device = torch.device(device)
    return [b for b in AUTO_ORDER.get(device.type, ()) if unavailable_reason(b, device) is None]


_modules = {}


def load(name):
    """The backend module `name` (for "eager", the reference module), or an ImportError that
    says why it cannot load. Every backend module has NAME, is_available, forward, backward."""
    if name not in _modules:
        module = "..reference" if name == "eager" else f".{name}_backend"
        try:
            _modules[name] = importlib.import_module(module, __name__)
        except Exception as e:  # a missing compiler or package must not break `import spem_kernels`
            _modules[name] = e
    mod = _modules[name]
    if isinstance(mod, Exception):
        raise ImportError(f"backend {name!r} failed to load: {type(mod).__name__}: {mod}") from mod
    return mod


def unavailable_reason(name, device):
    """None if backend `name` runs on `device`, else a sentence saying why not."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES + ('auto',)}, got {name!r}")
    device = torch.device(device)
    try:
        mod = load(name)
    except ImportError as e:
        return str(e)
    return mod.is_available(device)


def available_backends(device="cpu"):
    """The backends among "triton", "native", "eager" that can run on `device`."""
    return [name for name in NAMES if unavailable_reason(name, device) is None]


_resolved = {}


# The order "auto" tries the fused backends in. On CUDA the native kernels come first: they
# were faster end to end at every measured shape (NVIDIA H200, 2026-11-26: block tail fwd+bwd
# 473-731 us native vs 823-1014 us Triton; ResNet-164 step 1.71x plain vs 2.22x), because
# their launches cost the host less. Triton runs where the native build is missing.
AUTO_ORDER = {"cuda": ("native", "triton"), "cpu": ("native",)}


def resolve(backend, device):
    """The backend module that runs a call: "auto" tries AUTO_ORDER, then eager.

    Cached per (backend, device): this runs on every call of the op.
    """
    key = (backend, device.type, device.index)
    module = _resolved.get(key)
    if module is None:
        if backend == "auto":
            order = AUTO_ORDER.get(device.type, ())
            name = next((n for n in order if unavailable_reason(n, device) is None), "eager")
        else:
            reason = unavailable_reason(backend, device)
            if reason is not None:
                raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}")
            name = backend
        module = _resolved[key] = load(name)
    return module
