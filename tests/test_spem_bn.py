"""spem_bn (BatchNorm, then SPEM with the block tail, in one op) against its composition,
spem_reference(F.batch_norm(...)), in float64 on fresh random inputs, for every (backend,
device) in `case`: the output, every gradient (y, weight, bias, the SPEM parameters, the
residual) and the running statistics, in training and eval, with and without BatchNorm's
affine parameters and running statistics, on every layout (strided views passed as they are).
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from op_checks import (EPS, MOMENTUM, STATS_TOL, as64, check_against_composition, clone,
                       leaves, rel_err, run_fused)
from op_inputs import layout, make_bn_inputs
from spem_kernels import spem_bn, spem_bn_reference
from spem_kernels.backends import unavailable_reason
from spem_kernels.cases import STAGES, stage_shape
from spem_kernels.ops import spem_bn_backward, spem_bn_forward


def fused(backend):
    """spem_bn on `backend`, as op_checks takes a fused op."""
    return functools.partial(spem_bn, backend=backend)


STAGE_SHAPES = [stage_shape(stage, batch=2) for stage in STAGES]
# 1x1 planes at batch 8: BatchNorm's statistics over 8 values. (Over 3, as spem's matrix has
# them, the variance is below 1% of its expected value about once in a hundred draws, and
# normalising then amplifies float32 rounding past any tolerance that means something: the
# float32 composition is as far off.)
ODD_SHAPES = [(8, 5, 1, 1), (2, 6, 7, 7), (2, 3, 13, 17)]
LARGE_PLANE = (2, 2, 100, 100)  # more than one tile holds: the kernels loop over the plane
FULL_SHAPES = [stage_shape(stage) for stage in STAGES] if torch.cuda.is_available() else []
LAYOUTS = ["contiguous", "channels_last", "sliced", "mixed"]
TAILS = [(False, False), (True, False), (False, True), (True, True)]  # (residual, relu)
# 16-bit y: dy and the output are rounded once to the 16-bit format (half an ulp relative).
HALF_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("shape", STAGE_SHAPES + ODD_SHAPES + [LARGE_PLANE] + FULL_SHAPES,
                         ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_matches_composition(case, shape, kind, training):
    backend, device = case
    for residual, relu in TAILS:
        inputs = make_bn_inputs(shape, torch.float32, device, kind, residual)
        out = check_against_composition(inputs, training, relu, fused(backend), 1e-6, 1e-5)
        if kind == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["running", "batch-only"])
def test_batch_norm_options(case, affine, track):
    """BatchNorm without weight and bias (affine=False), and without running statistics
    (track_running_stats=False: batch statistics in eval too, nothing updated)."""
    backend, device = case
    inputs = make_bn_inputs((2, 6, 5, 7), torch.float32, device, affine=affine, track=track)
    for training in ([True, False] if track else [True]):
        check_against_composition(inputs, training, True, fused(backend), 1e-6, 1e-5)


@pytest.mark.parametrize("stage", ["in56", "in7"])
def test_imagenet_planes_match_composition(case, stage):
    """Larger planes than CIFAR's (56x56 loops in Triton), channels_last as in mixed precision:
    batch 2 on CPU, 16 on a GPU."""
    backend, device = case
    shape = stage_shape(stage, batch=16 if device == "cuda" else 2)
    inputs = make_bn_inputs(shape, torch.float32, device, "channels_last")
    check_against_composition(inputs, True, True, fused(backend), 1e-6, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", STAGE_SHAPES[::2] + [ODD_SHAPES[2]] + FULL_SHAPES, ids=str)
def test_half_precision_matches_composition(case, dtype, kind, shape):
    """16-bit y: BatchNorm and SPEM in float32 (the normalised values are not rounded to 16
    bits in between, as the composition's are), out and dy rounded once."""
    backend, device = case
    inputs = make_bn_inputs(shape, dtype, device, kind)
    check_against_composition(inputs, True, True, fused(backend), HALF_TOL[dtype], HALF_TOL[dtype])


def test_negative_weight_swaps_max_and_min(case):
    """With a negative BatchNorm weight, SPEM's max is at y's min and its min at y's max:
    the positions follow the normalised values, float64 to 1e-12."""
    backend, device = case
    inputs = make_bn_inputs((2, 4, 6, 5), torch.float64, device)
    inputs[3] = -inputs[3].abs() - 0.5
    check_against_composition(inputs, True, False, fused(backend), 1e-12, 1e-10)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "sliced"])
def test_ties_of_normalised_values_go_to_the_first_position(case, kind):
    """Ties that y has (few distinct values) and ties that normalising creates; either way
    max and min gradients go to the first row-major position of the tie, as in the
    composition. The second: eval with mean 0, var + eps = 1 and weight 1 exactly (eps
    2^-16), so x = y + bias rounded once; y's values 2^-40 apart, bias 2^20, whose ulp is
    2^-32: every plane's values round to one number."""
    backend, device = case
    shape = (2, 3, 4, 5)
    inputs = make_bn_inputs(shape, torch.float64, device, kind)
    inputs[0] = layout(torch.randint(-2, 3, shape, device=device).double(), kind)
    check_against_composition(inputs, True, False, fused(backend), 1e-12, 1e-10)

    def channels(value):
        return torch.full((3,), value, device=device, dtype=torch.float64)

    eps = 2.0**-16
    inputs[0] = layout(1.0 + torch.randint(0, 4, shape, device=device).double() * 2**-40, kind)
    inputs[1:5] = channels(0.0), channels(1.0 - eps), channels(1.0), channels(2.0**20)
    x = F.batch_norm(*inputs[:5], False, MOMENTUM, eps)
    assert (x == 2.0**20 + 1).all()  # y had distinct values, x has one
    check_against_composition(inputs, False, False, fused(backend), 1e-12, 1e-10, eps=eps)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_nan(case, kind):
    """A NaN in y makes its channel's batch statistics NaN (training): that channel's output
    is NaN in every sample, as in the composition; in eval only its plane's."""
    backend, device = case
    inputs = make_bn_inputs((2, 3, 5, 6), torch.float32, device, kind)
    y = inputs[0].clone()
    y[1, 2, 3, 4] = float("nan")
    inputs[0] = layout(y, kind)
    for training in (True, False):
        out = spem_bn(*inputs[:3], *inputs[3:10], inputs[10], training=training, relu=True,
                      backend=backend)
        ref = spem_bn_reference(*map(as64, inputs[:10]), as64(inputs[10]), training=training,
                                relu=True)
        assert torch.equal(out.isnan(), ref.isnan())
        assert rel_err(out[~out.isnan()], ref[~ref.isnan()]) <= 1e-6


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_without_backward_gives_the_same_output(case, training):
    """Under no_grad the op computes its output alone (no stats or positions kept), bitwise
    that of a forward that keeps them, and in training still updates the running
    statistics, as F.batch_norm does."""
    backend, device = case
    y, rm, rv, *rest = make_bn_inputs((3, 6, 7, 5), torch.float32, device, "channels_last")
    stats, no_grad_stats = [clone(rm), clone(rv)], [clone(rm), clone(rv)]
    saved = spem_bn(*leaves([y]), *stats, *leaves(rest[:7]), rest[7], training=training,
                    relu=True, backend=backend)
    with torch.no_grad():
        alone = spem_bn(y, *no_grad_stats, *rest, training=training, relu=True,
                        backend=backend)
    assert torch.equal(alone, saved.detach())
    for a, b in zip(no_grad_stats, stats):
        assert torch.equal(a, b)


def test_backward_is_deterministic(case):
    backend, device = case
    shape = (128, 64, 8, 8) if device == "cuda" else (16, 8, 4, 4)
    inputs = make_bn_inputs(shape, torch.float32, device)
    grad_out = torch.randn(shape, device=device)
    first = run_fused(fused(backend), inputs, grad_out, True, True)
    second = run_fused(fused(backend), inputs, grad_out, True, True)
    for a, b in zip([first[0], *first[1], *first[2]], [second[0], *second[1], *second[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(case, kind, training):
    backend, device = case
    y, rm, rv, *rest = make_bn_inputs((2, 3, 3, 3), torch.float64, device, kind)
    tensors = leaves([y, *rest])

    def fn(y, weight, bias, w1, b1, w2, b2, p, residual):
        # fresh running statistics each call: training updates them
        return spem_bn(y, clone(rm), clone(rv), weight, bias, w1, b1, w2, b2, p, residual,
                       training=training, relu=True, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-8, fast_mode=not training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(case, training):
    backend, device = case
    for dtype in (torch.float32, torch.float64):
        for affine in (True, False):
            inputs = make_bn_inputs((2, 5, 4, 3), dtype, device, "channels_last", affine=affine)
            inputs[0].requires_grad_()
            options = (training, MOMENTUM, EPS, True, backend)
            torch.library.opcheck(spem_bn_forward, (*inputs, *options))
            with torch.no_grad():
                out, stats, idx, mean, invstd, *_ = spem_bn_forward(*inputs, *options)
            y, _, _, weight, bias, *params, _ = inputs
            torch.library.opcheck(spem_bn_backward, (
                torch.randn_like(out), y.detach(), out, stats, idx, mean, invstd, weight, bias,
                *params, training, True, True, backend))


def test_running_statistics_after_several_steps(case):
    """Five training steps, then eval: the running statistics and the eval output are the
    composition's."""
    backend, device = case
    y, rm, rv, *rest = make_bn_inputs((4, 6, 5, 5), torch.float32, device)
    stats, ref_stats = [clone(rm), clone(rv)], [as64(rm), as64(rv)]
    for _ in range(5):
        y = torch.randn_like(y) * 2 + 1
        spem_bn(y, *stats, *rest, training=True, relu=True, backend=backend)
        spem_bn_reference(y.double(), *ref_stats, *map(as64, rest), training=True, relu=True)
    for s, r in zip(stats, ref_stats):
        assert rel_err(s, r) <= STATS_TOL
    out = spem_bn(y, *stats, *rest, training=False, relu=True, backend=backend)
    ref = spem_bn_reference(y.double(), *ref_stats, *map(as64, rest), training=False, relu=True)
    assert rel_err(out, ref) <= 1e-6


def test_torch_compile_fullgraph(case):
    """A block calling spem_bn compiles without a graph break, matches eager, and updates the
    running statistics as eager does."""
    backend, device = case
    import torch._dynamo

    torch._dynamo.reset()

    def block(y, rm, rv, weight, bias, w1, b1, w2, b2, p, residual):
        y = torch.nn.functional.conv2d(y, torch.ones(4, 4, 1, 1, device=y.device) / 4)
        return spem_bn(y, rm, rv, weight, bias, w1, b1, w2, b2, p, residual, relu=True,
                       backend=backend) * 2

    inputs = make_bn_inputs((2, 4, 5, 5), torch.float32, device)
    compiled = torch.compile(block, fullgraph=True)
    grad_out = torch.randn(2, 4, 5, 5, device=device)
    results = []
    for fn in (compiled, block):
        y, rm, rv, *rest = inputs
        stats = [clone(rm), clone(rv)]
        t = leaves([y, *rest])
        out = fn(t[0], *stats, *t[1:])
        out.backward(grad_out)
        results.append([out, *stats, *[leaf.grad for leaf in t]])
    for got, want in zip(*results):
        assert rel_err(got, want) <= 1e-5


def test_empty_batch(case):
    backend, device = case
    inputs = make_bn_inputs((0, 4, 3, 3), torch.float32, device)
    rm, rv = clone(inputs[1]), clone(inputs[2])
    out = spem_bn(inputs[0].requires_grad_(), rm, rv, *inputs[3:], relu=True, backend=backend)
    assert out.shape == (0, 4, 3, 3)
    assert torch.equal(rm, inputs[1]) and torch.equal(rv, inputs[2])


def test_triton_statistics_count_past_int32():
    """The Triton finalisation's count N H W (and the offset N C of the M2 plane) in int64:
    3 planes of 2**15 x 2**15 make 3 * 2**30 values, which int32 arithmetic wraps negative.
    Only the finalisation runs: y is an expanded view (its shape is all it reads) and the
    planes' means and M2 are given, so nothing of that size is allocated or walked."""
    if unavailable_reason("triton", torch.device("cpu" if not torch.cuda.is_available()
                                                  else "cuda")) is not None:
        pytest.skip("Triton does not run here")
    from spem_kernels.backends import triton_backend as tb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, C, HW = 3, 2, 2**30
    y = torch.empty(1, device=device).expand(N, C, 2**15, 2**15)
    plane_mean = torch.tensor([[0.5, -1.0], [1.5, -1.0], [1.0, -1.0]], device=device)
    plane_var = torch.tensor([[2.0, 0.5], [1.0, 0.5], [3.0, 0.5]], device=device)
    part = torch.stack([plane_mean, plane_var * HW])  # (2, N, C): means, M2
    running_mean, running_var = torch.zeros(C, device=device), torch.ones(C, device=device)
    mean, invstd = torch.empty(C, device=device), torch.empty(C, device=device)
    launch = tb.bn_finalize_launch(y, part, running_mean, running_var, mean, invstd, True,
                                   MOMENTUM, EPS)
    tb._bn_finalize_kernel(*launch, y.device)
    want_mean = plane_mean.double().mean(0)
    want_var = plane_var.double().mean(0) + plane_mean.double().var(0, unbiased=False)
    assert rel_err(mean, want_mean) <= 1e-6
    assert rel_err(invstd, (want_var + EPS).rsqrt()) <= 1e-6
    unbiased = want_var * (N * HW) / (N * HW - 1)
    assert rel_err(running_var, (1 - MOMENTUM) + MOMENTUM * unbiased) <= 1e-6
    assert rel_err(running_mean, MOMENTUM * want_mean) <= 1e-6
