"""Backend registry: which implementations of the SPEM op exist and where they can run.

Every kernel backend is a module with the same entry points:

    is_available(device) -> str | None      None when it runs on `device`, else the reason
    forward(x, w1, b1, w2, b2, p, residual, relu) -> (out, stats, idx)
    backward(grad, x, out, stats, idx, w1, b1, w2, b2, p, relu, write_dres)
        -> (dx, dres, dparams)

Parameters arrive flattened to (C,); `stats` is (N, C, 2) [max, min] in the compute dtype,
`idx` is (N, C, 2) int32 [argmax, argmin] as row-major h*W + w; `dparams` is (C, 5) with
columns [dw1, db1, dw2, db2, dq0 - dq1] summed over n, where dq0 - dq1 = dZ w1 w2 (M - m)
per (n, c) is computed directly rather than as a difference of two large sums (p's
gradient needs only that difference; see ops.py); `dres` is the
masked gradient G when `write_dres`, else an empty tensor. The "eager" backend is the
reference itself and needs none of this: autograd differentiates it.
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


def backward_outputs(x, write_dres):
    """Uninitialised (dx, dres or an empty tensor, dparams) as every backend's backward
    returns them."""
    return (torch.empty_like(x), torch.empty_like(x) if write_dres else x.new_empty(0),
            x.new_empty((x.shape[1], 5), dtype=compute_dtype(x.dtype)))


def compiled_backends(device):
    """The fused backends that run compiled kernels on `device`, in the order "auto" tries
    them. Triton on CPU tensors exists only as its interpreter: a test tool, never timed."""
    device = torch.device(device)
    return [b for b in available_backends(device)
            if b != "eager" and (b != "triton" or device.type == "cuda")]


_modules = {}


def load(name):
    """The backend module `name`, or an ImportError that says why it cannot load."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}_backend")
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
    if name == "eager":
        return None
    try:
        mod = load(name)
    except ImportError as e:
        return str(e)
    return mod.is_available(device)


def available_backends(device="cpu"):
    """The backends among "triton", "native", "eager" that can run on `device`."""
    return [name for name in NAMES if unavailable_reason(name, device) is None]


_resolved = {}


def resolve(backend, device):
    """The concrete backend for a call: "auto" picks triton on CUDA, then native, then eager.

    Cached per (backend, device): this runs on every call of the op.
    """
    key = (backend, device.type, device.index)
    name = _resolved.get(key)
    if name is None:
        if backend == "auto":
            order = ("triton", "native") if device.type == "cuda" else ("native",)
            name = next((n for n in order if unavailable_reason(n, device) is None), "eager")
        else:
            reason = unavailable_reason(backend, device)
            if reason is not None:
                raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}")
            name = backend
        _resolved[key] = name
    return name
