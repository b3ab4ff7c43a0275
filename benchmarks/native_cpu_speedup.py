"""Native CPU backend against the eager reference: forward + backward, side by side.

Both run the block-tail case (residual, relu=True) with x, residual and the parameters
requiring grad, so each side does its full autograd work. The two are timed alternately,
rep by rep, in one process, and the table shows median milliseconds per forward+backward
and the speedup, for NCHW and channels_last.

    python -m benchmarks.native_cpu_speedup [--shape 32 64 32 32] [--reps 50]
"""
import argparse
import statistics
import time

import torch

from spem_kernels import spem, spem_reference
from spem_kernels.backends import unavailable_reason

from .cases import LAYOUTS



def make_leaves(shape, memory_format):
    C = shape[1]
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    res = torch.randn(shape).contiguous(memory_format=memory_format)
    params = [0.5 * torch.randn(1, C, 1, 1) for _ in range(4)] + [torch.randn(2)]
    return [t.requires_grad_() for t in (x, *params, res)]


def fwd_bwd(fn, leaves, grad_out):
    for t in leaves:
        t.grad = None
    out = fn(*leaves[:6], leaves[6], relu=True)
    out.backward(grad_out)


def time_side_by_side(fns, shape, memory_format, reps, warmup):
    """Median seconds per forward+backward of each fn, alternating fns within each rep."""
    leaves = make_leaves(shape, memory_format)
    grad_out = torch.randn(shape).contiguous(memory_format=memory_format)
    times = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fwd_bwd(fn, leaves, grad_out)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 32, 32],
                        metavar=("N", "C", "H", "W"))
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    reason = unavailable_reason("native", "cpu")
    if reason is not None:
        raise SystemExit(f"native backend unavailable: {reason}")
    fns = {"eager": spem_reference,
           "native": lambda *a, **k: spem(*a, **k, backend="native")}
    shape = tuple(args.shape)
    print(f"forward+backward, shape {shape} float32, residual + relu, "
          f"{torch.get_num_threads()} threads, median of {args.reps} reps")
    print(f"{'layout':<14} {'eager ms':>9} {'native ms':>10} {'speedup':>8}")
    for layout, memory_format in LAYOUTS.items():
        t = time_side_by_side(fns, shape, memory_format, args.reps, args.warmup)
        print(f"{layout:<14} {t['eager'] * 1e3:9.2f} {t['native'] * 1e3:10.2f} "
              f"{t['eager'] / t['native']:7.2f}x")


if __name__ == "__main__":
    main()
