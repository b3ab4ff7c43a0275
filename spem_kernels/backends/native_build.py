"""Building and loading the native library (csrc/), which registers torch.ops.spem_native.

`load()` is called once per process (by native_backend): it builds csrc/ with
torch.utils.cpp_extension.load (ninja) into a directory named by a hash of the sources, the
flags and the torch/Python versions, under $SPEM_KERNELS_CACHE (default
~/.cache/spem_kernels); later processes reuse that build and load it in a second. CPU sources
only when this torch has no CUDA (or no CUDA toolkit is found), CPU + CUDA sources otherwise;
if the CUDA build fails the CPU-only build is tried, so the CPU kernels survive a broken
toolkit. A failed build is not an error: `load` returns the compiler's last lines per device
type, and the "auto" backend falls back. Importing this module builds nothing.
"""
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("spem_op.cpp", "spem_cpu.cpp", "spem_autograd.cpp")
HEADERS = ("spem_math.h", "spem_op.h")
CUDA_SOURCES = ("spem_cuda.cpp", "spem_cuda.cu")
CUDA_HEADERS = ("spem_cuda.h",)
# -fopenmp: at::parallel_for is inline OpenMP. -march=native: the build is per machine (the
# CPU is part of the build directory's key), and the SIMD lanes need more than SSE2 to pay.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17"]
_ERROR_LINES = 15


def cache_root():
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spem_kernels"
    return Path(os.environ.get("SPEM_KERNELS_CACHE", default))


def _torch_has_cuda():
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None


def _cpu_identity():
    """What -march=native compiles for: the CPU's model and feature flags where Linux says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return sorted({line for line in lines if line.startswith(("model name", "flags"))})
    except OSError:
        return platform.machine() + platform.processor()


def _build_dir(with_cuda):
    """A directory per distinct build: sources, flags, torch and Python versions."""
    digest = hashlib.sha256()
    names = CPU_SOURCES + HEADERS + (CUDA_SOURCES + CUDA_HEADERS if with_cuda else ())
    for name in names:
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    digest.update(repr((CFLAGS, LDFLAGS, NVCC_FLAGS, torch.__version__, sys.version,
                        with_cuda, _cpu_identity())).encode())
    kind = "cuda" if with_cuda else "cpu"
    return cache_root() / f"spem_native_{kind}_{digest.hexdigest()[:16]}", f"spem_native_{kind}"


def _load_library(with_cuda):
    """Builds (when not built yet) and loads the library that registers torch.ops.spem_native."""
    from torch.utils.cpp_extension import load as jit_load
    build_dir, name = _build_dir(with_cuda)
    if not (build_dir / f"{name}.so").exists():
        print(f"spem_kernels: building the native backend ({'CPU+CUDA' if with_cuda else 'CPU'}) "
              f"in {build_dir}; this takes a minute, once", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    jit_load(name, sources, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
             extra_cuda_cflags=NVCC_FLAGS if with_cuda else None,
             extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
             with_cuda=with_cuda, is_python_module=False)


def _failure(e):
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (f"the native build failed ({type(e).__name__}): "
            + "\n".join(lines[-_ERROR_LINES:]))


def load():
    """Builds if need be and loads the library; returns {"cpu": reason, "cuda": reason}, each
    None where the native kernels run on that device type."""
    cuda_reason = "this torch has no CUDA (or no CUDA toolkit was found): built for CPU only"
    if _torch_has_cuda():
        try:
            _load_library(with_cuda=True)
            return {"cpu": None, "cuda": None}
        except Exception as e:  # a broken toolkit must leave the CPU kernels usable
            cuda_reason = _failure(e)
    try:
        _load_library(with_cuda=False)
        return {"cpu": None, "cuda": cuda_reason}
    except Exception as e:
        return {"cpu": _failure(e), "cuda": cuda_reason}
