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


def kernel_cases():
    """Every (backend, device) pair of the fused kernels, skipped with the reason where
    that pair cannot run here."""
    cases = []
    for backend in ("triton", "native"):
        for device in DEVICES:
            reason = unavailable_reason(backend, device)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            cases.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return cases


@pytest.fixture(params=kernel_cases())
def case(request):
    """(backend, device) of a fused kernel path."""
    return request.param
