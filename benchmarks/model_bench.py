"""Model-level rows: CIFAR ResNet-164 training steps, and their extra activation memory.

A step is the trainer's own (spem_kernels.training: forward, cross-entropy + ALPHA *
spem_penalty(), backward and an SGD step, momentum 0.9, weight decay 1e-4) on synthetic
data on the device. Variants (VARIANTS): the plain network, eager SPEM (the reference, op by
op), fused SPEM ("auto": the first compiled backend) after each BatchNorm module, and fused
SPEM+BN (spem_bn: BatchNorm inside the op), in each precision: fp32 NCHW, or bf16 autocast
with model and input in channels_last. Modes: "eager" (steps called from Python), "graph"
(CUDA only: the whole step captured once in a CUDA graph and replayed) and "compile"
(torch.compile(model); its first step, compilation included, is reported as compile_s).

Run by report.py in fresh processes (`python -m benchmarks.model_bench ...`, one JSON line
on stdout):
- `time`: the variants in one precision and mode, in one process (so that a capture or
  compile that goes wrong spoils no other mode's rows), timed in interleaved rounds
  (spem_kernels.timing.time_interleaved) and the median round kept;
- `memory`: one variant and precision per process (so that one variant's freed memory
  cannot hide the next one's peak), eager mode. CUDA: peak allocated during a step minus
  allocated before it (after a first step has made the gradients and momentum buffers).
  CPU: peak RSS growth over the first steps. Both: the bytes autograd keeps for the
  backward (saved_for_backward), which does not depend on the allocator.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F

from spem_kernels.models import cifar_resnet
from spem_kernels.timing import capture, synchronize, time_interleaved
from spem_kernels.training import make_optimizer, make_train_step


class Variant(NamedTuple):
    """A network of the rows: cifar_resnet's attention, backend and fuse_bn."""
    attention: str
    backend: str
    fuse_bn: bool


# The rows, in order: the plain network, the original eager SPEM code (BatchNorm modules,
# then the reference op by op), fused SPEM after each BatchNorm module, and BatchNorm fused
# into SPEM (spem_bn; the trainer's default).
VARIANTS = {"plain": Variant("none", "auto", False),
            "eager SPEM": Variant("spem", "eager", False),
            "fused SPEM": Variant("spem", "auto", False),
            "fused SPEM+BN": Variant("spem", "auto", True)}
# precision: (autocast dtype or None, memory format of model and input)
PRECISIONS = {"fp32": (None, torch.contiguous_format),
              "bf16": (torch.bfloat16, torch.channels_last)}
MODES = ("eager", "graph", "compile")
ALPHA = 0.1  # weight of the SPEM regulariser in the loss (SPEM.md)
MEMORY_STEPS = 2  # CPU: the peak of a step is reached in the first; the second shows it holds


def _proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, from /proc/self/status.

    Not getrusage's ru_maxrss: after fork + exec that starts at the parent's RSS.
    """
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kib) * 1024


def _model_and_data(variant, precision, device, batch, depth):
    """(model, images, labels, autocast) of a variant: synthetic data on the device."""
    torch.manual_seed(0)
    amp_dtype, memory_format = PRECISIONS[precision]
    model = cifar_resnet(depth=depth, num_classes=10, block_name="bottleneck",
                         attention=variant.attention, backend=variant.backend,
                         fuse_bn=variant.fuse_bn)
    model = model.to(device, memory_format=memory_format)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), device=device)
    # cache_enabled=False: autocast's cast cache must not outlive a graph capture
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                              enabled=amp_dtype is not None, cache_enabled=False)
    return model, images, labels, autocast


def training_step(variant, precision, device, batch, depth, compile=False):
    """A function that runs one training step (the trainer's own, make_train_step) on fixed
    synthetic data (the static inputs a captured step needs)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a CIFAR trainer sets; warm-up tunes it
    model, images, labels, autocast = _model_and_data(variant, precision, device, batch, depth)
    net = torch.compile(model) if compile else model
    opt = make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    no_scaler = torch.amp.GradScaler(device.type, enabled=False)
    step = make_train_step(net, model, opt, no_scaler, autocast, ALPHA)
    return lambda: step(images, labels)


def saved_for_backward(variant, precision, device, batch, depth):
    """Bytes autograd keeps for the backward of one training forward (forward and loss):
    every tensor saved for the backward, storages counted once (an output the next layer
    saves too is one storage). Deterministic: what a network keeps, not when it frees it."""
    model, images, labels, autocast = _model_and_data(variant, precision, device, batch, depth)
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels) + ALPHA * model.spem_penalty()
    del loss
    return sum(storages.values())


def _ready_step(variant, precision, mode, device, batch, depth, warmup):
    """(the call to time, extra figures) of one variant in `mode`, warmed up."""
    step = training_step(variant, precision, device, batch, depth, compile=mode == "compile")
    extra = {}
    if mode == "compile":
        start = time.perf_counter()
        step()
        synchronize(device)
        extra["compile_s"] = time.perf_counter() - start
    if mode == "graph":
        # the warm-up steps run on capture's side stream; replay holds the model and data
        return capture(step, warmup).replay, extra
    for _ in range(warmup):
        step()
    return step, extra


def failure_reason(e):
    """An exception as a row's n/a: its type and the first line of its message."""
    first_line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first_line[:200]}"


def time_steps(labels, precision, mode, device, batch, depth, steps, rounds, warmup):
    """{label: {"ms_per_step", "q25_ms", "q75_ms"[, "compile_s"]} or {"error"}}: each
    variant built and warmed up, then all timed in interleaved rounds of `steps` steps
    (a round's figure: its median step; the variant's: its median round)."""
    device = torch.device(device)
    results, workloads = {}, {}
    for label, variant in VARIANTS.items():
        if label in labels:
            try:
                call, results[label] = _ready_step(variant, precision, mode, device, batch, depth,
                                                   warmup)
                workloads[label] = [call]
            except Exception as e:  # a variant that fails (a capture, a compile) is a row's n/a
                results[label] = {"error": failure_reason(e)}
    # One more untimed step each once all are built: building and compiling one variant can
    # invalidate what dynamo compiled for another (guards on shared code), and the
    # recompilation belongs in no timed round.
    timed = time_interleaved(workloads, device, rounds=rounds, reps=steps, warmup=1)
    for label, t in timed.items():
        results[label].update(ms_per_step=t.median_ms, q25_ms=t.q25_ms, q75_ms=t.q75_ms)
    return results


def activation_memory(variant, precision, device, batch, depth):
    """{"activation_mb", "memory_method", "saved_mb"} of a training step in eager mode: the
    peak (measured, see memory_method) and what autograd keeps (saved_for_backward)."""
    device = torch.device(device)
    saved = {"saved_mb": saved_for_backward(variant, precision, device, batch, depth) / 2**20}
    step = training_step(variant, precision, device, batch, depth)
    if device.type == "cuda":
        step()  # gradients and momentum buffers exist from here on: they are not activations
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return {"activation_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
                "memory_method": "peak allocated during a step minus allocated before it "
                                 "(torch.cuda.max_memory_allocated), after one step", **saved}
    rss_before = _proc_status_bytes("VmRSS")
    for _ in range(MEMORY_STEPS):
        step()
    return {"activation_mb": (_proc_status_bytes("VmHWM") - rss_before) / 2**20,
            "memory_method": f"peak RSS growth over the first {MEMORY_STEPS} steps (VmHWM - "
                             "VmRSS before them), fresh process, MALLOC_MMAP_THRESHOLD_=65536",
            **saved}


# glibc keeps freed blocks resident at random (repeated runs differ by 20%); returning every
# block of 64 KiB or more to the OS makes the CPU peak repeatable to 1 MB (glibc's defaults
# for the rest, whatever the timing runs use: bench.sh turns mmap off for them).
_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_MMAP_MAX_": "65536",
               "MALLOC_TRIM_THRESHOLD_": "131072"}


def run(args, extra_env=None, deadline=None):
    """This module's command line in a fresh process: its JSON, or {"error": reason}. It is
    given until `deadline` (a time.perf_counter() value; None: 30 minutes)."""
    timeout_s = 1800 if deadline is None else max(1.0, deadline - time.perf_counter())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **(extra_env or {}), PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.model_bench", *map(str, args)],
                              cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_time(labels, precision, mode, device, batch, depth, steps, rounds, warmup,
                 deadline=None):
    """Rows of the VARIANTS named in labels, in one precision and mode, from one `time`
    process (given until `deadline`, see run)."""
    timed = run(["time", "--device", device, "--batch", batch, "--depth", depth,
                 "--precision", precision, "--mode", mode, "--labels", ",".join(labels),
                 "--steps", steps, "--rounds", rounds, "--warmup", warmup], deadline=deadline)
    rows = []
    for label, variant in VARIANTS.items():
        if label in labels:
            row = {"label": label, **variant._asdict(), "precision": precision, "mode": mode,
                   "depth": depth, "batch": batch, "steps": steps, "rounds": rounds,
                   "error": timed.get("error")}
            row.update(timed.get(label, {}))
            rows.append(row)
    return rows


def measure_memory(keys, device, batch, depth, deadline=None):
    """{(label, precision): {"activation_mb", "memory_method"} or {"error"}}, one `memory`
    process per key. Each measures its own process alone, so on a GPU they run at once; on
    CPU one at a time (they compete for the cores, and threads waiting on busy cores are
    slow to finish)."""
    on_cpu = torch.device(device).type == "cpu"
    env = _MEMORY_ENV if on_cpu else None

    def one(key):
        label, precision = key
        return run(["memory", "--device", device, "--batch", batch, "--depth", depth,
                    "--precision", precision, "--labels", label], env, deadline)

    with ThreadPoolExecutor(max_workers=1 if on_cpu else max(1, len(keys))) as pool:
        return dict(zip(keys, pool.map(one, keys)))


def main(argv=None):
    """The command line of the processes `run` starts; prints the result as one JSON line
    and returns it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("task", choices=("time", "memory"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--depth", type=int, default=164, help="ResNet depth, 9n + 2")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--labels", default=",".join(VARIANTS),
                        help="the variants (time: which; memory: the one)")
    parser.add_argument("--mode", choices=MODES, default="eager", help="time: how steps run")
    parser.add_argument("--steps", type=int, default=20, help="time: steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="time: interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="time: untimed steps per variant")
    a = parser.parse_args(argv)
    if a.task == "time":
        result = time_steps(a.labels.split(","), a.precision, a.mode, a.device, a.batch,
                            a.depth, a.steps, a.rounds, a.warmup)
    else:
        result = activation_memory(VARIANTS[a.labels], a.precision, a.device, a.batch, a.depth)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
