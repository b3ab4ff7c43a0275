"""Host cost of one block-tail call: fused forward + backward against a plain relu(x + r).

At a tiny batch (default 2x64x8x8, a ResNet-164 stage-3 plane) the kernels' work is small
and what a call costs is mostly the host's: Python, autograd, dispatch, launches. For each
fused backend that runs compiled code here, and for the plain tail the fused one replaces:
the median time of one forward + backward (torch.autograd.grad), timed in interleaved
rounds in one process, its ratio to the plain tail, and the operations one forward +
backward dispatches (tests/test_host_cost.py holds that count to its budget).

By default each round makes one call of each, alternating, as a network interleaves them
with its other layers; calls repeated back to back (--reps 5) flatter the plain tail's two
small ops most (on a 2-core AMD EPYC: plain 47 -> 34 us, fused unchanged at 92 us).

    python -m benchmarks.host_cost [--shape 2 64 8 8] [--rounds 3000] [--reps 1] [--device cpu]
"""
import argparse

import torch

from spem_kernels.backends import compiled_backends
from spem_kernels.cases import block_tail_call, block_tail_inputs, block_tail_op
from spem_kernels.timing import dispatched_ops, time_interleaved


def plain_tail_call(inputs):
    """One forward + backward of relu(x + residual): the tail of a block without SPEM."""
    def call():
        out = torch.relu(inputs.x + inputs.residual)
        return torch.autograd.grad(out, (inputs.x, inputs.residual), inputs.grad_out)
    return call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 64, 8, 8],
                        metavar=("N", "C", "H", "W"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3000, help="interleaved rounds")
    parser.add_argument("--reps", type=int, default=1, help="calls timed per round")
    args = parser.parse_args(argv)
    inputs = block_tail_inputs(tuple(args.shape), device=args.device, requires_grad=True)
    calls = {"plain": plain_tail_call(inputs)}
    for backend in compiled_backends(args.device):
        calls[backend] = block_tail_call(block_tail_op(backend), inputs, "fwd+bwd")
    times = time_interleaved({name: [call] for name, call in calls.items()}, args.device,
                             rounds=args.rounds, reps=args.reps)
    print(f"one forward + backward of the block tail, {tuple(args.shape)} float32 on "
          f"{args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"median of {args.rounds} interleaved rounds of {args.reps} calls")
    print(f"{'implementation':<16} {'us':>8} {'x plain':>8} {'ops':>4}  operations dispatched")
    plain_us = times["plain"].median_ms * 1e3
    for name, call in calls.items():
        _, ops = dispatched_ops(call)
        us = times[name].median_ms * 1e3
        print(f"{name:<16} {us:8.1f} {us / plain_us:8.2f} {len(ops):4d}  {', '.join(ops)}")


if __name__ == "__main__":
    main()
