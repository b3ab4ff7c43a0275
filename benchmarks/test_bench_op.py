"""pytest-benchmark of the SPEM block tail (residual + relu) per backend at the ResNet-164
stage shapes, both dtypes and memory formats, forward and forward+backward.

    pytest benchmarks                          # times every case (CPU: tiny batch)
    pytest benchmarks --benchmark-disable      # runs each case once: the CI slice
"""
import pytest
import torch

from benchmarks.conftest import BATCH, DEVICE, IMPLS, INPUT_SETS
from spem_kernels.cases import (DIRECTIONS, DTYPES, LAYOUTS, STAGES, block_tail_call,
                                block_tail_inputs, block_tail_op, stage_shape)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("impl", IMPLS)
def test_block_tail(run_timed, benchmark, impl, stage, dtype, layout, direction):
    inputs = [block_tail_inputs(stage_shape(stage, BATCH), DTYPES[dtype], LAYOUTS[layout],
                                DEVICE, requires_grad=True) for _ in range(INPUT_SETS)]
    benchmark.group = f"{stage} {dtype} {layout} {direction}"  # backends side by side
    benchmark.extra_info["bytes"] = inputs[0].bytes_moved(direction)
    op = block_tail_op(impl)
    result = run_timed([block_tail_call(op, inp, direction) for inp in inputs])
    # Cheap guard that the timed call did the whole job: every output is there and finite.
    outputs = [result] if direction == "fwd" else list(result)
    assert len(outputs) == (1 if direction == "fwd" else 7)
    assert all(torch.isfinite(t).all() for t in outputs)
