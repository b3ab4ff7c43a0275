"""The CUDA sources compile for A100 (sm_80) and H100 (sm_90) on any machine, without spills.

spem_cuda.cu includes no torch headers, so nvcc checks it with only the CUDA toolkit, with
the defines torch's extension builds pass to nvcc (scripts/cuda_resources.py, which reads
ptxas's account of each kernel's registers and spills). The C++ side that includes torch's
CUDA headers (spem_cuda.cpp, the binding) is syntax-checked against the headers of a CUDA
build of torch where a wheel of one lies on this machine (the CPU torch lacks them).
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cuda_emulation

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = shutil.which("nvcc") or next(
    (p for p in (f"{CUDA_HOME}/bin/nvcc",) if Path(p).exists()), None)
# A CUDA build of torch as a wheel (the machines of this project keep one on disk).
CUDA_TORCH_WHEEL = os.environ.get("SPEM_KERNELS_CUDA_TORCH_WHEEL") or next(
    iter(sorted(glob.glob("/opt/pypi-more/files/torch-*-manylinux*_x86_64.whl"))), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or $CUDA_HOME/bin)")
@pytest.mark.parametrize("arch", [80, 90])
def test_cuda_kernels_compile_without_spills(arch):
    """Every kernel instantiation compiles for sm_<arch> (scripts/cuda_resources.py: ptxas's
    account) and keeps its values in registers: no spill in the float32, float16 and
    bfloat16 kernels, the ones training runs. (The float64 ones, there for gradcheck, may
    spill a few bytes in a cold path, an IEEE division's: reported, not failed.)"""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cuda_resources.py"),
                           "--arch", str(arch), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout)
    kernels = {row["kernel"] for row in rows}
    assert kernels == set(cuda_emulation.kernels()), "kernels missing from ptxas's account"
    spills = [f"{row['instance']}: {row['spill_stores']} B stored, {row['spill_loads']} B loaded"
              for row in rows if row["dtype"] != "double"
              and row["spill_stores"] + row["spill_loads"] > 0]
    assert not spills, f"sm_{arch} kernels that spill: {spills}"


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
