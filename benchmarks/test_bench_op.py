"""pytest-benchmark of the SPEM block tail (residual + relu) per backend at the ResNet-164
stage shapes, both dtypes and memory formats, forward and forward+backward: spem, and spem_bn
(BatchNorm in the op, training) with the plain network's tail relu(bn(y) + residual) too.

    pytest benchmarks                          # times every case (CPU: tiny batch)
    pytest benchmarks --benchmark-disable      # runs each case once: the CI slice
"""
import pytest
import torch

from benchmarks.conftest import BATCH, DEVICE, IMPLS, INPUT_SETS
from spem_kernels.cases import (DIRECTIONS, DTYPES, LAYOUTS, OPS, STAGES, block_tail_call,
                                stage_shape)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("op, impl", [(op, impl) for op in OPS
                                      for impl in IMPLS + (["plain"] if op == "spem_bn" else [])])
def test_block_tail(run_timed, benchmark, op, impl, stage, dtype, layout, direction):
    make_inputs, make_op = OPS[op]
    inputs = [make_inputs(stage_shape(stage, BATCH), DTYPES[dtype], LAYOUTS[layout], DEVICE,
                          requires_grad=True) for _ in range(INPUT_SETS)]
    benchmark.group = f"{op} {stage} {dtype} {layout} {direction}"  # backends side by side
    benchmark.extra_info["bytes"] = inputs[0].bytes_moved(direction)
    result = run_timed([block_tail_call(make_op(impl), inp, direction) for inp in inputs])
    # Cheap guard that the timed call did the whole job: every output is there and finite
    # (the plain tail has no SPEM parameters to differentiate).
    outputs = [result] if direction == "fwd" else [g for g in result if g is not None]
    unused = len(inputs[0].params) if impl == "plain" else 0
    assert len(outputs) == (1 if direction == "fwd" else len(inputs[0].leaves()) - unused)
    assert all(torch.isfinite(t).all() for t in outputs)
