"""A short demo of the fused SPEM op against the eager reference, with timings.

    python -m spem_kernels.demo [--device cuda|cpu] [--batch N] [--reps R]

Runs the block tail relu(g * x + residual), forward and backward, at the three ResNet-164
stage shapes, on every backend that runs natively on the device (Triton's CPU interpreter
is a test tool, not a fast path, so it is left out), checks each against the reference
and prints median times. For the full benchmark see benchmarks/.
"""
import argparse

import torch

from .backends import compiled_backends
from .cases import STAGES, block_tail_call, block_tail_inputs, block_tail_op, stage_shape
from .reference import spem_reference
from .timing import time_calls


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
    print(f"{'shape':>18} {'backend':>8} {'fwd ms':>8} {'fwd+bwd ms':>11} {'speedup':>8} "
          f"{'max err':>9}")
    for stage in STAGES:
        shape = stage_shape(stage, batch)
        inputs = block_tail_inputs(shape, dtype, device=device, requires_grad=True)
        ref = spem_reference(*(t.double() for t in inputs.args()), relu=True)
        rows = {}
        for backend in ["eager"] + fused:
            op = block_tail_op(backend)
            fwd, fwd_bwd = (block_tail_call(op, inputs, d) for d in ("fwd", "fwd+bwd"))
            err = (fwd().double() - ref).abs().max().item()
            rows[backend] = [time_calls([call], device, reps=reps).median_ms
                             for call in (fwd, fwd_bwd)] + [err]
        for backend, (fwd_ms, both_ms, err) in rows.items():
            speedup = rows["eager"][1] / both_ms
            print(f"{str(shape):>18} {backend:>8} {fwd_ms:8.3f} {both_ms:11.3f} "
                  f"{speedup:7.2f}x {err:9.2e}")


if __name__ == "__main__":
    main()
