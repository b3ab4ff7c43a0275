"""Native-backend specifics: opcheck of the raw torch.ops.spem_native ops, and the fallback
when the build fails. The op's results are tested once for every backend in test_op.py."""
import pytest
import torch

from spem_kernels import backends
from spem_kernels.backends import native_backend, native_build, unavailable_reason
from spem_kernels.timing import dispatched_ops

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_output_op(dtype, channels_last):
    """spem_native.spem_output: the forward's output alone (no stats, no positions)."""
    x, params, res = op_inputs(dtype, channels_last, True)
    torch.library.opcheck(torch.ops.spem_native.spem_output.default, (x, *params, res, True))


def planes_with_ties_and_nan(shape, dtype, channels_last):
    """Few distinct values (every plane's max and min are tied) and one NaN plane."""
    x = torch.randint(-3, 4, shape).to(dtype)
    x[1, 2, 0, -1] = float("nan")
    return x.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 37, 8, 8), (2, 5, 7, 9), (4, 70, 1, 1)], ids=str)
def test_output_op_is_the_forwards_output(dtype, channels_last, shape):
    """What a call without gradients runs (spem_output) is bitwise the output of the forward
    that a backward may follow, NaN planes and ties included; and spem takes that path when
    no gradient is wanted (no_grad, or no input that requires one)."""
    torch.manual_seed(0)
    x = planes_with_ties_and_nan(shape, dtype, channels_last)
    res = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last
                                                  if channels_last else torch.contiguous_format)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = ([torch.randn(shape[1], dtype=pdtype) for _ in range(4)]
              + [torch.randn(2, dtype=pdtype)])
    for residual, relu in [(None, False), (res, True)]:
        expected = torch.ops.spem_native.spem_forward(x, *params, residual, relu)[0]
        assert torch.isnan(expected[1, 2]).all()
        output = torch.ops.spem_native.spem_output(x, *params, residual, relu)
        assert output.stride() == expected.stride()
        assert torch.equal(output.nan_to_num(), expected.nan_to_num())
        assert torch.equal(output.isnan(), expected.isnan())
        leaves = [t.requires_grad_() for t in (x.clone(), *params)]
        with torch.no_grad():
            out, ops = dispatched_ops(lambda: torch.ops.spem_native.spem(*leaves, residual, relu))
        assert [op for op in ops if "spem_native" in op] == ["spem_native.spem_output.default"]
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())
        with_grad = torch.ops.spem_native.spem(*leaves, residual, relu)
        assert with_grad.requires_grad
        assert torch.equal(with_grad.detach().nan_to_num(), expected.nan_to_num())


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(17, 67, 8, 8), (5, 67, 16, 16)], ids=str)
def test_results_do_not_depend_on_the_thread_count(restore_threads, dtype, channels_last, shape):
    """Bitwise the same forward (with and without stats), backward and parameter gradients on
    1, 2 and 3 threads. 67 channels of small and larger planes: more than one parallel task,
    split where a group of 16 planes (NCHW) or a block of channels (channels_last,
    67 = 4 x 16 + 3) ends at no round number."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, res, grad = (torch.randn(shape).to(dtype).contiguous(memory_format=fmt) for _ in range(3))
    params = [torch.randn(67) for _ in range(4)] + [torch.randn(2)]
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out, stats, idx = torch.ops.spem_native.spem_forward(x, *params, res, True)
        output = torch.ops.spem_native.spem_output(x, *params, res, True)
        backward = torch.ops.spem_native.spem_backward(grad, x, out, stats, idx, *params, True,
                                                       True)
        results.append([out, stats, idx, output, *backward])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


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
