"""The capture helpers refuse what would record silently wrong graphs, on any machine: the
checks run before anything touches CUDA. (Capture itself is tested on a GPU,
tests/test_cuda_graph.py.)"""
import pytest

from spem_kernels.cuda_graphs import CapturedStep
from spem_kernels.timing import capture, on_side_stream


def never_called():
    raise AssertionError("a refused capture must not run the function")


@pytest.mark.parametrize("warmup", [0, -1, 1.5])
def test_capture_refuses_a_warmup_below_one(warmup):
    # Without a warm-up call, lazy state (momentum buffers, handles, compiled kernels) would
    # be created inside the graph and made anew at every replay.
    with pytest.raises(ValueError, match="warm-up must be at least 1"):
        capture(never_called, warmup=warmup)
    with pytest.raises(ValueError, match="warm-up must be at least 1"):
        on_side_stream(never_called, times=warmup)


def test_captured_step_refuses_a_warmup_below_one():
    with pytest.raises(ValueError, match="warm-up must be at least 1"):
        CapturedStep(lambda images, labels: never_called(), batch_size=8, warmup=0)
