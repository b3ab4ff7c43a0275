"""Shared test set-up: where the kernels run, the (backend, device) matrix, and fixtures
that several test files use.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; that mode is
read when Triton JIT-compiles a function, so it is set here, before spem_kernels imports.

tests/ holds test files (test_*.py), which import spem_kernels, this folder's helper
modules (tiny_cifar: tiny data sets in the official CIFAR format; op_inputs: the op's
inputs in every layout; op_checks: how results are compared; fuzz_cases, fuzz_paths,
fuzz_checks: the property-based tests' cases, paths and rules; cuda_emulation: the CUDA
kernels executed on the CPU; bad_flags: the trainer's flags that cannot work) and nothing of
each other; fixtures they share live here. torchrun_entry.py is the trainer's entry for the
multi-process tests, run as a script.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import cuda_emulation  # noqa: E402  (builds nothing until a test loads it)
from spem_kernels.backends import unavailable_reason  # noqa: E402

# hypothesis profiles of the property-based tests (test_fuzz.py), picked by HYPOTHESIS_PROFILE.
# "ci" (the default): the same examples every run (derandomized: a seed fixed by each test),
# no example database, bounded to fit CI (300 examples, all paths: under 3 minutes on
# 2 cores); "long": thousands of fresh examples, for a soak. Both print a failure's
# @reproduce_failure blob. Examples take milliseconds to seconds (Triton's interpreter), so
# no deadline; an example's tensors are built from a small recipe, so no data-size check.
_FUZZ = dict(deadline=None, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=150, derandomize=True, database=None, **_FUZZ)
settings.register_profile("long", max_examples=2500, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
