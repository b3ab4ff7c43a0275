"""pytest-benchmark set-up: where the op is timed and at what size.

On CUDA the cases run at the full ResNet-164 batch; on CPU at a tiny batch with few rounds,
so that `pytest benchmarks --benchmark-disable` (the CI slice in test.sh) checks every case
runs in seconds. Triton is timed only on CUDA: on CPU it is an interpreter.
"""
import pytest
import torch

from benchmarks.cases import FULL_BATCH
from spem_kernels.backends import compiled_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
BATCH = FULL_BATCH if ON_GPU else 2
ROUNDS, WARMUP_ROUNDS = (50, 5) if ON_GPU else (5, 1)
INPUT_SETS = 3 if ON_GPU else 2  # rotated so that repeated calls do not find them in cache
IMPLS = ["eager"] + compiled_backends(DEVICE)


@pytest.fixture
def run_timed(benchmark):
    """Time fns (rotating among them) with pytest-benchmark; returns the last call's result.

    CUDA work is synchronized inside the timed function, so each round is the whole call.
    """
    def timed(fns):
        calls = iter(range(1 << 62))

        def once():
            result = fns[next(calls) % len(fns)]()
            if ON_GPU:
                torch.cuda.synchronize()
            return result

        return benchmark.pedantic(once, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                                  iterations=1)

    return timed
