"""pytest-benchmark set-up: where the op is timed and at what size.

On CUDA the cases run at the full ResNet-164 batch; on CPU at a tiny batch with few rounds,
so that `pytest benchmarks --benchmark-disable` (the CI slice in test.sh) checks every case
runs in seconds. Triton is timed only on CUDA: on CPU it is an interpreter.

pytest-benchmark keeps its own clock and statistics (so that its --benchmark-compare and
--benchmark-save work); what it times is the report's rotation among input sets, each call
synchronised with the device. The report (report.py) uses spem_kernels.timing.
"""
import pytest
import torch

from spem_kernels.backends import compiled_backends
from spem_kernels.cases import FULL_BATCH
from spem_kernels.timing import rotation, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
BATCH = FULL_BATCH if ON_GPU else 2
ROUNDS, WARMUP_ROUNDS = (50, 5) if ON_GPU else (5, 1)
INPUT_SETS = 3 if ON_GPU else 2  # rotated so that repeated calls do not find them in cache
IMPLS = ["eager"] + compiled_backends(DEVICE)


@pytest.fixture
def run_timed(benchmark):
    """Time calls (rotating among them) with pytest-benchmark; returns the last call's
    result. Each round is a whole call: its device work is waited for."""
    def timed(calls):
        run = rotation(calls)

        def once():
            result = run()
            synchronize(DEVICE)
            return result

        return benchmark.pedantic(once, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                                  iterations=1)

    return timed
