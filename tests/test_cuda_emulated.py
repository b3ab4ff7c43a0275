"""The CUDA kernels (csrc/spem_cuda.cu), executed on the CPU through the same binding a GPU
call takes (tests/cuda_emulation), against the float64 reference with the GPU tests'
tolerances: the GPU tests' matrix sized for the CPU, both ops, every layout and vector path,
launches at the extremes of a grid, and a last test that every kernel instantiation ran.

`pytest -m cuda_emulated` runs these alone. The emulation's schedule (block order and thread
interleaving) is drawn from SPEM_emulation.SEED when set, else at random and printed in the
report header (conftest.py): that seed replays a failing run.
"""
import pytest
import torch

import cuda_emulation as emulation
from op_checks import (PARAM_TOL, check_against_composition, check_against_reference, clone,
                       leaves, run, run_fused)
from op_inputs import layout, make_bn_inputs, make_inputs

pytestmark = pytest.mark.cuda_emulated

TAILS = [(False, False), (True, False), (False, True), (True, True)]  # (residual, relu)
LAYOUTS = ["contiguous", "channels_last", "sliced", "mixed"]
# Planes of 1x1, 7x7, 8x8, 32x32 and 100x100 and C = 1, 5, 64, 256: the vector paths
# (H*W or C a multiple of the 16-byte width) and the scalar ones, the planes kernels and
# (channels_last with C > 1) the channels kernels, groups of 32 to 256 threads per plane.
SHAPES = [(3, 5, 1, 1), (2, 1, 7, 7), (2, 64, 8, 8), (2, 256, 8, 8), (2, 5, 32, 32),
          (1, 2, 100, 100), (2, 3, 13, 17)]
HALF_SHAPES = [(2, 64, 8, 8), (2, 5, 7, 7), (2, 3, 13, 17)]
HALF_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
spem = emulation.spem
spem_bn = emulation.spem_bn


@pytest.fixture(scope="module", autouse=True)
def schedule():
    emulation.set_schedule(emulation.SEED, workers=3)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_spem_float32_matches_reference(shape, kind):
    for residual, relu in TAILS:
        inputs = make_inputs(shape, torch.float32, "cpu", kind, residual)
        out = check_against_reference(inputs, relu, spem, out_tol=1e-6, grad_tol=1e-5,
                                      param_tol=PARAM_TOL)
        if kind == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_spem_bn_float32_matches_composition(shape, kind, training):
    if training and shape[2] * shape[3] == 1:
        shape = (8, *shape[1:])  # BatchNorm over 3 values is ill-conditioned (test_spem_bn)
    for residual, relu in TAILS:
        inputs = make_bn_inputs(shape, torch.float32, "cpu", kind, residual)
        check_against_composition(inputs, training, relu, spem_bn, 1e-6, 1e-5)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["running", "batch-only"])
def test_spem_bn_options(affine, track):
    inputs = make_bn_inputs((2, 6, 5, 7), torch.float32, "cpu", affine=affine, track=track)
    for training in ([True, False] if track else [True]):
        check_against_composition(inputs, training, True, spem_bn, 1e-6, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=str)
def test_half_precision(dtype, kind, shape):
    """16-bit x: out and dx rounded once from float32 (half an ulp); parameter gradients at
    float32 accuracy; both ops."""
    tol = HALF_TOL[dtype]
    check_against_reference(make_inputs(shape, dtype, "cpu", kind), True, spem, tol, tol,
                            PARAM_TOL)
    check_against_composition(make_bn_inputs(shape, dtype, "cpu", kind), True, True, spem_bn,
                              tol, tol)


@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (2, 3, 3, 3)], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_float64(shape, kind):
    """The double instantiations (vector width 2 where H*W or C is even), to float64's
    accuracy, and gradcheck of both ops."""
    for residual, relu in TAILS:
        inputs = make_inputs(shape, torch.float64, "cpu", kind, residual)
        check_against_reference(inputs, relu, spem, 1e-12, 1e-12)
        bn_inputs = make_bn_inputs(shape, torch.float64, "cpu", kind, residual)
        for training in (True, False):
            check_against_composition(bn_inputs, training, relu, spem_bn, 1e-12, 1e-10)
    tensors = leaves(make_inputs(shape, torch.float64, "cpu", kind))
    assert torch.autograd.gradcheck(lambda *a: spem(*a[:6], a[6], relu=True), tensors,
                                    eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "sliced"])
def test_output_alone_is_the_saving_forward(kind):
    """Without a gradient to compute the C++ autograd runs the output-only kernels
    (spem_output, spem_bn_output): bitwise the output of the forward that saves stats, and
    spem_bn's running statistics updated the same."""
    inputs = make_inputs((2, 6, 7, 5), torch.float32, "cpu", kind)
    saved = spem(*leaves(inputs[:6]), inputs[6], relu=True)
    with torch.no_grad():
        alone = spem(*inputs[:6], inputs[6], relu=True)
    assert torch.equal(alone, saved.detach()) and alone.stride() == saved.stride()
    y, rm, rv, *rest = make_bn_inputs((3, 6, 7, 5), torch.float32, "cpu", kind)
    for training in (True, False):
        stats, no_grad_stats = [clone(rm), clone(rv)], [clone(rm), clone(rv)]
        saved = spem_bn(*leaves([y]), *stats, *leaves(rest[:7]), rest[7], training=training,
                        relu=True)
        with torch.no_grad():
            alone = spem_bn(y, *no_grad_stats, *rest, training=training, relu=True)
        assert torch.equal(alone, saved.detach())
        for a, b in zip(no_grad_stats, stats):
            assert torch.equal(a, b)


def test_block_order_does_not_change_a_bit():
    """Two runs under different block orders and thread interleavings: bitwise equal
    outputs, gradients and running statistics (no float atomics, fixed reduction orders)."""
    shape = (4, 40, 6, 6)
    inputs = make_inputs(shape, torch.float32, "cpu")
    bn_inputs = make_bn_inputs(shape, torch.float32, "cpu", "channels_last")
    grad_out = torch.randn(shape)
    results = []
    for seed in (emulation.SEED + 1, emulation.SEED + 2):
        emulation.set_schedule(seed, workers=3)
        out, grads = run(spem, inputs, True, grad_out)
        bn_out, bn_grads, stats = run_fused(spem_bn, bn_inputs, grad_out, True, True)
        results.append([out, *grads, bn_out, *[g for g in bn_grads if g is not None], *stats])
    emulation.set_schedule(emulation.SEED, workers=3)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_ties_and_nan():
    """Ties go to the first row-major position; a NaN makes its plane's output NaN, and
    (as torch's ReLU backward has it) its gradient passes to the residual there."""
    shape = (2, 4, 6, 5)
    for kind in ("contiguous", "channels_last"):
        inputs = make_inputs(shape, torch.float64, "cpu", kind)
        inputs[0] = layout(torch.randint(-2, 3, shape).double(), kind)
        check_against_reference(inputs, False, spem, 1e-12, 1e-12)
        x = inputs[0].clone()
        x[1, 2, 3, 4] = float("nan")
        inputs[0] = layout(x, kind)
        tensors = leaves(inputs)
        out = spem(*tensors[:6], tensors[6], relu=True)
        nan_plane = torch.zeros(shape, dtype=torch.bool)
        nan_plane[1, 2] = True
        assert out[nan_plane].isnan().all() and not out[~nan_plane].isnan().any()
        grad_out = torch.randn(shape, dtype=torch.float64)
        out.backward(grad_out)
        assert torch.equal(tensors[6].grad[1, 2], grad_out[1, 2])


def test_grid_past_65535_blocks():
    """65536 blocks, one per sample of two channels in channels_last (the channels kernels,
    scalar, the cheapest block to emulate): a grid past 65535 blocks (the limit of y and z,
    not of x), forward and backward, the last block's channels included."""
    inputs = make_inputs((65536, 2, 1, 1), torch.float32, "cpu", "channels_last")
    check_against_reference(inputs, True, spem, 1e-6, 1e-5, PARAM_TOL)
    blocks = {r["instance"]: r["largest_grid"] for r in emulation.launch_log()}
    assert blocks["forward_channels<float, float, 1, 32>"] == 65536
    assert blocks["backward_channels<float, float, 1, 32>"] == 65536


@pytest.mark.parametrize("spread", ["planes", "channels"])
def test_a_grid_too_large_is_refused_naming_the_shape(spread):
    """An input whose launch would need more than 2^31 - 1 blocks raises before anything is
    allocated or launched, naming its shape (a view of one stored element: nothing is big)."""
    if spread == "planes":  # 8 planes a block
        shape, strides = (2**34 + 8, 1, 1, 1), (0, 0, 0, 0)
    else:  # channels innermost: a block per sample
        shape, strides = (2**31, 2, 1, 1), (0, 1, 0, 0)
    x = torch.zeros(2).as_strided(shape, strides)
    params = [torch.randn(shape[1]) for _ in range(4)] + [torch.randn(2)]
    with pytest.raises(RuntimeError, match=r"cannot take an input of shape \[" + str(shape[0])):
        emulation.ops().spem_output(x, *params, None, True)
    with pytest.raises(RuntimeError, match=r"cannot take an input of shape \[" + str(shape[0])):
        emulation.ops().spem_bn_output(x, None, None, None, None, *params, None, True, 0.1,
                                       1e-5, True)


def test_emulation_shuffles_and_barriers_are_strict():
    """The tool itself: a shuffle reads what its partner held at the call; threads are
    interleaved between barriers (a missing barrier shows); misuse a GPU punishes fails the
    launch naming the kernel; launches beyond sm_80/sm_90's limits are refused."""
    tool = emulation.load()
    assert set(tool.run_butterfly(4)) == {496}
    expected = [(i % 256 + 1) % 256 + 1 for i in range(3 * 256)]
    assert tool.run_neighbour_read(3, True) == expected
    if emulation.sanitizer() != "thread":  # under TSAN the missing barrier is a reported race
        assert tool.run_neighbour_read(3, False) != expected  # (cuda_emulated_races.sh's check)
    outcomes = tool.misuse_outcomes()
    assert outcomes.pop("within_launch_bounds") == ""
    for name, message in outcomes.items():
        assert message, name
    assert "exited" in outcomes["exit_before_barrier"]
    assert "different shuffles" in outcomes["divergent_shuffles"]
    assert "__launch_bounds__ (64)" in outcomes["over_launch_bounds"]
    assert "gridDim.y" in outcomes["grid_y_too_large"]


def test_16_bit_conversions_are_torchs():
    """float32 -> float16/bfloat16 (round to nearest even) and back, as torch does, on every
    16-bit pattern and on float32 values around each rounding boundary."""
    tool = emulation.load()
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for dtype, bf16 in ((torch.float16, False), (torch.bfloat16, True)):
        values = bits.view(dtype).float()
        torch.testing.assert_close(tool.widened(bits, bf16), values, rtol=0, atol=0,
                                   equal_nan=True)
        finite = values[values.isfinite()]
        probes = torch.cat([finite, finite.nextafter(finite + 1), finite.nextafter(finite - 1),
                            torch.randn(100000) * 1e4, torch.randn(100000) * 1e-6])
        probes = torch.cat([probes, (probes[:-1] + probes[1:]) / 2])  # halfway points
        got = tool.rounded_bits(probes, bf16)
        want = probes.to(dtype).view(torch.int16)
        nan = probes.to(dtype).isnan()
        assert torch.equal(got[~nan], want[~nan])


def test_every_kernel_ran():
    """Last in this file: every instantiation of every __global__ kernel of csrc/*.cu that the
    emulation compiled (each kernel for float, double, half and bfloat16, vector and scalar
    variants) was launched by the tests above; names any that was not."""
    compiled = emulation.compiled_kernels()
    names = set(emulation.kernels())
    assert {name for name, _ in compiled} == names
    for name in names:
        dtypes = {dtype for kernel, dtype in compiled if kernel == name}
        assert dtypes == set(emulation.DTYPES), name
    launched = {r["instance"] for r in emulation.launch_log()}
    missing = sorted(i for instances in compiled.values() for i in instances if i not in launched)
    assert not missing, f"kernels never launched by the emulated tests: {missing}"

