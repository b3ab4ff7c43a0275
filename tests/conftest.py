"""Shared test set-up: where the kernels run, the (backend, device) matrix, and fixtures
that several test files use.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; that mode is
read when Triton JIT-compiles a function, so it is set here, before spem_kernels imports.

tests/ holds test files (test_*.py), which import spem_kernels, this folder's helper
modules (tiny_cifar: tiny data sets in the official CIFAR format; op_inputs: the op's
inputs in every layout) and nothing of each other; fixtures they share live here.
torchrun_entry.py is the trainer's entry for the multi-process tests, run as a script.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import cuda_emulation  # noqa: E402  (builds nothing until a test loads it)
from spem_kernels.backends import unavailable_reason  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header():
    return (f"CUDA emulation schedule seed: {cuda_emulation.SEED} (SPEM_EMULATION_SEED="
            f"{cuda_emulation.SEED} replays it)")


@pytest.fixture(params=[(backend, device) for backend in ("triton", "native")
                        for device in DEVICES], ids="-".join)
def case(request):
    """(backend, device) of a fused kernel path, skipped with the reason where it cannot run
    here. Asked at set-up, not collection: `-k triton` never builds the native library."""
    reason = unavailable_reason(*request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny convolutions run faster on one thread, far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
