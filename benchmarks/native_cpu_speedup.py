"""Native CPU backend against the eager reference: forward + backward, side by side.

Both run the block tail (residual, relu=True) with x, residual and the parameters
requiring grad, so each side does its full autograd work. The two are timed in
interleaved rounds in one process (spem_kernels.timing.time_interleaved), and the table
shows median milliseconds per forward+backward and the speedup, for NCHW and channels_last.

    python -m benchmarks.native_cpu_speedup [--shape 32 64 32 32] [--rounds 50]
"""
import argparse

import torch

from spem_kernels.backends import unavailable_reason
from spem_kernels.cases import LAYOUTS, block_tail_call, block_tail_inputs, block_tail_op
from spem_kernels.timing import time_interleaved

IMPLS = ("eager", "native")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 32, 32],
                        metavar=("N", "C", "H", "W"))
    parser.add_argument("--rounds", type=int, default=50, help="rounds of one call each")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    reason = unavailable_reason("native", "cpu")
    if reason is not None:
        raise SystemExit(f"native backend unavailable: {reason}")
    shape = tuple(args.shape)
    print(f"forward+backward, shape {shape} float32, residual + relu, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"{'layout':<14} {'eager ms':>9} {'native ms':>10} {'speedup':>8}")
    for layout, memory_format in LAYOUTS.items():
        inputs = block_tail_inputs(shape, memory_format=memory_format, requires_grad=True)
        t = time_interleaved({impl: [block_tail_call(block_tail_op(impl), inputs, "fwd+bwd")]
                              for impl in IMPLS}, "cpu", rounds=args.rounds, reps=1,
                             warmup=args.warmup)
        eager, native = (t[impl].median_ms for impl in IMPLS)
        print(f"{layout:<14} {eager:9.2f} {native:10.2f} {eager / native:7.2f}x")


if __name__ == "__main__":
    main()
