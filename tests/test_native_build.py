"""The CUDA sources compile for A100 (sm_80) and H100 (sm_90) on any machine.

spem_cuda.cu includes no torch headers, so nvcc checks it with only the CUDA toolkit (the
defines are the ones torch's extension builds pass to nvcc). The C++ side that includes
torch's CUDA headers (spem_cuda.cpp, the binding) is syntax-checked against the headers of a
CUDA build of torch where a wheel of one lies on this machine (the CPU torch lacks them).
"""
import glob
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = shutil.which("nvcc") or next(
    (p for p in (f"{CUDA_HOME}/bin/nvcc",) if Path(p).exists()), None)
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# A CUDA build of torch as a wheel (the machines of this project keep one on disk).
CUDA_TORCH_WHEEL = os.environ.get("SPEM_KERNELS_CUDA_TORCH_WHEEL") or next(
    iter(sorted(glob.glob("/opt/pypi-more/files/torch-*-manylinux*_x86_64.whl"))), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or $CUDA_HOME/bin)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile(arch, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O3", f"-arch={arch}", *TORCH_NVCC_DEFINES,
           str(CSRC / "spem_cuda.cu"), "-o", str(tmp_path / "spem_cuda.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(CUDA_TORCH_WHEEL is None or not Path(CUDA_HOME, "include").is_dir(),
                    reason="needs a CUDA build of torch as a wheel (SPEM_KERNELS_CUDA_TORCH_WHEEL)"
                           " and the CUDA toolkit's headers")
def test_cuda_binding_compiles_against_cuda_torch_headers(tmp_path):
    with zipfile.ZipFile(CUDA_TORCH_WHEEL) as wheel:
        wheel.extractall(tmp_path, [n for n in wheel.namelist() if n.startswith("torch/include/")])
    include = tmp_path / "torch" / "include"
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", f"-I{include}",
           f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{CUDA_HOME}/include",
           f"-I{CSRC}", str(CSRC / "spem_cuda.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
