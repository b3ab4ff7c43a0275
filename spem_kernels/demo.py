"""A short demo of the fused SPEM op against the eager reference, with timings.

    python -m spem_kernels.demo [--device cuda|cpu] [--batch N] [--rounds R] [--seconds S]

Runs the block tail relu(g * x + residual), forward and backward, at the three ResNet-164
stage shapes, on every backend that runs natively on the device (Triton's CPU interpreter
is a test tool, not a fast path, so it is left out), checks each against the reference
and prints median times with their spread. Timed as the benchmark report times (the full
benchmark: benchmarks/, ./bench.sh): a shape's backends in interleaved rounds, so that load
from other processes hits them alike; each speedup is the median of the rounds' ratios,
with their lowest and highest; on CPU, glibc keeps freed memory as under bench.sh.
"""
import argparse
import statistics

import torch

from .backends import compiled_backends
from .cases import STAGES, block_tail_call, block_tail_inputs, block_tail_op, stage_shape
from .reference import spem_reference
from .timing import (QUIET_OTHERS_CPUS, OthersCpu, interleaved_rounds, keep_freed_memory,
                     reps_to_fill)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds over the backends (default 7)")
    parser.add_argument("--seconds", type=float, default=0.7,
                        help="time per figure, over all rounds (default 0.7)")
    parser.add_argument("--reps", type=int, default=None,
                        help="calls per round (default: as many as fill --seconds)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or (args.reps is not None and args.reps < 1):
        parser.error("--rounds and --reps must be at least 1, --seconds above 0")
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 32)
    dtype = getattr(torch, args.dtype)
    allocator = keep_freed_memory() if device.type == "cpu" else None
    fused = compiled_backends(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"spem_kernels demo on {name} ({device}), torch {torch.__version__}, "
          f"{args.dtype}, batch {batch}; fused backends here: {', '.join(fused) or 'none'}")
    print(f"median of {args.rounds} interleaved rounds [lowest-highest round]"
          + (f"; {allocator}" if allocator else ""))
    if not fused:
        print("No fused backend runs on this device: only the eager reference is available.")
    print(f"{'shape':>18} {'backend':>8} {'fwd ms':>19} {'fwd+bwd ms':>19} "
          f"{'fwd+bwd speedup':>22} {'max err':>9}")
    others = OthersCpu()
    for stage in STAGES:
        shape = stage_shape(stage, batch)
        inputs = block_tail_inputs(shape, dtype, device=device, requires_grad=True)
        ref = spem_reference(*(t.double() for t in inputs.args()), relu=True)
        backends = ["eager"] + fused
        calls = {d: {b: [block_tail_call(block_tail_op(b), inputs, d)] for b in backends}
                 for d in ("fwd", "fwd+bwd")}
        errors = {b: (calls["fwd"][b][0]().double() - ref).abs().max().item() for b in backends}
        rounds = {}
        for direction, workloads in calls.items():
            reps = {b: args.reps or reps_to_fill(c, device, args.seconds / args.rounds)
                    for b, c in workloads.items()}
            rounds[direction] = interleaved_rounds(workloads, device, rounds=args.rounds,
                                                   reps=reps)
        both = rounds["fwd+bwd"]
        for backend in backends:
            ratios = [e / t for e, t in zip(both["eager"], both[backend])]
            print(f"{str(shape):>18} {backend:>8} {_spread(rounds['fwd'][backend], '.3f'):>19} "
                  f"{_spread(both[backend], '.3f'):>19} {_spread(ratios, '.2f', 'x'):>22} "
                  f"{errors[backend]:9.2e}")
    busy = others.cpus() if device.type == "cpu" else None
    if busy is not None:
        print(f"other processes kept {busy:.2f} CPUs busy meanwhile: " + (
            "quiet" if busy < QUIET_OTHERS_CPUS else
            "NOT QUIET: the times include waits for a core (with every round waiting, whole "
            "scheduler ticks, and a narrow spread), so neither they nor the speedups are the "
            "kernels'; run again when the machine is idle"))


def _spread(values, fmt, unit=""):
    """'median [lowest-highest]' of a backend's rounds."""
    return (f"{statistics.median(values):{fmt}}{unit} "
            f"[{min(values):{fmt}}-{max(values):{fmt}}]")


if __name__ == "__main__":
    main()
