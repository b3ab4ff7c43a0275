"""pytest-benchmark of the SPEM block tail (residual + relu) per backend at the ResNet-164
stage shapes, both dtypes and memory formats, forward and forward+backward.

    pytest benchmarks                          # times every case (CPU: tiny batch)
    pytest benchmarks --benchmark-disable      # runs each case once: the CI slice
"""
import pytest
import torch

from benchmarks.cases import (DIRECTIONS, DTYPES, LAYOUTS, STAGES, bytes_moved, make_inputs,
                              op_for, step_fn)
from benchmarks.conftest import BATCH, DEVICE, IMPLS, INPUT_SETS


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("impl", IMPLS)
def test_block_tail(run_timed, benchmark, impl, stage, dtype, layout, direction):
    inputs = [make_inputs(BATCH, stage, dtype, layout, DEVICE) for _ in range(INPUT_SETS)]
    benchmark.group = f"{stage} {dtype} {layout} {direction}"  # backends side by side
    benchmark.extra_info["bytes"] = bytes_moved(inputs[0], direction)
    result = run_timed([step_fn(op_for(impl), inp, direction) for inp in inputs])
    # Cheap guard that the timed call did the whole job: every output is there and finite.
    outputs = [result] if direction == "fwd" else list(result)
    assert len(outputs) == (1 if direction == "fwd" else 7)
    assert all(torch.isfinite(t).all() for t in outputs)
