"""The one timer of the demo and the benchmarks, for CPU and GPU, and CUDA graph capture.

Anyone may import this module (spem_kernels.demo, benchmarks/, tests/); it needs torch, and
Triton's do_bench for graph replays (Triton is present wherever CUDA kernels run).

- time_calls: a call as made from Python, host cost included. Median after warm-up,
  rotating among the calls given (one per input set, so that a set is out of cache when
  its turn comes back). CPU: time.perf_counter around each call. CUDA: CUDA events around
  each call, the calls back to back with no sync between them, so an interval is the
  GPU's time for the call when the GPU is the bottleneck and the host's when the host is
  (the GPU waits for launches): what a training loop sees. No L2 flush between calls:
  do_bench's flush would let the host run ahead by the flush's duration (some 0.1 ms)
  and hide that much host time per call; the rotation keeps inputs out of L2 instead.
- time_replays (CUDA only): GPU time alone. Each call is captured in a CUDA graph and the
  replays, rotating among the graphs, are timed by triton.testing.do_bench (L2 flushed
  before each); replaying a graph costs the host next to nothing.
- time_interleaved: several workloads in interleaved rounds, the median round kept, so
  that a burst of load on a shared machine hits all of them alike (the report's op rows
  time every implementation of a case this way); interleaved_rounds: the rounds
  themselves (the demo takes each round's ratio); reps_to_fill: calls per round.
- keep_freed_memory: bench.sh's allocator settings, applied in a running process.
- dispatched_ops: the operations a call dispatches (its host cost, counted).
- OthersCpu: how many CPUs other processes kept busy over an interval (whether a CPU
  measurement shared the machine).
- capture: the standard capture of a function in a CUDA graph (warm-up on a side stream,
  then record), kept together with what the graph reads; on_side_stream and record are its
  two halves, which the trainer's captured step (spem_kernels.cuda_graphs) uses apart.
"""
import ctypes
import itertools
import math
import os
import platform
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch

MIN_REPS = 10


class Timing(NamedTuple):
    """Milliseconds per call: median and quartiles; reps = calls timed (None where
    do_bench chose the count)."""
    median_ms: float
    q25_ms: float
    q75_ms: float
    reps: Optional[int]


def _summary(times_ms, reps):
    if len(times_ms) < 2:
        return Timing(times_ms[0], times_ms[0], times_ms[0], reps)
    q25, median, q75 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return Timing(median, q25, q75, reps)


def rotation(calls):
    """A function that makes the next of `calls` on each call."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def synchronize(device):
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _event_pair():
    """Two CUDA timing events, recorded once now: a CUDA event is created at its first
    record, which would otherwise cost the host microseconds inside the interval timed."""
    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
    for event in events:
        event.record()
    return events


def time_calls(calls, device, *, reps=None, min_time_s=0.5, warmup=3):
    """Timing of one call as made from Python, rotating among `calls`.

    `warmup` untimed calls first (warmup >= len(calls) warms every entry), then `reps`
    timed calls, or, without reps, as many as fill min_time_s (at least MIN_REPS)."""
    run = rotation(calls)
    for _ in range(warmup):
        run()
    cuda = torch.device(device).type == "cuda"
    intervals = []
    begin = time.perf_counter()
    while len(intervals) < (reps or MIN_REPS) or (
            reps is None and time.perf_counter() - begin < min_time_s):
        if cuda:
            start, end = _event_pair()
            start.record()
            run()
            end.record()
        else:
            start = time.perf_counter()
            run()
            end = time.perf_counter()
        intervals.append((start, end))
    synchronize(device)
    times_ms = [start.elapsed_time(end) if cuda else (end - start) * 1e3
                for start, end in intervals]
    return _summary(times_ms, len(times_ms))


class Captured(NamedTuple):
    """A call captured in a CUDA graph, with what replaying it needs: the graph replays the
    recorded kernels on the recorded memory, so the tensors it reads and writes must stay
    alive, and `fn` (whose closure holds them) is kept here with it. `outputs`: what the
    captured call returned, overwritten by each replay."""
    graph: "torch.cuda.CUDAGraph"
    fn: Callable
    outputs: object

    def replay(self):
        self.graph.replay()


def check_warmup(warmup):
    """Raise a ValueError unless warmup >= 1: what a graph captures must have run before.
    Lazy state made inside a capture (an optimizer's momentum buffers, a cuBLAS handle,
    a compiled kernel) would be made anew, or reset, at every replay, silently."""
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warm-up must be at least 1 call before a CUDA graph capture "
                         f"(lazy state must exist before it is recorded), got {warmup!r}")


def on_side_stream(fn, times=1):
    """`fn()` run `times` (>= 1) times on a side stream, ordered after the work queued so
    far and before the work queued next; returns the last result. Work to be captured must
    run like this first: lazy initialisation, cuDNN autotuning and Triton compilation must
    happen outside the graph, and not on the default stream."""
    check_warmup(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            result = fn()
    torch.cuda.current_stream().wait_stream(side)
    return result


def record(fn, pool=None):
    """(graph, outputs): `fn()` recorded in a new CUDA graph, not run (its first replay runs
    it); outputs are what the recorded call returned, overwritten by every replay. `pool`
    (torch.cuda.graph_pool_handle()): the memory pool to record into, shared with earlier
    graphs of the same pool; None: a new private pool."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs


def capture(fn, warmup=3):
    """`fn` run `warmup` (>= 1) times on a side stream, then recorded: a Captured."""
    check_warmup(warmup)
    on_side_stream(fn, warmup)
    graph, outputs = record(fn)
    return Captured(graph, fn, outputs)


def time_replays(calls, *, min_time_s=0.5, warmup=3):
    """Timing of one call's GPU work alone: one CUDA graph per entry of `calls`, the replays
    rotating among them, timed by triton.testing.do_bench (CUDA only)."""
    from triton.testing import do_bench

    replay = rotation([capture(fn, warmup).replay for fn in calls])
    q25, median, q75 = do_bench(replay, rep=max(10, round(min_time_s * 1e3)),
                                quantiles=[0.25, 0.5, 0.75])
    return Timing(median, q25, q75, None)


def time_interleaved(workloads, device, *, rounds, reps, warmup=3):
    """{name: Timing over rounds}: each workload's figure is the median of its rounds'
    medians (interleaved_rounds)."""
    count = reps if isinstance(reps, dict) else dict.fromkeys(workloads, reps)
    per_round = interleaved_rounds(workloads, device, rounds=rounds, reps=count, warmup=warmup)
    return {name: _summary(ms, rounds * count[name]) for name, ms in per_round.items()}


def interleaved_rounds(workloads, device, *, rounds, reps, warmup=3):
    """{name: [each round's median ms]}: each round times `reps` calls of each workload in
    turn (time_calls, no warm-up after the first round). `workloads` maps a name to its list
    of calls; `reps` is one count for all or {name: count}, so that a slow and a fast
    workload can each fill a similar time per round. Round i of two workloads ran side by
    side: their ratio in a round is free of the load that hit that round."""
    count = reps if isinstance(reps, dict) else dict.fromkeys(workloads, reps)
    per_round = {name: [] for name in workloads}
    for first in [True] + [False] * (rounds - 1):
        for name, calls in workloads.items():
            t = time_calls(calls, device, reps=count[name], warmup=warmup if first else 0)
            per_round[name].append(t.median_ms)
    return per_round


def reps_to_fill(calls, device, seconds):
    """How many calls of `calls` (rotating) take about `seconds`, from one timed pass over
    them after a warm-up call of each; at least 1."""
    first = time_calls(calls, device, reps=len(calls), warmup=len(calls))
    return max(1, math.ceil(seconds * 1e3 / first.median_ms))


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """In this process, what bench.sh's MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_ do (set
    through mallopt, since the environment is read only at start): glibc keeps freed memory
    for reuse instead of unmapping it, so that a CPU call times its kernels rather than the
    page faults of its fresh outputs (README, Benchmarks). Where the caller set either
    variable, or off glibc, nothing changes. Returns what was done, in words."""
    if any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return "glibc malloc as the environment sets it (MALLOC_*)"
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) \
        if platform.libc_ver()[0] == "glibc" else None
    if mallopt is None or not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        return "the C library's default allocator"
    return "glibc malloc keeping freed memory (as bench.sh)"


def dispatched_ops(fn):
    """(fn's result, the names of the operations it dispatched): what a TorchDispatchMode
    sees, each call of an operator that reaches the dispatcher once. A host-bound op's cost
    follows this count; operations inside another op's kernel (C++) are not seen."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        result = fn()
    return result, recorder.ops


# A CPU measurement is quiet when other processes kept fewer CPUs than this busy while it
# ran (OthersCpu; not the load average, which counts the measuring process's own threads):
# with more, a call of a parallel kernel also waits for a core (on a shared 2-core machine
# about a scheduler tick per parallel region), and times and their ratios do not reproduce.
QUIET_OTHERS_CPUS = 0.25


class OthersCpu:
    """CPUs' worth of work done by other processes since this was made: the machine's busy
    time (/proc/stat) less this process's own CPU time (every thread of it, and the children
    it waited for), over the wall time. The load average cannot tell that: it counts this
    process's own running threads (a 2-thread CPU benchmark alone keeps it near 2).
    ``cpus()`` is None where /proc/stat is missing (not Linux)."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        own = os.times()  # with the children it waited for (the report's memory processes)
        return (time.monotonic(), busy / os.sysconf("SC_CLK_TCK"),
                own.user + own.system + own.children_user + own.children_system)

    def cpus(self):
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._start, end
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def copy_bandwidth(device, nbytes, min_time_s=1.0):
    """{"bytes", "median_ms", "gb_per_s"} of a large tensor copy, counting bytes read and
    written: the device's practical ceiling for a memory-bound op."""
    src = torch.full((nbytes // 4,), 1.0, device=device)
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], device, min_time_s=min_time_s)
    return {"bytes": 2 * nbytes, "median_ms": t.median_ms,
            "gb_per_s": 2 * nbytes / (t.median_ms * 1e-3) / 1e9}
