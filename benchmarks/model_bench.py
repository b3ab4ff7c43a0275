"""Model-level row: CIFAR ResNet-164 training steps per second and peak memory.

Each variant runs in a fresh process (`python -m benchmarks.model_bench ...`, one JSON
line on stdout) so that one variant's freed memory cannot hide the next one's peak.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# (label, attention, backend) of the three rows.
VARIANTS = (("plain", "none", "auto"), ("eager SPEM", "spem", "eager"),
            ("fused SPEM", "spem", "auto"))
ALPHA = 0.1  # weight of the SPEM regulariser in the loss (SPEM.md)


def _proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, from /proc/self/status.

    Not getrusage's ru_maxrss: after fork + exec that starts at the parent's RSS.
    """
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kib) * 1024


def train_rate(attention, backend, device, batch, steps, warmup):
    """Steps/s of forward + backward + SGD step on synthetic CIFAR batches, and peak memory."""
    from spem_kernels.models import cifar_resnet

    device = torch.device(device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a CIFAR trainer sets; warm-up tunes it
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

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss_before = _proc_status_bytes("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:  # the peak includes the warm-up steps
        peak = _proc_status_bytes("VmHWM") - rss_before
        method = "peak RSS growth, VmHWM - VmRSS before the first step"
    return {"steps_per_s": steps / elapsed, "step_ms": elapsed / steps * 1e3,
            "peak_mem_mb": peak / 2**20, "memory_method": method}


def run_variant(attention, backend, device, batch, steps, warmup, timeout_s=1800):
    """train_rate in a fresh process; {"error": ...} instead if that process fails.

    On CPU the peak comes from a second process that runs one step with glibc returning
    every freed block of 64 KiB or more to the OS: with the default malloc, freed tensors
    stay resident at random and repeated runs differ by 20%; this way they agree to 1 MB.
    """
    args = ["--attention", attention, "--backend", backend, "--device", str(device),
            "--batch", str(batch)]
    timed = _run(args + ["--steps", str(steps), "--warmup", str(warmup)], {}, timeout_s)
    if torch.device(device).type != "cpu" or "error" in timed:
        return timed
    peak = _run(args + ["--steps", "1", "--warmup", "0"], {"MALLOC_MMAP_THRESHOLD_": "65536"},
                timeout_s)
    if "error" in peak:
        return peak
    return dict(timed, peak_mem_mb=peak["peak_mem_mb"],
                memory_method="peak RSS growth during one step (VmHWM - VmRSS before it) in "
                              "a fresh process with MALLOC_MMAP_THRESHOLD_=65536")


def _run(args, extra_env, timeout_s):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **extra_env, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.model_bench", *args], cwd=root,
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--attention", required=True, choices=("none", "spem"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    print(json.dumps(train_rate(a.attention, a.backend, a.device, a.batch, a.steps, a.warmup)))


if __name__ == "__main__":
    main()
