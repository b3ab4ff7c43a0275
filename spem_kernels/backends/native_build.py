"""Building and loading the native library (csrc/), which registers torch.ops.spem_native.

`load()` is called once per process (by native_backend). It loads one of two builds of the
same sources, never both (each registers the spem_native library, which may happen once):

- the extension built with the package (setup.py: `pip install .`, a wheel), the file
  `spem_kernels/_spem_native.so` with its build record `_spem_native.json`, when the record
  says it fits: the same torch, CUDA only where torch has CUDA, a CPU that has every
  instruction set it was compiled for, and the package's sources unchanged (an editable
  install whose csrc/ was edited). Nothing is compiled then, nothing written;
- otherwise a build made here on first use, with torch.utils.cpp_extension.load (ninja), in a
  directory named by a hash of the sources, the flags and the torch/Python versions, under
  $SPEM_KERNELS_CACHE (default ~/.cache/spem_kernels); later processes reuse that build and
  load it in a second. `prebuilt_reason` then says why the packaged extension was not used.

Both compile the same sources with the same flags (`sources`, `cflags`; setup.py imports this
file): the CPU sources, plus the CUDA ones when torch has CUDA and a CUDA toolkit is found.
If the CUDA build fails the CPU-only build is tried, so the CPU kernels survive a broken
toolkit. A failed build is not an error: `load` returns the compiler's last lines per device
type, and the "auto" backend falls back. Importing this module builds nothing.
"""
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

# The package's own copy of the sources: spem_kernels/csrc is a link to the checkout's csrc/
# and a real folder in an installed package (setup.py ships it as package data).
PACKAGE = Path(__file__).resolve().parents[1]
CSRC = PACKAGE / "csrc"
PREBUILT = PACKAGE / "_spem_native.so"
PREBUILT_RECORD = PACKAGE / "_spem_native.json"
LDFLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17"]
_ERROR_LINES = 15
# gcc's macro for each instruction set that the compiler uses on its own (vectorising,
# bit tricks) -> the name Linux gives it in /proc/cpuinfo. Intrinsic-only sets (AES, SHA,
# ...) are left out: the kernels use no intrinsics.
_ISA_FLAGS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__SSE4A__": "sse4a", "__POPCNT__": "popcnt", "__LZCNT__": "abm", "__MOVBE__": "movbe",
    "__BMI__": "bmi1", "__BMI2__": "bmi2", "__AVX__": "avx", "__AVX2__": "avx2",
    "__FMA__": "fma", "__FMA4__": "fma4", "__XOP__": "xop", "__F16C__": "f16c",
    "__GFNI__": "gfni", "__AVXVNNI__": "avx_vnni", "__AVX512F__": "avx512f",
    "__AVX512CD__": "avx512cd", "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma", "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16",
}

prebuilt_reason = None  # why load() did not use the packaged extension; None when it did


def cache_root():
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spem_kernels"
    return Path(os.environ.get("SPEM_KERNELS_CACHE", default))


def cflags(march="native"):
    """-fopenmp: at::parallel_for is inline OpenMP. -march: the SIMD lanes need more than SSE2
    to pay; a build made here is for this CPU (native), a wheel may name a portable target."""
    return ["-O3", f"-march={march}", "-fopenmp"]


def sources(with_cuda):
    """The csrc/ files to compile: every .cpp, except that the CUDA ones (.cu, and .cpp files
    with "cuda" in their name: the CUDA binding) come only with CUDA."""
    files = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))
    return [f for f in files if with_cuda or not (f.endswith(".cu") or "cuda" in f)]


def sources_digest(with_cuda):
    """A hash of what a build compiles: its sources and every header."""
    digest = hashlib.sha256()
    headers = sorted(p.name for p in CSRC.glob("*.h"))
    for name in sources(with_cuda) + headers:
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return digest.hexdigest()


def isa_flags(predefined_macros):
    """The /proc/cpuinfo flags a build needs, from the compiler's predefined macros
    (`cc -march=X -dM -E`)."""
    names = {words[1] for words in map(str.split, predefined_macros.splitlines()) if len(words) > 1}
    return sorted(flag for macro, flag in _ISA_FLAGS.items() if macro in names)


def can_build_cuda():
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None


def _cpuinfo_lines():
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpu_identity():
    """What -march=native compiles for: the CPU's model and feature flags where Linux says."""
    lines = _cpuinfo_lines()
    if not lines:
        return platform.machine() + platform.processor()
    return sorted({line for line in lines if line.startswith(("model name", "flags"))})


def _cpu_flags():
    flags = next((line for line in _cpuinfo_lines() if line.startswith("flags")), ":")
    return set(flags.split(":", 1)[1].split())


def _prebuilt_record():
    """The packaged extension's build record when the extension fits here, else (None, why)."""
    if not PREBUILT.exists():
        return None, f"there is none ({PREBUILT.name} is built by `pip install`, see README)"
    try:
        record = json.loads(PREBUILT_RECORD.read_text())
    except (OSError, ValueError) as e:
        return None, f"its build record is unreadable ({e})"
    if record["torch"] != torch.__version__:
        return None, f"it was built for torch {record['torch']}, this is torch {torch.__version__}"
    if record["cuda"] and torch.version.cuda is None:
        return None, f"it was built with CUDA {record['cuda']}, this torch has no CUDA"
    missing = sorted(set(record["cpu_flags"]) - _cpu_flags())
    if missing:
        return None, (f"it was built for -march={record['march']} and this CPU lacks "
                      f"{' '.join(missing)} (or /proc/cpuinfo does not say)")
    if record["sources"] != sources_digest(record["cuda"] is not None):
        return None, f"the sources in {CSRC} changed since it was built"
    return record, None


def _build_dir(with_cuda):
    """A directory per distinct build: sources (and where they are: ninja rebuilds for another
    path), flags, torch and Python versions."""
    key = repr((str(CSRC), sources_digest(with_cuda), cflags(), LDFLAGS, NVCC_FLAGS,
                torch.__version__, sys.version, with_cuda, _cpu_identity()))
    kind = "cuda" if with_cuda else "cpu"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / f"spem_native_{kind}_{digest}", f"spem_native_{kind}"


def _load_library(with_cuda):
    """Builds (when not built yet) and loads the library that registers torch.ops.spem_native."""
    from torch.utils.cpp_extension import load as jit_load
    build_dir, name = _build_dir(with_cuda)
    if not (build_dir / f"{name}.so").exists():
        note = (f" (the installed extension is not used: {prebuilt_reason})"
                if PREBUILT.exists() else "")
        print(f"spem_kernels: building the native backend ({'CPU+CUDA' if with_cuda else 'CPU'}) "
              f"in {build_dir}; this takes a minute, once{note}", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    jit_load(name, [str(CSRC / s) for s in sources(with_cuda)], extra_cflags=cflags(),
             extra_ldflags=LDFLAGS, extra_cuda_cflags=NVCC_FLAGS if with_cuda else None,
             extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
             with_cuda=with_cuda, is_python_module=False)


def _failure(e):
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (f"the native build failed ({type(e).__name__}): "
            + "\n".join(lines[-_ERROR_LINES:])
            + f"\n(the extension built with the package was not used: {prebuilt_reason})")


def load():
    """Loads the packaged extension, or builds if need be and loads a JIT build; returns
    {"cpu": reason, "cuda": reason}, each None where the native kernels run on that device
    type."""
    global prebuilt_reason
    record, prebuilt_reason = _prebuilt_record()
    if record is not None:
        try:
            torch.ops.load_library(str(PREBUILT))
            return {"cpu": None, "cuda": None if record["cuda"] else
                    "the installed extension was built without CUDA (no CUDA toolkit then)"}
        except OSError as e:  # a failed dlopen registers nothing: the JIT build may load
            prebuilt_reason = f"it does not load ({e.__cause__ or e})"
    cuda_reason = "this torch has no CUDA (or no CUDA toolkit was found): built for CPU only"
    if can_build_cuda():
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
