"""The backend contract (spem_kernels/backends/contract.py) is checked when a backend loads:
every backend keeps it, an incomplete one is refused with the names of what it lacks, and
the native library's ops and fakes take the contract's arguments."""
import sys
import types

import pytest
import torch

from spem_kernels import backends
from spem_kernels.backends import contract, native_backend, unavailable_reason


@pytest.mark.parametrize("name", backends.NAMES)
def test_every_backend_keeps_the_contract(name):
    try:
        module = backends.load(name)  # checks it
    except ImportError as e:  # this machine cannot load it: nothing to check
        pytest.skip(str(e))
    contract.check(module, contract.Backend if name == "eager" else contract.KernelBackend)


def incomplete_backend():
    """A backend module written against an older contract: forward's parameters renamed,
    output not a function, backward and every spem_bn entry point missing."""
    module = types.ModuleType("spem_kernels.backends.incomplete_backend")
    module.NAME = "incomplete"
    module.is_available = lambda device: None
    module.differentiable = None
    module.forward = lambda x, weight1, b1, w2, b2, p, residual, relu: None
    module.output = 3
    return module


def test_an_incomplete_backend_is_named_with_what_it_lacks():
    with pytest.raises(contract.BackendContractError) as raised:
        contract.check(incomplete_backend())
    message = str(raised.value)
    assert "spem_kernels.backends.incomplete_backend" in message
    assert "forward takes (x, weight1, b1, w2, b2, p, residual, relu), the contract (x, w1, " \
        in message
    assert "output is not callable (a int)" in message
    for missing in ("backward", "bn_differentiable", "bn_forward", "bn_output", "bn_backward"):
        assert f"; {missing}(" in message
    assert "is_available" not in message and "; differentiable" not in message  # None is allowed


def test_extra_parameters_need_defaults():
    module = types.ModuleType("extra")
    module.NAME = "extra"
    module.is_available = lambda device, strict: None
    with pytest.raises(contract.BackendContractError, match="is_available takes"):
        contract.check(module, contract.Backend)
    module.is_available = lambda device, strict=False: None
    contract.check(module, contract.Backend)


def test_load_refuses_an_incomplete_backend(monkeypatch):
    """load() raises the contract error, every time, rather than an ImportError that would
    make the backend look unavailable (a test matrix would skip it)."""
    monkeypatch.setattr(backends, "_modules", {})
    monkeypatch.setitem(sys.modules, "spem_kernels.backends.incomplete_backend",
                        incomplete_backend())
    for _ in range(2):
        with pytest.raises(contract.BackendContractError, match="bn_backward"):
            backends.load("incomplete")


def test_load_refuses_a_backend_under_another_name(monkeypatch):
    monkeypatch.setattr(backends, "_modules", {})
    complete = types.ModuleType("spem_kernels.backends.other_backend")
    for name in contract.entry_points():
        setattr(complete, name, getattr(native_backend, name))
    complete.NAME = "native"
    monkeypatch.setitem(sys.modules, "spem_kernels.backends.other_backend", complete)
    with pytest.raises(contract.BackendContractError, match="has NAME 'native', loaded as 'other'"):
        backends.load("other")


def test_the_outputs_table_covers_every_entry_point():
    kernel_entry_points = set(contract.entry_points()) - {"is_available"}
    assert set(contract.OUTPUTS) == kernel_entry_points
    assert set(native_backend.OPS) == kernel_entry_points


@pytest.mark.skipif(unavailable_reason("native", "cpu") is not None,
                    reason=str(unavailable_reason("native", "cpu")))
def test_native_ops_take_the_contract_arguments():
    """Each spem_native op's schema names the arguments of its entry point, in order: what
    its fake binds them by."""
    backends.load("native").is_available(torch.device("cpu"))  # builds and registers the ops
    for entry_point, op in native_backend.OPS.items():
        schema = getattr(torch.ops.spem_native, op).default._schema
        assert [a.name for a in schema.arguments] == \
            list(contract.entry_points()[entry_point].parameters), op


def test_fakes_bind_arguments_by_position_and_name():
    x = torch.empty(2, 3, 4, 5, device="meta")
    params = [torch.empty(3, device="meta") for _ in range(4)] + [torch.empty(2, device="meta")]
    fake = contract.fake("backward")
    by_position = fake(x, x, x, x, x, *params, True, False)
    by_name = fake(x, x, x, x, x, *params, relu=True, write_dres=False)
    for outputs in (by_position, by_name):
        assert [tuple(t.shape) for t in outputs] == [(2, 3, 4, 5), (0,), (3,), (3,), (3,), (3,),
                                                     (2,)]
