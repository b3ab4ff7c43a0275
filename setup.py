"""Builds csrc/ ahead of time into spem_kernels/_spem_native.so (metadata: pyproject.toml).

    pip install --no-build-isolation .                      # torch first: the build needs it
    pip wheel --no-build-isolation --no-deps . -w dist      # a wheel, for this torch

CppExtension (the CPU kernels), or CUDAExtension (CPU and CUDA kernels) when torch has CUDA
and a CUDA toolkit is found; TORCH_CUDA_ARCH_LIST picks the GPUs (default "8.0;9.0+PTX":
A100, H100, and newer GPUs through PTX). SPEM_KERNELS_MARCH is the CPU target (default
native: this machine's CPU; x86-64-v3 for a wheel that runs on any AVX2 machine). The
sources, flags and CPU/CUDA split are those of the build made on first use
(spem_kernels/backends/native_build.py), and next to the extension goes a record of what it
was built for (_spem_native.json), which the loader checks before using it.
"""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import (BuildExtension, CppExtension, CUDAExtension,
                                       get_cxx_compiler)

ROOT = Path(__file__).resolve().parent
MARCH = os.environ.get("SPEM_KERNELS_MARCH", "native")
# native_build.py by its path: importing the package would import all of spem_kernels.
_spec = importlib.util.spec_from_file_location(
    "native_build", ROOT / "spem_kernels" / "backends" / "native_build.py")
native_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native_build)

WITH_CUDA = native_build.can_build_cuda()
if WITH_CUDA:
    # Unset, torch compiles for the GPUs it sees, and fails where it sees none.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")


class BuildWithRecord(BuildExtension):
    """Writes the build record next to the extension: in the build folder (wheels) and next
    to its in-place copy (editable installs, `build_ext --inplace`)."""

    def build_extensions(self):
        # setuptools names an object after its source's stem, so spem_cuda.cpp and spem_cuda.cu
        # would both be spem_cuda.o: keep .cu in the name, as the build made on first use does.
        object_filenames = self.compiler.object_filenames
        self.compiler.object_filenames = lambda sources, *args, **kwargs: [
            obj if not src.endswith(".cu") else "{0}.cu{1}".format(*os.path.splitext(obj))
            for src, obj in zip(sources, object_filenames(sources, *args, **kwargs))]
        super().build_extensions()

    def build_extension(self, ext):
        macros = subprocess.run([get_cxx_compiler(), f"-march={MARCH}", "-dM", "-E", "-x", "c++",
                                 os.devnull], capture_output=True, text=True, check=True).stdout
        self._record = json.dumps({
            "torch": torch.__version__, "cuda": torch.version.cuda if WITH_CUDA else None,
            "cuda_arch": os.environ["TORCH_CUDA_ARCH_LIST"] if WITH_CUDA else None,
            "march": MARCH, "cpu_flags": native_build.isa_flags(macros),
            "sources": native_build.sources_digest(WITH_CUDA)}, indent=1) + "\n"
        # setuptools rebuilds only for newer .cpp files: not for a header, a flag or torch
        old = self._record_path(ext)
        self.force = self.force or not old.exists() or old.read_text() != self._record
        super().build_extension(ext)
        self._record_path(ext).write_text(self._record)

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for ext in self.extensions:
            self._record_path(ext).write_text(self._record)

    def _record_path(self, ext):
        return Path(self.get_ext_fullpath(ext.name)).parent / native_build.PREBUILT_RECORD.name


Extension = CUDAExtension if WITH_CUDA else CppExtension
# -g0: Python's own flags (which setuptools passes first) add -g, 10 MB of debug info.
compile_args = {"cxx": native_build.cflags(MARCH) + ["-g0"]}
if WITH_CUDA:
    compile_args["nvcc"] = native_build.NVCC_FLAGS
setup(
    ext_modules=[Extension(
        "spem_kernels._spem_native",
        # relative paths, as setuptools wants; spem_kernels/csrc is a link to csrc/
        sources=[f"csrc/{name}" for name in native_build.sources(WITH_CUDA)],
        include_dirs=["csrc"], extra_compile_args=compile_args,
        extra_link_args=native_build.LDFLAGS)],
    # A library that torch.ops.load_library opens, not a Python module: no ABI tag in its name.
    cmdclass={"build_ext": BuildWithRecord.with_options(no_python_abi_suffix=True)},
)
