"""The host cost of one fused call stays at its floor.

On a GPU at ResNet-164 sizes the host, not the GPU, sets the pace: every operation a call
dispatches costs microseconds of Python and dispatcher time, and one made on the host (a
`new_tensor`, a CPU scalar) also breaks CUDA graph capture. A TorchDispatchMode sees every
operation that reaches the dispatcher; these tests count what one forward + backward of
the block tail dispatches and fail above the budget.
"""
import pytest
import torch

from op_inputs import make_bn_inputs, make_inputs
from spem_kernels import spem, spem_bn
from spem_kernels.backends import triton_backend, unavailable_reason
from spem_kernels.cases import block_tail_inputs
from spem_kernels.timing import dispatched_ops

# What autograd itself dispatches around any op that saves tensors (plain relu(x + r)
# dispatches these two too): a detach when saving, one when the backward unpacks.
AUTOGRAD_OPS = {"aten.detach.default"}
BUDGET = 8  # operations per fused forward + backward (before the host-cost work: 38)
ALLOCATIONS = {"aten.empty_like.default", "aten.new_empty.default", "aten.empty.memory_format"}


def forward_backward_ops(backend):
    """(forward ops, backward ops) of one block-tail call at a ResNet-164 stage-3 plane."""
    inputs = block_tail_inputs((2, 64, 8, 8), requires_grad=True)
    x, *params, residual = inputs.args()
    leaves, grad_out = inputs.leaves(), inputs.grad_out
    spem(x, *params, residual, relu=True, backend=backend)  # first call: resolves the backend
    out, fwd = dispatched_ops(lambda: spem(x, *params, residual, relu=True, backend=backend))
    grads, bwd = dispatched_ops(lambda: torch.autograd.grad(out, leaves, grad_out))
    assert len(grads) == len(leaves) and all(g is not None for g in grads)
    return fwd, bwd


@pytest.mark.skipif(unavailable_reason("native", "cpu") is not None,
                    reason=str(unavailable_reason("native", "cpu")))
def test_native_call_is_one_operation_each_way():
    """The native path ("auto" on CPU and CUDA): the forward kernel, the backward kernel
    (which also forms every parameter gradient in its final shape), and autograd's own."""
    fwd, bwd = forward_backward_ops("native")
    assert len(fwd) + len(bwd) <= BUDGET, (fwd, bwd)
    assert [op for op in fwd if op not in AUTOGRAD_OPS] == ["spem_native.spem_forward.default"]
    assert [op for op in bwd if op not in AUTOGRAD_OPS] == ["spem_native.spem_backward.default"]


@pytest.mark.skipif(unavailable_reason("native", "cpu") is not None,
                    reason=str(unavailable_reason("native", "cpu")))
def test_native_spem_bn_is_one_operation_each_way():
    """spem_bn (BatchNorm inside the op) costs the host what spem does: one kernel op each
    way; a plain BatchNorm + add + ReLU tail dispatches five forward and two backward."""
    y, rm, rv, weight, bias, *params, residual = make_bn_inputs((2, 64, 8, 8), torch.float32,
                                                                "cpu")
    leaves = [t.requires_grad_() for t in (y, weight, bias, *params, residual)]

    def call():
        return spem_bn(y, rm, rv, weight, bias, *params, residual, relu=True, backend="native")

    call()  # first call: resolves the backend
    grad_out = torch.randn_like(y)
    out, fwd = dispatched_ops(call)
    grads, bwd = dispatched_ops(lambda: torch.autograd.grad(out, leaves, grad_out))
    assert len(grads) == len(leaves) and all(g is not None for g in grads)
    assert [op for op in fwd if op not in AUTOGRAD_OPS] == ["spem_native.spem_bn_forward.default"]
    assert [op for op in bwd if op not in AUTOGRAD_OPS] == ["spem_native.spem_bn_backward.default"]


# Triton's Python launch dispatches nothing, but the backend allocates its outputs from Python:
# the forward's out, stats and positions; the backward's dx, dresidual, the partials and the
# five parameter gradients (each in its parameter's shape and dtype).
TRITON_ALLOCATIONS = 3 + 8


@pytest.mark.skipif(unavailable_reason("triton", "cpu") is not None,
                    reason=str(unavailable_reason("triton", "cpu")))
def test_triton_call_allocates_and_launches_only(monkeypatch):
    """The Triton path: allocations only (no compute op, no host-made tensor), one kernel
    launch forward and two backward. The launches are recorded rather than run: on CPU the
    interpreter would run them, dispatching many operations a GPU launch does not."""
    launches = []
    monkeypatch.setattr(triton_backend._Launcher, "__call__",
                        lambda self, grid, args, meta, device: launches.append(self))
    fwd, bwd = forward_backward_ops("triton")
    assert launches == [triton_backend._fwd_kernel, triton_backend._fwd_kernel,
                        triton_backend._bwd_kernel, triton_backend._grads_kernel]
    allocations = [op for op in fwd + bwd if op not in AUTOGRAD_OPS]
    assert set(allocations) <= ALLOCATIONS, allocations
    assert len(allocations) <= TRITON_ALLOCATIONS, allocations


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_backend._DIRECT_LAUNCH,
                    reason="direct launches run on CUDA with Triton 3.6")
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "sliced"])
def test_triton_direct_launch_runs_the_kernel_triton_would(kind):
    """The second call of a specialisation skips Triton's launcher: it must launch the very
    kernel Triton itself picks for those arguments (its cache key must not be coarser than
    Triton's specialisation), and compute what the first call computed."""
    inputs = make_inputs((4, 64, 16, 16), torch.float32, "cuda", kind)
    grad_out = torch.randn(4, 64, 16, 16, device="cuda")
    results = []
    for _ in range(2):  # through Triton (compiles, fills the cache), then direct
        # the inputs themselves, views included (clone() would make a view dense)
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = spem(*leaves[:6], leaves[6], relu=True, backend="triton")
        results.append([out, *torch.autograd.grad(out, leaves, grad_out)])
    for first, second in zip(*results):
        assert torch.equal(first, second)
    x, w1, b1, w2, b2, p, residual = inputs
    out, stats, idx = triton_backend.forward_outputs(x)
    grid, args, meta = triton_backend.fwd_launch(x, residual, out, w1, b1, w2, b2, p, stats,
                                                 idx, True)
    picked = triton_backend._spem_fwd_kernel[grid](*args, **meta)
    assert any(picked is k for k in triton_backend._fwd_kernel.compiled.values())
