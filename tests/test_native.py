"""Native-backend specifics: opcheck of the raw torch.ops.spem_native ops, and the fallback
when the build fails. The op's results are tested once for every backend in test_op.py."""
import pytest
import torch

from spem_kernels import backends
from spem_kernels.backends import native_backend, native_build, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("native", "cpu") is not None,
                                reason=str(unavailable_reason("native", "cpu")))


def op_inputs(dtype, channels_last, residual):
    torch.manual_seed(0)
    N, C, H, W = 2, 5, 4, 6
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
    params = [torch.randn(C, dtype=dtype) for _ in range(4)] + [torch.randn(2, dtype=dtype)]
    res = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=fmt) if residual else None
    return x, params, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("residual,relu", [(False, False), (True, True)], ids=["plain", "tail"])
def test_opcheck(dtype, channels_last, residual, relu):
    x, params, res = op_inputs(dtype, channels_last, residual)
    torch.library.opcheck(torch.ops.spem_native.spem_forward.default,
                          (x, *params, res, relu))
    out, stats, idx = torch.ops.spem_native.spem_forward(x, *params, res, relu)
    grad = torch.randn_like(out)
    write_dres = residual and relu
    torch.library.opcheck(torch.ops.spem_native.spem_backward.default,
                          (grad, x, out, stats, idx, *params, relu, write_dres))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("residual,relu", [(False, False), (True, False), (True, True)],
                         ids=["plain", "residual", "tail"])
def test_opcheck_differentiable_op(channels_last, residual, relu):
    """spem_native.spem: the op with its autograd in C++ (the eager path's native call)."""
    x, params, res = op_inputs(torch.float64, channels_last, residual)
    leaves = [t.requires_grad_() for t in (x, *params)]
    torch.library.opcheck(torch.ops.spem_native.spem.default, (*leaves, res, relu))


def test_differentiable_op_without_autograd():
    """Under inference_mode the op runs its forward alone (no autograd kernel involved)."""
    x, params, res = op_inputs(torch.float32, False, True)
    expected = torch.ops.spem_native.spem_forward(x, *params, res, True)[0]
    with torch.inference_mode():
        assert torch.equal(torch.ops.spem_native.spem(x, *params, res, True), expected)


def test_outputs_follow_x_layout():
    x, params, res = op_inputs(torch.float32, True, True)
    out, stats, idx = torch.ops.spem_native.spem_forward(x, *params, res, True)
    assert out.stride() == x.stride()
    assert stats.dtype == torch.float32 and idx.dtype == torch.int32


def test_build_failure_falls_back(monkeypatch):
    def broken_compiler(with_cuda):
        raise RuntimeError("Error building extension 'spem_native_cpu':\n"
                           "spem_cpu.cpp:1:1: error: expected declaration")

    # the built extension of an install (pip install -e .) would be used before any compiler
    monkeypatch.setattr(native_build, "_prebuilt_record", lambda: (None, "none installed"))
    monkeypatch.setattr(native_build, "_load_library", broken_compiler)
    monkeypatch.setattr(native_backend, "_reasons", None)
    monkeypatch.setattr(backends, "_resolved", {})
    reason = unavailable_reason("native", "cpu")
    assert reason is not None and "expected declaration" in reason
    assert "native" not in backends.available_backends("cpu")
    assert backends.resolve("auto", torch.device("cpu")).NAME == "eager"
    with pytest.raises(RuntimeError, match="expected declaration"):
        backends.resolve("native", torch.device("cpu"))
