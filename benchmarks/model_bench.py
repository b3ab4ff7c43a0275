"""Model-level rows: CIFAR ResNet-164 training steps per second and peak memory.

Run by report.py in fresh processes (`python -m benchmarks.model_bench ...`, one JSON line
on stdout):
- `time`: every variant in one process, timed in interleaved rounds (plain, eager, fused,
  plain, ...) and the median round kept, so that a burst of load on a shared machine
  hits all variants alike instead of one;
- `memory`: one variant per process, so one variant's freed memory cannot hide the
  next one's peak.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# (label, attention, backend) of the rows.
VARIANTS = (("plain", "none", "auto"), ("eager SPEM", "spem", "eager"),
            ("fused SPEM", "spem", "auto"))
ALPHA = 0.1  # weight of the SPEM regulariser in the loss (SPEM.md)
MEMORY_STEPS = 2  # the peak of a step is reached in the first; the second shows it holds


def _proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, from /proc/self/status.

    Not getrusage's ru_maxrss: after fork + exec that starts at the parent's RSS.
    """
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kib) * 1024


def _trainer(attention, backend, device, batch):
    """A function that runs one training step (forward, backward, SGD) on synthetic data."""
    from spem_kernels.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(depth=164, num_classes=10, block_name="bottleneck",
                         attention=attention, backend=backend).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels) + ALPHA * model.spem_penalty()
        loss.backward()
        opt.step()

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(variants, device, batch, steps, rounds, warmup):
    """{label: {"steps_per_s" (median round), "round_steps_per_s"}} for (label, attention,
    backend) in variants."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a CIFAR trainer sets; warm-up tunes it
    steppers = {label: _trainer(att, be, device, batch) for label, att, be in variants}
    for step in steppers.values():
        for _ in range(warmup):
            step()
    rates = {label: [] for label in steppers}
    for _ in range(rounds):
        for label, step in steppers.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            rates[label].append(steps / (time.perf_counter() - start))
    return {label: {"steps_per_s": statistics.median(r), "round_steps_per_s": r}
            for label, r in rates.items()}


def peak_memory(attention, backend, device, batch):
    """{"peak_mem_mb", "memory_method"} over MEMORY_STEPS training steps."""
    device = torch.device(device)
    step = _trainer(attention, backend, device, batch)
    rss_before = _proc_status_bytes("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(MEMORY_STEPS):
        step()
    _sync(device)
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "memory_method": "torch.cuda.max_memory_allocated"}
    return {"peak_mem_mb": (_proc_status_bytes("VmHWM") - rss_before) / 2**20,
            "memory_method": "peak RSS growth over the steps (VmHWM - VmRSS before them), "
                             "fresh process, MALLOC_MMAP_THRESHOLD_=65536"}


# glibc keeps freed blocks resident at random (repeated runs differ by 20%); returning every
# block of 64 KiB or more to the OS makes the CPU peak repeatable to 1 MB.
_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run(args, extra_env=None, timeout_s=1800):
    """This module's command line in a fresh process: its JSON, or {"error": reason}."""
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


def measure(labels, device, batch, steps, rounds, warmup):
    """Rows for the VARIANTS named in labels: rates from one `time` process, peaks from one
    `memory` process each."""
    common = ["--device", device, "--batch", batch]
    timed = run(["time", *common, "--labels", ",".join(labels), "--steps", steps,
                 "--rounds", rounds, "--warmup", warmup])
    rows = []
    for label, attention, backend in VARIANTS:
        if label not in labels:
            continue
        row = {"label": label, "attention": attention, "backend": backend, "batch": batch,
               "steps": steps, "rounds": rounds, "error": timed.get("error")}
        if row["error"] is None:
            row.update(timed[label])
            memory = run(["memory", *common, "--attention", attention, "--backend", backend],
                         _MEMORY_ENV if torch.device(device).type == "cpu" else None)
            row.update(memory)
            row["error"] = memory.get("error")
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=("time", "memory"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--labels", default=",".join(v[0] for v in VARIANTS), help="time: which")
    ap.add_argument("--steps", type=int, default=20, help="time: steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="time: interleaved rounds")
    ap.add_argument("--warmup", type=int, default=3, help="time: untimed steps per variant")
    ap.add_argument("--attention", choices=("none", "spem"), help="memory: the variant")
    ap.add_argument("--backend", default="auto", help="memory: the variant")
    a = ap.parse_args()
    if a.mode == "time":
        labels = a.labels.split(",")
        result = time_variants([v for v in VARIANTS if v[0] in labels], a.device, a.batch,
                               a.steps, a.rounds, a.warmup)
    else:
        result = peak_memory(a.attention, a.backend, a.device, a.batch)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
