"""Registers, spills, static shared memory and occupancy of every CUDA kernel of csrc/*.cu,
per instantiation (each dtype and vector width), for sm_80 (A100) and sm_90 (H100, H200),
from ptxas's own account (`nvcc -Xptxas -v`): no GPU needed, only a CUDA toolkit.

    python scripts/cuda_resources.py [--arch 80 90] [--json]

Occupancy is the share of an SM's 64 warp slots that the kernel's blocks fill at once, as
the CUDA occupancy calculator reckons it from the block size (the kernel's
__launch_bounds__, which every launch uses), registers (allocated per warp in units of 256)
and static shared memory (plus the 1 KiB the driver reserves per block). The tests
(tests/test_native_build.py) fail on any spill; the benchmark report prints this table where
a toolkit is found.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
# The defines torch's extension builds pass to nvcc (16-bit types without operators).
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# Per SM: 32-bit registers, resident threads and blocks, shared memory (bytes).
SM_LIMITS = {80: dict(registers=65536, threads=2048, blocks=32, smem=167936),
             90: dict(registers=65536, threads=2048, blocks=32, smem=233472)}
RESERVED_SMEM_PER_BLOCK = 1024
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\(([^)]*)\)\s+)?(\w+)\s*\(")


def find_nvcc():
    """nvcc on the PATH, else under $CUDA_HOME or /usr/local/cuda; None where there is none."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") or next(
        (p for p in (f"{cuda_home}/bin/nvcc",) if Path(p).exists()), None)


def block_sizes():
    """{kernel: threads per block} of csrc/*.cu: each kernel's __launch_bounds__, whose
    expression is a number or a constexpr int of the same file (1024 where there is none)."""
    sizes = {}
    for path in sorted(CSRC.glob("*.cu")):
        text = path.read_text()
        constants = dict(re.findall(r"constexpr\s+int\s+(\w+)\s*=\s*(\d+)\s*;", text))
        for bound, name in _KERNEL.findall(text):
            sizes[name] = int(constants.get(bound.strip(), bound or 1024))
    return sizes


def occupancy(arch, threads, registers, smem):
    """The share of the SM's warp slots that resident blocks of this kernel fill."""
    limit = SM_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(limit["threads"] // threads, limit["blocks"],
                 limit["registers"] // (per_warp * warps),
                 limit["smem"] // (smem + RESERVED_SMEM_PER_BLOCK))
    return blocks * warps / (limit["threads"] // 32)


def parse_ptxas(text):
    """{mangled entry: {registers, stack, spill_stores, spill_loads, smem}} from ptxas -v."""
    entries, current = {}, None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = entries.setdefault(m.group(1), {})
        elif (m := re.search(r"Function properties for (\S+)", line)) is not None:
            current = entries.setdefault(m.group(1), {})
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                            r"(\d+) bytes spill loads", line):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m[1])
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem[1]) if smem else 0
    return entries


def demangled(names):
    """The names as c++filt writes them (as they are, where binutils is missing)."""
    if not names or shutil.which("c++filt") is None:
        return list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def instance(name):
    """'void ns::(anonymous namespace)::k<float, float, 4>(args)' -> 'k<float, float, 4>'."""
    name = name.replace("(anonymous namespace)", "{anon}")
    name = name[5:] if name.startswith("void ") else name
    depth = 0
    for i, c in enumerate(name):
        depth += (c == "<") - (c == ">")
        if depth == 0 and c == "(":
            name = name[:i]
            break
    head, _, args = name.partition("<")
    return head.split("::")[-1] + ("<" + args if args else "")


def report(arch, nvcc=None):
    """One row per kernel instantiation compiled for sm_<arch>: kernel, instance, dtype,
    threads, registers, stack, spill_stores, spill_loads, smem, occupancy."""
    nvcc = nvcc or find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([nvcc, "-c", "-std=c++17", "-O3", f"-arch=sm_{arch}",
                               "-Xptxas", "-v", *TORCH_NVCC_DEFINES, str(CSRC / "spem_cuda.cu"),
                               "-o", os.path.join(tmp, "spem_cuda.o")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed for sm_{arch}:\n{done.stderr[-4000:]}")
    entries = parse_ptxas(done.stdout + done.stderr)
    sizes = block_sizes()
    rows = []
    for mangled, name in zip(entries, demangled(list(entries))):
        inst = instance(name)
        kernel = inst.split("<")[0]
        if kernel not in sizes:
            continue
        r = entries[mangled]
        threads = sizes[kernel]
        rows.append(dict(arch=arch, kernel=kernel, instance=inst,
                         dtype=inst.partition("<")[2].split(",")[0].strip(">"),
                         threads=threads, **r,
                         occupancy=occupancy(arch, threads, r["registers"], r["smem"])))
    return sorted(rows, key=lambda r: r["instance"])


def format_rows(rows):
    header = (f"{'arch':<6} {'kernel instance':<46} {'regs':>4} {'spill':>5} {'stack':>5} "
              f"{'smem B':>6} {'occupancy':>9}")
    return "\n".join([header] + [
        f"sm_{r['arch']:<3} {r['instance']:<46} {r['registers']:>4} "
        f"{r['spill_stores'] + r['spill_loads']:>5} {r['stack']:>5} {r['smem']:>6} "
        f"{r['occupancy']:>8.0%}" for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    args = parser.parse_args()
    if find_nvcc() is None:
        sys.exit("no CUDA toolkit found (nvcc on the PATH, $CUDA_HOME or /usr/local/cuda)")
    rows = [row for arch in args.arch for row in report(arch)]
    print(json.dumps(rows) if args.json else format_rows(rows))


if __name__ == "__main__":
    main()
