"""Timers: medians after warm-up, rotating among input sets so caches do not flatter.

GPU work is timed with triton.testing.do_bench (CUDA events, L2 flushed before each call);
CPU work with time.perf_counter around each call.
"""
import itertools
import statistics
import time

import torch

QUANTILES = (0.25, 0.5, 0.75)


def rotation(fns):
    """A callable that runs the next of `fns` on each call."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def measure(fns, device, *, min_reps=10, min_time_s=0.5, warmup=3):
    """{"median_ms", "q25_ms", "q75_ms", "reps"} of one call, rotating among `fns`."""
    run = rotation(fns)
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench  # Triton is present wherever CUDA kernels are

        q25, med, q75 = do_bench(run, warmup=100, rep=max(100, int(min_time_s * 1000)),
                                 quantiles=list(QUANTILES))
        # do_bench picks its own repeat count from the time budget and does not return it
        return {"median_ms": med, "q25_ms": q25, "q75_ms": q75, "reps": None}
    for _ in range(max(warmup, len(fns))):
        run()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    q25, med, q75 = statistics.quantiles(times, n=4)
    return {"median_ms": med * 1e3, "q25_ms": q25 * 1e3, "q75_ms": q75 * 1e3, "reps": len(times)}


def copy_bandwidth(device, nbytes):
    """GB/s of a large tensor copy, counting bytes read + written: the device's practical
    ceiling for a memory-bound op."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure([lambda: dst.copy_(src)], device, min_reps=10, min_time_s=1.0)
    return {"bytes": 2 * nbytes, "median_ms": t["median_ms"],
            "gb_per_s": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}
