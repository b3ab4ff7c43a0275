"""Compile the Triton kernels for NVIDIA GPUs on a machine without one.

This runs Triton's real compiler (TTIR -> PTX -> cubin through the ptxas Triton ships),
not the interpreter, on exactly the launches the backend makes (`fwd_launch`/`bwd_launch`),
specialised the way Triton's launcher does it (integers equal to 1 become constants,
16-divisible integers and pointers get divisibility hints). It catches what the
interpreter cannot: code that does not compile, register spills, narrow loads.

    python scripts/triton_aot.py [--arch 90] [--json]   registers, spills, widest loads

It must run without TRITON_INTERPRET (tests/test_triton_compile.py starts it that way). It
uses Triton's private compiler API (native_specialize_impl, ASTSource): a tool, not a test.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from spem_kernels.backends.contract import backward_outputs, forward_outputs
from spem_kernels.backends import triton_backend as tb
from spem_kernels.cases import STAGES, stage_shape

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")


def compile_launch(kernel, args, meta, arch):
    """The compiled kernel (cubin and PTX) for one launch's arguments, for sm_<arch>."""
    meta = dict(meta)
    num_warps = meta.pop("num_warps")
    names = kernel.arg_names
    runtime = [n for n in names if n not in meta]
    signature, constexprs, attrs = {}, {}, {}
    for name, value in zip(runtime, args):
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        i = names.index(name)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in meta.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def resource_usage(compiled):
    """{"REG": n, "STACK": bytes, "LOCAL": bytes, ...} from cuobjdump of the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", text.split("Resource usage:")[-1])}


def widest_global_load_bytes(compiled, elem_bytes):
    """Widest vector global load in the PTX, in bytes (v4 of 32-bit words is 16 bytes)."""
    widths = [int(v or 1) * int(bits) // 8 for v, bits in
              re.findall(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.b(\d+)", compiled.asm["ptx"])]
    return max(widths, default=elem_bytes)


def launches(shape, dtype, channels_last, relu, residual, wide=False):
    """(name, kernel, args, meta) for the forward and the two backward launches of one call;
    wide: as for tensors whose samples span 2**31 elements (int64 offsets)."""
    C = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
    res = torch.empty_like(x) if residual else None
    grad = torch.empty_like(x)
    params = [torch.empty(1, C, 1, 1) for _ in range(4)] + [torch.empty(2)]
    # the tensors the backend allocates, as it allocates them
    out, stats, idx = forward_outputs(x)
    dx, dres, *param_grads = backward_outputs(x, residual and relu, params)
    part = tb.partials(x)
    _, fargs, fmeta = tb.fwd_launch(x, res, out, *params, stats, idx, relu)
    _, bargs, bmeta = tb.bwd_launch(grad, x, out, dx, dres, *params, stats, idx, part, relu,
                                    residual and relu)
    _, gargs, gmeta = tb.grads_launch(part, params[4], *param_grads)
    if wide:
        fmeta, bmeta = dict(fmeta, WIDE=True), dict(bmeta, WIDE=True)
    return [("fwd", tb._spem_fwd_kernel, fargs, fmeta), ("bwd", tb._spem_bwd_kernel, bargs, bmeta),
            ("grads", tb._spem_param_grads_kernel, gargs, gmeta)]


# The launches worth compiling: the ResNet-164 block tail at each stage shape in both
# layouts and both training dtypes, the plain gate, a plane that loops, float64, the largest
# and the smallest ImageNet plane, and int64 offsets (wide).
CASES = [(shape, dtype, cl, True, True, False)
         for shape in [stage_shape(stage, batch=2) for stage in STAGES]
         for dtype in (torch.float32, torch.bfloat16) for cl in (False, True)] + [
    ((2, 64, 32, 32), torch.float32, False, False, False, False),
    ((1, 2, 100, 100), torch.float32, False, True, True, False),
    ((1, 2, 100, 100), torch.bfloat16, True, True, True, False),
    ((2, 5, 13, 17), torch.float64, True, True, True, False),
    (stage_shape("in112", batch=1), torch.float32, False, True, True, False),
    (stage_shape("in7", batch=1), torch.bfloat16, True, True, True, False),
    ((2, 64, 32, 32), torch.float32, False, True, True, True),
]


def report(arch):
    """Compile every case; return rows of (case, kernel, meta, resources, widest load)."""
    rows = []
    for shape, dtype, cl, relu, residual, wide in CASES:
        for name, kernel, args, meta in launches(shape, dtype, cl, relu, residual, wide):
            compiled = compile_launch(kernel, args, meta, arch)
            case = (f"{shape} {str(dtype)[6:]} {'NHWC' if cl else 'NCHW'} relu={relu} "
                    f"res={residual}" + (" wide" if wide else ""))
            rows.append((case, name, meta, resource_usage(compiled),
                         widest_global_load_bytes(compiled, torch.empty(0, dtype=dtype).element_size())))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")
    if args.json:
        print(json.dumps([dict(arch=arch, case=case, kernel=name, resources=res, load_bytes=load,
                               one_pass=meta.get("ONE_PASS"))
                          for arch in args.arch for case, name, meta, res, load in report(arch)]))
        return
    for arch in args.arch:
        print(f"sm_{arch}: {'case':<44} {'kern':>5} {'BC':>4} {'BHW':>5} {'warps':>5} "
              f"{'REG':>4} {'STACK':>5} {'LOCAL':>5} {'load B':>6}")
        for case, name, meta, res, load in report(arch):
            print(f"sm_{arch}: {case:<44} {name:>5} {meta['BLOCK_C']:>4} {meta.get('BLOCK_HW', '-'):>5} "
                  f"{meta['num_warps']:>5} {res.get('REG', -1):>4} {res.get('STACK', -1):>5} "
                  f"{res.get('LOCAL', -1):>5} {load:>6}")


if __name__ == "__main__":
    main()
