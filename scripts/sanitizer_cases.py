"""A small matrix of both ops (spem, spem_bn: forward, output-only forward, backward) on every
fused backend of a device, for compute-sanitizer (scripts/gpu_check.sh runs it under memcheck,
racecheck and synccheck): every kernel launched once or more on shapes that take each path
(planes and channels kernels, vector and scalar, a plane that loops), small enough that the
sanitizer's slowdown costs seconds. Checks nothing itself but that each call runs and
gives finite numbers: the sanitizer's report is the result.

    python scripts/sanitizer_cases.py [--device cuda] [--backends native,triton]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spem_kernels import spem, spem_bn  # noqa: E402
from spem_kernels.backends import compiled_backends  # noqa: E402

# (shape, dtype, channels_last): planes kernels vector (8x8) and scalar (7x7), channels
# kernels vector (C 64) and scalar (C 5), a plane larger than one pass (100x100).
CASES = [((2, 64, 8, 8), torch.float32, False), ((2, 5, 7, 7), torch.float32, False),
         ((2, 64, 8, 8), torch.bfloat16, True), ((2, 5, 7, 7), torch.float32, True),
         ((1, 2, 100, 100), torch.float32, False)]


def run(backend, device, shape, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    C = shape[1]
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    res = torch.randn_like(x)
    params = [torch.randn(C, device=device, requires_grad=True) for _ in range(4)]
    p = torch.randn(2, device=device, requires_grad=True)
    bn = [torch.zeros(C, device=device), torch.ones(C, device=device),
          torch.rand(C, device=device, requires_grad=True),
          torch.randn(C, device=device, requires_grad=True)]
    outs = []
    for op, args in ((spem, []), (spem_bn, bn)):
        leaf = x.detach().requires_grad_()
        out = op(leaf, *args, *params, p, res, relu=True, backend=backend)
        out.backward(torch.randn_like(out))
        with torch.no_grad():
            outs.append(op(x, *args, *params, p, res, relu=True, backend=backend))
        outs += [out.detach(), leaf.grad]
    for t in outs:
        assert torch.isfinite(t.float()).all(), (backend, shape, dtype, channels_last)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=None, help="default: every fused one there")
    args = parser.parse_args()
    backends = args.backends.split(",") if args.backends else compiled_backends(args.device)
    for backend in backends:
        for case in CASES:
            run(backend, args.device, *case)
        print(f"{backend} on {args.device}: {len(CASES)} cases ran", flush=True)
    if args.device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
