"""Backend registry: which implementations of the SPEM op exist, where they can run, and
which one runs a call (`resolve`, which returns the backend module itself).

Kernel backends (triton_backend, native_backend) keep the contract of contract.py; the
"eager" backend is the reference module, which autograd differentiates. ops.py is this
package's one caller; the demo, benchmarks and tests ask it what runs where.
"""
import importlib

import torch

from . import contract

NAMES = ("triton", "native", "eager")


def compiled_backends(device):
    """The fused backends that run compiled kernels on `device`, in the order "auto" tries
    them. Triton on CPU tensors exists only as its interpreter: a test tool, never timed."""
    device = torch.device(device)
    return [b for b in AUTO_ORDER.get(device.type, ()) if unavailable_reason(b, device) is None]


_modules = {}


def load(name):
    """The backend module `name` (for "eager", the reference module), checked against the
    contract (contract.check: a BackendContractError names what it lacks), or an ImportError
    that says why it cannot load."""
    if name not in _modules:
        module = "..reference" if name == "eager" else f".{name}_backend"
        try:
            _modules[name] = importlib.import_module(module, __name__)
        except Exception as e:  # a missing compiler or package must not break `import spem_kernels`
            _modules[name] = e
        else:
            _modules[name] = _checked(_modules[name], name)
    mod = _modules[name]
    if isinstance(mod, contract.BackendContractError):
        raise mod  # a defect of the backend, not of this machine: never a reason to skip it
    if isinstance(mod, Exception):
        raise ImportError(f"backend {name!r} failed to load: {type(mod).__name__}: {mod}") from mod
    return mod


def _checked(module, name):
    """`module`, or the BackendContractError that says what it lacks of the contract."""
    try:
        contract.check(module, contract.Backend if name == "eager" else contract.KernelBackend)
        if module.NAME != name:
            raise contract.BackendContractError(
                f"backend module {module.__name__} has NAME {module.NAME!r}, loaded as {name!r}")
    except contract.BackendContractError as e:
        return e
    return module


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
