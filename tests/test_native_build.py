"""The CUDA device code compiles with nvcc for A100 (sm_80) and H100 (sm_90), on any machine.

spem_cuda.cu includes no torch headers, so this needs only the CUDA toolkit; the defines are
the ones torch's extension builds pass to nvcc.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None)
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or /usr/local/cuda/bin)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile(arch, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O3", f"-arch={arch}", *TORCH_NVCC_DEFINES,
           str(CSRC / "spem_cuda.cu"), "-o", str(tmp_path / "spem_cuda.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
