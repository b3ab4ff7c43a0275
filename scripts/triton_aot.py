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

from spem_kernels.backends.contract import (backward_outputs, bn_backward_outputs,
                                            bn_forward_outputs, forward_outputs)
from spem_kernels.backends import triton_backend as tb
from spem_kernels.backends import triton_kernels as tk
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


def call_inputs(shape, dtype, channels_last, residual):
    """(x, residual or None, grad, [w1, b1, w2, b2, p]) of one call, uninitialised: x, the
    residual and grad in the memory format asked, the parameters (1, C, 1, 1) and p (2,)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
    params = [torch.empty(1, shape[1], 1, 1) for _ in range(4)] + [torch.empty(2)]
    return x, torch.empty_like(x) if residual else None, torch.empty_like(x), params


def launches(shape, dtype, channels_last, relu, residual, wide=False, bn=False):
    """(name, kernel, args, meta) for the forward and the two backward launches of one call
    (spem_bn's three and three with bn); wide: as for tensors whose samples span 2**31
    elements (int64 offsets)."""
    if bn:
        return bn_launches(shape, dtype, channels_last, relu, residual)
    x, res, grad, params = call_inputs(shape, dtype, channels_last, residual)
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
    return [("fwd", tk._spem_fwd_kernel, fargs, fmeta), ("bwd", tk._spem_bwd_kernel, bargs, bmeta),
            ("grads", tk._spem_param_grads_kernel, gargs, gmeta)]


def bn_launches(shape, dtype, channels_last, relu, residual):
    """spem_bn's launches in training, BatchNorm with weight and bias and running statistics."""
    C = shape[1]
    y, res, grad, params = call_inputs(shape, dtype, channels_last, residual)
    weight, bias, r_mean, r_var = (torch.empty(C) for _ in range(4))
    out, stats, idx, mean, invstd = bn_forward_outputs(y)
    dy, dres, dweight, dbias, *param_grads = bn_backward_outputs(
        y, residual and relu, weight, bias, params)
    stats_part, part = tb.partials(y, 2), tb.partials(y, tk.BN_PLANES)
    coef = mean.new_empty((2, C))
    rows = [("bn_stats", tk._bn_stats_kernel, *tb.bn_stats_launch(y, stats_part)[1:]),
            ("bn_finalize", tk._bn_finalize_kernel,
             *tb.bn_finalize_launch(y, stats_part, r_mean, r_var, mean, invstd, True, 0.1,
                                    1e-5)[1:]),
            ("fwd", tk._spem_fwd_kernel, *tb.fwd_launch(y, res, out, *params, stats, idx, relu,
                                                         bn=(mean, invstd, weight, bias))[1:])]
    reduce, write = tb.bn_bwd_launches(grad, y, out, dy, dres, *params, stats, idx, mean, invstd,
                                       weight, bias, part, coef, True, relu,
                                       residual and relu)
    grads = tb.grads_launch(part, params[4], *param_grads,
                            bn=(invstd, dweight, dbias, coef, y.numel() // C, True))
    return rows + [("bn_reduce", tk._bn_bwd_reduce_kernel, *reduce[1:]),
                   ("grads", tk._spem_param_grads_kernel, *grads[1:]),
                   ("bn_write", tk._bn_bwd_write_kernel, *write[1:])]


# The launches worth compiling: the ResNet-164 block tail at each stage shape in both
# layouts and both training dtypes, the plain gate, a plane that loops, float64, the largest
# and the smallest ImageNet plane, int64 offsets (wide); and spem_bn's launches at the stage
# shapes, a plane that loops and float64. (shape, dtype, channels_last, relu, residual, wide,
# bn)
CASES = [(shape, dtype, cl, True, True, False, bn)
         for shape in [stage_shape(stage, batch=2) for stage in STAGES]
         for dtype in (torch.float32, torch.bfloat16) for cl in (False, True)
         for bn in (False, True)] + [
    ((2, 64, 32, 32), torch.float32, False, False, False, False, False),
    ((1, 2, 100, 100), torch.float32, False, True, True, False, False),
    ((1, 2, 100, 100), torch.bfloat16, True, True, True, False, False),
    ((2, 5, 13, 17), torch.float64, True, True, True, False, False),
    (stage_shape("in112", batch=1), torch.float32, False, True, True, False, False),
    (stage_shape("in7", batch=1), torch.bfloat16, True, True, True, False, False),
    ((2, 64, 32, 32), torch.float32, False, True, True, True, False),
    ((1, 2, 100, 100), torch.bfloat16, True, True, True, False, True),
    ((2, 5, 13, 17), torch.float64, True, True, True, False, True),
]


def report(arch):
    """Compile every case; return rows of (case, kernel, meta, resources, widest load)."""
    rows = []
    for shape, dtype, cl, relu, residual, wide, bn in CASES:
        for name, kernel, args, meta in launches(shape, dtype, cl, relu, residual, wide, bn):
            compiled = compile_launch(kernel, args, meta, arch)
            case = (f"{shape} {str(dtype)[6:]} {'NHWC' if cl else 'NCHW'} relu={relu} "
                    f"res={residual}" + (" wide" if wide else "") + (" bn" if bn else ""))
            elem_bytes = torch.empty(0, dtype=dtype).element_size()
            rows.append((case, name, meta, resource_usage(compiled),
                         widest_global_load_bytes(compiled, elem_bytes)))
    return rows


def one_pass(case, meta):
    """Whether a launch reads each plane once: ONE_PASS, or for the kernels that always loop
    (spem_bn's backward passes) a BLOCK_HW that covers the plane; None for the reductions."""
    if "ONE_PASS" in meta:
        return meta["ONE_PASS"]
    if "BLOCK_HW" not in meta:
        return None
    H, W = (int(v) for v in case.split(")")[0].split(",")[2:])
    return meta["BLOCK_HW"] >= triton.next_power_of_2(H * W)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", action="store_true", help="print one JSON list of rows")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")
    if args.json:
        print(json.dumps([dict(arch=arch, case=case, kernel=name, resources=res, load_bytes=load,
                               one_pass=one_pass(case, meta))
                          for arch in args.arch for case, name, meta, res, load in report(arch)]))
        return
    for arch in args.arch:
        print(f"sm_{arch}: {'case':<44} {'kern':>5} {'BC':>4} {'BHW':>5} {'warps':>5} "
              f"{'REG':>4} {'STACK':>5} {'LOCAL':>5} {'load B':>6}")
        for case, name, meta, res, load in report(arch):
            print(f"sm_{arch}: {case:<44} {name:>5} {meta['BLOCK_C']:>4} "
                  f"{meta.get('BLOCK_HW', '-'):>5} {meta['num_warps']:>5} "
                  f"{res.get('REG', -1):>4} {res.get('STACK', -1):>5} "
                  f"{res.get('LOCAL', -1):>5} {load:>6}")


if __name__ == "__main__":
    main()
