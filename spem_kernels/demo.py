"""A short demo of the fused SPEM op against the eager reference, with timings.

    python -m spem_kernels.demo [--device cuda|cpu] [--batch N] [--reps R]

Runs the block tail relu(g * x + residual), forward and backward, at the three ResNet-164
stage shapes, on every backend that runs natively on the device (Triton's CPU interpreter
is a test tool, not a fast path, so it is left out), checks each against the reference
and prints median times. For the full benchmark see benchmarks/.
"""
import argparse
import statistics
import time

import torch

from . import spem, spem_reference
from .backends import compiled_backends

STAGES = [(64, 32, 32), (128, 16, 16), (256, 8, 8)]


def _timer(device):
    """Returns f -> median seconds of f() over `reps` runs after warm-up."""
    def median_time(fn, reps):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return median_time


def _inputs(n, c, h, w, device, dtype):
    x = torch.randn(n, c, h, w, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    params = [(0.5 * torch.randn(1, c, 1, 1, device=device)).requires_grad_() for _ in range(4)]
    p = torch.randn(2, device=device, requires_grad=True)
    return x, params, p, residual


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=None, help="default: 100 on CUDA, 10 on CPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 32)
    reps = args.reps or (100 if device.type == "cuda" else 10)
    dtype = getattr(torch, args.dtype)
    fused = compiled_backends(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"spem_kernels demo on {name} ({device}), torch {torch.__version__}, "
          f"{args.dtype}, batch {batch}; fused backends here: {', '.join(fused) or 'none'}")
    if not fused:
        print("No fused backend runs on this device: only the eager reference is available.")
    median_time = _timer(device)

    print(f"{'shape':>18} {'backend':>8} {'fwd ms':>8} {'fwd+bwd ms':>11} {'speedup':>8} {'max err':>9}")
    for c, h, w in STAGES:
        x, params, p, residual = _inputs(batch, c, h, w, device, dtype)
        grad = torch.randn_like(x)
        ref = spem_reference(x.double(), *(t.double() for t in params), p.double(),
                             residual.double(), relu=True)
        rows = {}
        for backend in ["eager"] + fused:
            fn = (lambda: spem_reference(x, *params, p, residual, relu=True)) if backend == "eager" \
                else (lambda b=backend: spem(x, *params, p, residual, relu=True, backend=b))
            with torch.no_grad():
                err = (fn().double() - ref).abs().max().item()
                t_fwd = median_time(fn, reps)
            t_both = median_time(lambda: fn().backward(grad), reps)
            rows[backend] = (t_fwd, t_both, err)
        for backend, (t_fwd, t_both, err) in rows.items():
            speedup = rows["eager"][1] / t_both
            print(f"{str((batch, c, h, w)):>18} {backend:>8} {t_fwd * 1e3:8.3f} {t_both * 1e3:11.3f} "
                  f"{speedup:7.2f}x {err:9.2e}")


if __name__ == "__main__":
    main()
