"""The fused SPEM op against the eager reference, for every (backend, device) in `case`.

The reference runs in float64 on the same (upcast) values; inputs are fresh random
numbers every run. On CPU the Triton kernels run in Triton's interpreter, so shapes stay
small there; on a GPU the stage shapes also run at full batch.
"""
import functools
import os
import subprocess
import sys

import pytest
import torch

from op_checks import (PARAM_TOL, check_against_reference, grad_off_relu_boundary, leaves,
                       param_scales, rel_err, run, scaled_err)
from op_inputs import layout, make_inputs
from spem_kernels import spem, spem_reference
from spem_kernels.cases import IMAGENET_STAGES, STAGES, stage_shape
from spem_kernels.ops import spem_backward, spem_forward

def fused(backend):
    """spem on `backend`, as op_checks takes a fused op."""
    return functools.partial(spem, backend=backend)


STAGE_SHAPES = [stage_shape(stage, batch=2) for stage in STAGES]
ODD_SHAPES = [(3, 5, 1, 1), (2, 6, 7, 7), (2, 3, 13, 17)]
LARGE_PLANE = (2, 2, 100, 100)  # 10000 positions: more than one tile holds, so it loops
# batch 128 on a GPU
FULL_SHAPES = [stage_shape(stage) for stage in STAGES] if torch.cuda.is_available() else []
LAYOUTS = ["contiguous", "channels_last", "sliced", "mixed"]  # op_inputs.make_inputs' kinds
TAILS = [(False, False), (True, False), (False, True), (True, True)]  # (residual, relu)


@pytest.mark.parametrize("shape", STAGE_SHAPES + ODD_SHAPES + [LARGE_PLANE] + FULL_SHAPES,
                         ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_float32_matches_reference(case, shape, kind):
    backend, device = case
    for residual, relu in TAILS:
        inputs = make_inputs(shape, torch.float32, device, kind, residual)
        out = check_against_reference(inputs, relu, fused(backend), out_tol=1e-6, grad_tol=1e-5,
                                      param_tol=PARAM_TOL)
        if kind == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
        if kind in ("sliced", "mixed"):  # the kernels got the view itself (run keeps strides)
            assert not inputs[0].is_contiguous()


@pytest.mark.parametrize("stage", IMAGENET_STAGES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_imagenet_planes_match_reference(case, stage, kind):
    """The planes of an ImageNet ResNet-50 (112x112 to 7x7; larger than one Triton tile up to
    28x28): batch 1 on CPU, where Triton runs in its interpreter, batch 64 on a GPU."""
    backend, device = case
    inputs = make_inputs(stage_shape(stage, batch=64 if device == "cuda" else 1), torch.float32,
                         device, kind)
    check_against_reference(inputs, True, fused(backend), out_tol=1e-6, grad_tol=1e-5,
                            param_tol=PARAM_TOL)


# 16-bit: out and dx are computed in float32 and rounded once to the 16-bit format, so their
# error is bounded by half an ulp (2**-11 for float16, 2**-8 for bfloat16) relative; the
# parameter gradients are float32 sums of exactly representable 16-bit products, so they stay
# at float32 accuracy (PARAM_TOL).
HALF_TOL = {torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", STAGE_SHAPES[::2] + [ODD_SHAPES[2]] + FULL_SHAPES, ids=str)
def test_half_precision_matches_reference(case, dtype, kind, shape):
    backend, device = case
    out_tol, dx_tol = HALF_TOL[dtype]
    inputs = make_inputs(shape, dtype, device, kind)
    grad_out = grad_off_relu_boundary(torch.randn(shape, device=device).to(dtype), inputs, True)
    out, grads = run(spem, inputs, True, grad_out, backend=backend)
    ref, ref_grads = run(spem_reference, [t.double() for t in inputs], True, grad_out.double())
    assert out.dtype == dtype
    assert rel_err(out, ref) <= out_tol
    assert rel_err(grads[0], ref_grads[0]) <= dx_tol
    assert rel_err(grads[6], ref_grads[6]) <= dx_tol
    for g, rg, scale in zip(grads[1:6], ref_grads[1:6],
                            param_scales(inputs, grad_out, True)):
        assert g.dtype == torch.float32
        assert scaled_err(g, rg, scale) <= PARAM_TOL


# A stride of 2**30 + 64 elements puts a view's third channel (or row) 2**31 + 128 elements
# into its sample: offsets int32 arithmetic would wrap. The buffer behind the view is never
# touched beyond the view's own elements, so on CPU it costs a few pages, not 4 GiB.
BIG_STRIDE = 2**30 + 64


@pytest.mark.parametrize("spread", ["channels", "rows"])
def test_offsets_past_int32(case, spread):
    backend, device = case
    N, C, H, W = shape = (1, 3, 3, 4)
    if spread == "channels":
        strides = (C * BIG_STRIDE, BIG_STRIDE, W, 1)
    else:  # channels side by side within a row, rows BIG_STRIDE apart: not a flat plane
        strides = ((H - 1) * BIG_STRIDE + C * W, W, BIG_STRIDE, 1)
    last = sum((size - 1) * stride for size, stride in zip(shape, strides))
    assert last >= 2**31
    x = torch.empty(last + 1, dtype=torch.float16, device=device).as_strided(shape, strides)
    inputs = make_inputs(shape, torch.float16, device)
    x.copy_(inputs[0])
    inputs[0] = x
    check_against_reference(inputs, True, fused(backend), out_tol=1e-3, grad_tol=1e-3,
                            param_tol=PARAM_TOL)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "sliced"])
def test_ties_go_to_first_position(case, kind):
    """Max and min gradients go to the first row-major position of a tie, on every layout."""
    backend, device = case
    shape = (2, 4, 6, 5)
    inputs = make_inputs(shape, torch.float64, device, kind)
    # Few distinct values: every plane's max and min are tied several times.
    inputs[0] = layout(torch.randint(-2, 3, shape, device=device).double(), kind)
    check_against_reference(inputs, False, fused(backend), out_tol=1e-12, grad_tol=1e-12)
    # A constant plane: max and min are both at position (0, 0).
    x = layout(torch.full(shape, 0.7, dtype=torch.float64, device=device), kind)
    w1, b1, w2, b2, p = [t.detach().requires_grad_() for t in inputs[1:6]]
    x.requires_grad_()
    out = spem(x, w1, b1, w2, b2, p, backend=backend)
    g = torch.rand_like(out)
    out.backward(g)
    spike = (x.grad - g * (out / x).detach()).reshape(2, 4, -1)  # dx minus its G * gate part
    assert torch.all(spike[:, :, 1:].abs() < 1e-12)
    assert torch.all(spike[:, :, 0].abs() > 0)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_nan_plane_is_nan(case, kind):
    """NaN anywhere in a plane makes that plane's output NaN; other planes are untouched."""
    backend, device = case
    shape = (2, 3, 5, 6)
    inputs = make_inputs(shape, torch.float32, device, kind)
    x = inputs[0].clone()
    x[1, 2, 3, 4] = float("nan")
    inputs[0] = layout(x, kind)
    for relu in (False, True):
        out = spem(*inputs[:6], inputs[6], relu=relu, backend=backend)
        ref = spem_reference(*[t.double() for t in inputs[:7]], relu=relu)
        assert torch.isnan(out[1, 2]).all()
        assert torch.isnan(ref[1, 2]).all()
        keep = torch.ones(shape, dtype=torch.bool, device=device)
        keep[1, 2] = False
        assert not torch.isnan(out[keep]).any()
        assert rel_err(out[keep], ref[keep]) <= 1e-6


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_relu_gradient_passes_where_the_output_is_nan(case, kind):
    """The ReLU's mask as torch's ReLU backward takes it (SPEM.md, Backward): the gradient is
    0 where out <= 0 and passes elsewhere, NaN outputs included: at a NaN of the residual
    (the rest of its plane finite, and S takes the term) and over a NaN plane."""
    backend, device = case
    shape = (2, 3, 5, 6)
    inputs = make_inputs(shape, torch.float32, device, kind)
    x, res = inputs[0].clone(), inputs[6].clone()
    x[1, 2, 4, 0] = float("nan")
    res[0, 1, 2, 3] = float("nan")
    inputs[0], inputs[6] = layout(x, kind), layout(res, kind)
    grad_out = grad_off_relu_boundary(torch.randn(shape, device=device), inputs, True)
    out, grads = run(spem, inputs, True, grad_out, backend=backend)
    ref, ref_grads = run(spem_reference, [t.double() for t in inputs], True, grad_out.double())
    nan = ref.isnan()
    assert nan[0, 1, 2, 3] and nan[1, 2].all() and nan.sum() == 1 + 5 * 6
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(ref_grads[6][nan], grad_out.double()[nan])  # torch's ReLU passes it
    assert torch.equal(grads[6][nan], grad_out[nan])
    for g, rg in zip(grads, ref_grads):  # x, w1, b1, w2, b2, p, residual
        assert torch.equal(g.isnan(), rg.isnan())
        assert rel_err(g[~g.isnan()], rg[~rg.isnan()]) <= 1e-5
    assert not grads[0][0, 1].isnan().any()  # the residual's NaN stays out of dx


def test_half_precision_relu_mask_reads_the_stored_output(case):
    """16-bit outputs: the mask is read off the stored, rounded output (SPEM.md). A plane of
    float16's smallest subnormal, gated by ~0.03, gives outputs positive in float32 that round
    to 0: the fused op passes no gradient there (the eager reference, masking on float32,
    does); the other planes match the reference."""
    backend, device = case
    shape = (2, 3, 4, 5)
    x = torch.rand(shape, device=device).add(0.5).half()
    x[1, 2] = 2.0**-24
    C = shape[1]
    params = [torch.zeros(C, device=device), torch.full((C,), -1.0, device=device),
              torch.zeros(C, device=device), torch.full((C,), -1.0, device=device),
              torch.full((2,), 0.5, device=device)]  # the initialisation: gate 0.032
    inputs = [x, *params, None]
    grad_out = torch.randn(shape, device=device).half()
    out, grads = run(spem, inputs, True, grad_out, backend=backend)
    ref, ref_grads = run(spem_reference, [t.double() if t is not None else None
                                          for t in inputs], True, grad_out.double())
    assert torch.all(out[1, 2] == 0) and torch.all(ref[1, 2] > 0)
    assert torch.all(grads[0][1, 2] == 0) and torch.all(ref_grads[0][1, 2] != 0)
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    keep[1, 2] = False
    assert rel_err(out[keep], ref[keep]) <= 1e-3
    assert rel_err(grads[0][keep], ref_grads[0][keep]) <= 1e-3


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "sliced"])
def test_forward_without_backward_gives_the_same_output(case, kind):
    """Under no_grad (or with nothing that wants a gradient) the op computes its output
    alone, without the stats and positions a backward reads: bitwise the output of a
    forward that saves them."""
    backend, device = case
    inputs = make_inputs((2, 6, 7, 5), torch.float32, device, kind)
    saved = spem(*leaves(inputs[:6]), inputs[6], relu=True, backend=backend)
    with torch.no_grad():
        alone = spem(*inputs[:6], inputs[6], relu=True, backend=backend)
    assert torch.equal(alone, saved.detach()) and alone.stride() == saved.stride()
    assert torch.equal(spem(*inputs[:6], inputs[6], relu=True, backend=backend), alone)


def test_backward_is_deterministic(case):
    """No float atomics: two backward runs give bitwise equal gradients."""
    backend, device = case
    shape = (128, 64, 8, 8) if device == "cuda" else (16, 8, 4, 4)
    inputs = make_inputs(shape, torch.float32, device)
    grad_out = torch.randn(shape, device=device)
    _, first = run(spem, inputs, True, grad_out, backend=backend)
    _, second = run(spem, inputs, True, grad_out, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_gradcheck_float64(case, kind):
    backend, device = case
    for residual, relu in TAILS:
        inputs = make_inputs((2, 2, 3, 3), torch.float64, device, kind, residual)
        leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        # The full Jacobian for the whole block tail; random projections (fast mode) for the
        # other tails, to keep the interpreter's launch count down.
        assert torch.autograd.gradcheck(
            lambda *a: spem(*a[:6], a[6], relu=relu, backend=backend), leaves, eps=1e-6,
            atol=1e-8, fast_mode=not (residual and relu))


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_opcheck(case, kind):
    backend, device = case
    for residual, relu in TAILS:
        for dtype in (torch.float32, torch.float64):
            inputs = make_inputs((2, 5, 4, 3), dtype, device, kind, residual)
            x = inputs[0].requires_grad_()
            torch.library.opcheck(spem_forward, (*inputs, relu, backend))
            with torch.no_grad():  # the backward op itself is not differentiable
                out, stats, idx = spem_forward(*inputs, relu, backend)
            grad = torch.randn_like(out)
            flat = [t.reshape(-1) for t in inputs[1:6]]
            torch.library.opcheck(spem_backward, (grad, x.detach(), out, stats, idx, *flat, relu,
                                                  residual and relu, backend))


def test_torch_compile_fullgraph(case):
    """A model calling the op compiles without a graph break and matches eager."""
    backend, device = case
    import torch._dynamo

    torch._dynamo.reset()

    def block(x, w1, b1, w2, b2, p, residual):
        y = torch.nn.functional.conv2d(x, torch.ones(4, 4, 1, 1, device=x.device) / 4)
        return spem(y, w1, b1, w2, b2, p, residual, relu=True, backend=backend) * 2

    inputs = make_inputs((2, 4, 5, 5), torch.float32, device)
    grad_out = torch.randn(2, 4, 5, 5, device=device)
    compiled = torch.compile(block, fullgraph=True)
    out, grads = run(lambda *a, relu: compiled(*a), inputs, False, grad_out)
    ref, ref_grads = run(lambda *a, relu: block(*a), inputs, False, grad_out)
    assert rel_err(out, ref) <= 1e-6
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-5


def test_torch_compile_traces_the_first_call(case):
    """The op's first call in a process may come inside torch.compile (a model compiled
    right after it is built): choosing the backend then builds or loads its library, which
    tracing cannot follow, and must not break the graph."""
    backend, device = case
    code = f"""
import torch
from spem_kernels import spem
x = torch.randn(2, 4, 5, 5, device="{device}")
params = [torch.randn(4, device="{device}") for _ in range(4)] + [torch.randn(2, device="{device}")]
block = lambda x: spem(x, *params, backend="{backend}") * 2
compiled = torch.compile(block, fullgraph=True, backend="eager")  # Dynamo alone: no codegen
assert torch.equal(compiled(x), block(x))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]


def test_empty_batch(case):
    backend, device = case
    inputs = make_inputs((0, 4, 3, 3), torch.float32, device)
    out, grads = run(spem, inputs, True, torch.empty(0, 4, 3, 3, device=device), backend=backend)
    assert out.shape == (0, 4, 3, 3)
    for g in grads[1:6]:
        assert torch.all(g == 0)
