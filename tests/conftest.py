"""Shared test set-up: where the kernels run, and the (backend, device) matrix.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; that mode is
read when Triton JIT-compiles a function, so it is set here, before spem_kernels imports.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from spem_kernels.backends import unavailable_reason  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ON_GPU = torch.cuda.is_available()


@pytest.fixture(params=[(backend, device) for backend in ("triton", "native")
                        for device in DEVICES], ids="-".join)
def case(request):
    """(backend, device) of a fused kernel path, skipped with the reason where it cannot run
    here. Asked at set-up, not collection: `-k triton` never builds the native library."""
    reason = unavailable_reason(*request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param
