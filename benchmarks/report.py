"""Performance report of the SPEM block tail: every implementation side by side, in one run.

    ./bench.sh [options]            (or: python -m benchmarks.report [options])

For each ResNet-164 stage shape, dtype and memory format it times forward and
forward+backward of relu(g * x + residual) for eager (spem_reference), torch.compile of
spem_reference, and each fused backend; it counts the bytes that must move, the achieved
GB/s against the device's measured copy bandwidth, and speedups. A model-level row times
ResNet-164 training steps. Writes <out-dir>/<device>.json (every figure) and .png, and
prints the table last. Targets (GPU op rows, model rows) are checked and summarised.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from itertools import product
from textwrap import shorten

import torch

from spem_kernels import spem_reference
from spem_kernels.backends import NAMES as BACKENDS, compiled_backends, unavailable_reason

from . import model_bench, plot
from .cases import (DIRECTIONS, DTYPES, FULL_BATCH, LAYOUTS, STAGES, bytes_moved,
                    make_inputs, op_for, step_fn)
from .timing import copy_bandwidth, measure

# Op targets, for fused fwd+bwd on a GPU; model target: fused steps/s >= this x plain.
MIN_FRAC_COPY, MIN_VS_COMPILE, MIN_VS_EAGER = 0.8, 1.5, 5.0
MIN_MODEL_RATIO = 0.9
ROTATE_BYTES = 256 * 2**20  # input sets per case are rotated until they span this much


def parse_args(argv):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--batch", type=int, default=FULL_BATCH, help="op batch (default 128)")
    ap.add_argument("--stages", default=",".join(STAGES), help="subset of " + ",".join(STAGES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--directions", default=",".join(DIRECTIONS))
    ap.add_argument("--impls", default=None,
                    help="subset of eager,compile,triton,native (default: all that run here)")
    ap.add_argument("--rotate", type=int, default=None,
                    help="input sets per case (default: enough to span 256 MiB, 2 to 8)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds timed per figure")
    ap.add_argument("--model-batch", type=int, default=128 if cuda else 16)
    ap.add_argument("--model-steps", type=int, default=20 if cuda else 5,
                    help="timed steps per round")
    ap.add_argument("--model-rounds", type=int, default=3,
                    help="interleaved rounds over the variants; the median round is kept")
    ap.add_argument("--model-warmup", type=int, default=5 if cuda else 2)
    ap.add_argument("--no-model", action="store_true", help="skip the model-level rows")
    ap.add_argument("--quick", action="store_true",
                    help="a short check: op batch 16, model batch 8, 2 rounds of 1 step; "
                         "results are named <device>-quick")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.min_time = 16, 0.2
        a.model_batch, a.model_steps, a.model_rounds, a.model_warmup = 8, 1, 2, 1
    a.device = torch.device(a.device)
    fused = compiled_backends(a.device)
    a.impls = a.impls.split(",") if a.impls else ["eager", "compile"] + fused
    for impl in a.impls:
        if impl not in ("eager", "compile") and impl not in fused:
            ap.error(f"implementation {impl!r} does not run on {a.device} "
                     f"(fused backends here: {fused or 'none'})")
    for name, known in (("stages", STAGES), ("dtypes", DTYPES), ("layouts", LAYOUTS),
                        ("directions", DIRECTIONS)):
        values = getattr(a, name).split(",")
        if not set(values) <= set(known):
            ap.error(f"--{name} must be a subset of {','.join(known)}")
        setattr(a, name, values)
    return a


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    return names[0].strip() if names else platform.processor() or "cpu"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(a):
    import triton

    name = device_name(a.device)
    return {
        "device": name,
        "device_type": a.device.type,
        "slug": slug(name) if a.device.type == "cuda" else "cpu-" + slug(name),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.report"] + sys.argv[1:]),
        "load_avg_start": os.getloadavg(),
        "batch": a.batch,
        "quick": a.quick,
        # why each kernel backend is or is not in the report (a failed build shows here)
        "backends": {name: "timed" if name in a.impls
                     else unavailable_reason(name, a.device) or "not requested"
                     for name in BACKENDS if name != "eager"},
    }


def first_call(fn, device):
    """Run fn once (this compiles what needs compiling); (seconds, None) or (None, reason)."""
    start = time.perf_counter()
    try:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # a failed compile or kernel is reported as n/a, not fatal
        first_line = (str(e).strip().splitlines() or [""])[0]
        return None, f"{type(e).__name__}: {first_line[:200]}"
    return time.perf_counter() - start, None


def op_for_impl(impl):
    if impl == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, honest compile time
        return torch.compile(spem_reference, dynamic=False)
    return op_for(impl)


def measure_ops(a, copy_gbps):
    """Yields the rows of each (stage, dtype, layout, direction) case as it is measured."""
    for stage, dtype, layout in product(a.stages, a.dtypes, a.layouts):
        probe = make_inputs(a.batch, stage, dtype, layout, a.device)
        set_bytes = 3 * probe.x.numel() * probe.x.element_size()
        sets = a.rotate or min(8, max(2, math.ceil(ROTATE_BYTES / set_bytes)))
        inputs = [probe] + [make_inputs(a.batch, stage, dtype, layout, a.device)
                            for _ in range(sets - 1)]
        for direction in a.directions:
            case = {"stage": stage, "shape": [a.batch, *STAGES[stage]], "dtype": dtype,
                    "layout": layout, "direction": direction, "input_sets": sets,
                    "bytes": bytes_moved(probe, direction)}
            rows = []
            for impl in a.impls:
                fns = [step_fn(op_for_impl(impl), inp, direction) for inp in inputs]
                seconds, error = first_call(fns[0], a.device)
                row = dict(case, impl=impl, error=error)
                if impl == "compile":
                    row["compile_s"] = seconds
                if error is None:
                    row.update(measure(fns, a.device, min_time_s=a.min_time))
                    row["gb_per_s"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
                    row["frac_copy"] = row["gb_per_s"] / copy_gbps
                print(progress(row), file=sys.stderr, flush=True)
                rows.append(row)
            add_speedups(rows)
            for row in rows:
                row["target"] = check_op(row, a.device)
            yield rows
        del inputs, probe  # freed before the next case allocates its own


def progress(row):
    what = f"{row['stage']} {row['dtype']} {row['layout']} {row['direction']} {row['impl']}"
    if row["error"]:
        return f"  {what}: n/a ({row['error']})"
    return f"  {what}: {row['median_ms']:.3f} ms"


def add_speedups(case_rows):
    base = {r["impl"]: r.get("median_ms") for r in case_rows if not r["error"]}
    for r in case_rows:
        for ref in ("eager", "compile"):
            ok = r.get("median_ms") and base.get(ref)
            r[f"vs_{ref}"] = base[ref] / r["median_ms"] if ok else None


def check_op(row, device):
    """PASS/MISS of a fused fwd+bwd row against the GPU targets; None where none apply."""
    fused_fwd_bwd = row["impl"] not in ("eager", "compile") and row["direction"] == "fwd+bwd"
    if device.type != "cuda" or not fused_fwd_bwd:
        return None
    if row["error"]:
        return "MISS (did not run)"
    misses = []
    if row["frac_copy"] < MIN_FRAC_COPY:
        misses.append(f"bw {row['frac_copy']:.0%}<{MIN_FRAC_COPY:.0%}")
    for ref, need in (("compile", MIN_VS_COMPILE), ("eager", MIN_VS_EAGER)):
        got = row[f"vs_{ref}"]
        if got is None or got < need:
            misses.append(f"{'n/a' if got is None else f'{got:.1f}x'} {ref}<{need}x")
    return "PASS" if not misses else "MISS (" + ", ".join(misses) + ")"


def measure_models(a):
    fused = compiled_backends(a.device)
    labels = [label for label, _, _ in model_bench.VARIANTS
              if fused or not label.startswith("fused")]
    print(f"  model: {', '.join(labels)} ...", file=sys.stderr, flush=True)
    rows = model_bench.measure(labels, str(a.device), a.model_batch, a.model_steps,
                               a.model_rounds, a.model_warmup)
    if fused:
        rows[-1]["resolved_backend"] = fused[0]  # "auto" tries the fused backends in this order
    else:
        label, attention, backend = model_bench.VARIANTS[-1]
        rows.append({"label": label, "attention": attention, "backend": backend,
                     "batch": a.model_batch, "error": f"no fused backend on {a.device.type}"})
    plain = rows[0].get("steps_per_s")
    for r in rows:
        r["vs_plain"] = r["steps_per_s"] / plain if plain and r.get("steps_per_s") else None
    fused_row = rows[-1]
    if not fused_row["error"]:
        ok = fused_row["vs_plain"] is not None and fused_row["vs_plain"] >= MIN_MODEL_RATIO
        fused_row["target"] = "PASS" if ok else (
            f"MISS ({fused_row['vs_plain']:.2f}x plain < {MIN_MODEL_RATIO}x)"
            if fused_row["vs_plain"] else "MISS (no plain figure)")
    return rows


def summarize(op_rows, model_rows):
    checked = [(describe(r), r["target"]) for r in op_rows if r.get("target")]
    checked += [(f"model {r['label']}", r["target"]) for r in model_rows if r.get("target")]
    misses = [f"{what}: {verdict}" for what, verdict in checked if verdict != "PASS"]
    return {"checked": len(checked), "passed": len(checked) - len(misses), "misses": misses}


def describe(row):
    return f"{row['stage']} {row['dtype']} {row['layout']} {row['direction']} {row['impl']}"


def fmt(value, spec):
    """value formatted by spec, or "-" padded to the same width."""
    return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def table(result):
    meta, bw = result["meta"], result["copy_bandwidth"]
    lines = [f"SPEM block tail relu(g*x + residual) on {meta['device']} ({meta['device_type']}, "
             f"{meta['cpu_threads']} CPU threads), torch {meta['torch']}, triton {meta['triton']}, "
             f"CUDA {meta['cuda']}; {meta['date']}",
             f"copy bandwidth (read + write of a {bw['bytes'] // 2 // 2**20} MiB tensor): "
             f"{bw['gb_per_s']:.1f} GB/s; load average {meta['load_avg_start'][0]:.2f} at start, "
             f"{meta['load_avg_end'][0]:.2f} at end",
             "kernel backends: " + "; ".join(f"{name}: {shorten(why, 100)}"
                                             for name, why in meta["backends"].items()),
             ""]
    head = (f"{'stage':7} {'N,C,H,W':14} {'dtype':8} {'layout':13} {'dir':7} {'impl':8} "
            f"{'ms':>9} {'MB':>7} {'GB/s':>7} {'%copy':>6} {'x eager':>7} {'x comp':>7}  target")
    lines += [head, "-" * len(head)]
    previous = None
    for r in result["ops"]:
        case = (r["stage"], r["dtype"], r["layout"], r["direction"])
        if previous and case[:3] != previous[:3]:
            lines.append("")
        previous = case
        shape = ",".join(map(str, r["shape"]))
        left = (f"{r['stage']:7} {shape:14} {r['dtype']:8} {r['layout']:13} {r['direction']:7} "
                f"{r['impl']:8} ")
        if r["error"]:
            lines.append(left + f"n/a: {r['error']}")
            continue
        lines.append(left + f"{r['median_ms']:9.3f} {r['bytes'] / 1e6:7.1f} {r['gb_per_s']:7.1f} "
                     f"{r['frac_copy']:6.1%} {fmt(r['vs_eager'], '7.2f')} "
                     f"{fmt(r['vs_compile'], '7.2f')}  {r.get('target') or ''}")
    if result["model"]:
        lines += ["", f"ResNet-164 (CIFAR-10) training step, synthetic data, SGD; steps/s: median "
                      f"of interleaved rounds; memory: {memory_method(result['model'])}",
                  f"{'model':28} {'batch':>5} {'steps/s':>8} {'ms/step':>8} {'peak MB':>8} "
                  f"{'x plain':>7}  target"]
        for r in result["model"]:
            label = r["label"] + (f" ({r['resolved_backend']})" if r.get("resolved_backend") else
                                  f" (backend={r['backend']})" if r["attention"] == "spem" else "")
            if r["error"]:
                lines.append(f"{label:28} {r['batch']:5} n/a: {r['error']}")
                continue
            lines.append(f"{label:28} {r['batch']:5} {r['steps_per_s']:8.3f} "
                         f"{1e3 / r['steps_per_s']:8.1f} {r['peak_mem_mb']:8.0f} "
                         f"{fmt(r['vs_plain'], '7.2f')}  {r.get('target') or ''}")
    s = result["summary"]
    lines += ["", f"targets: {s['passed']}/{s['checked']} PASS"
              + (" (op targets apply on GPU only)" if meta["device_type"] != "cuda" else "")]
    lines += [f"  {m}" for m in s["misses"]]
    return "\n".join(lines)


def memory_method(model_rows):
    return next((r["memory_method"] for r in model_rows if r.get("memory_method")), "n/a")


def save(result, stem):
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None):
    a = parse_args(argv)
    meta = environment(a)
    print(f"SPEM report on {meta['device']}: measuring copy bandwidth ...", file=sys.stderr)
    bw = copy_bandwidth(a.device, 1 << 30 if a.device.type == "cuda" else 256 << 20)
    os.makedirs(a.out_dir, exist_ok=True)
    stem = os.path.join(a.out_dir, meta["slug"] + ("-quick" if a.quick else ""))
    result = {"meta": meta, "copy_bandwidth": bw, "ops": [], "model": [],
              "targets": {"min_frac_copy": MIN_FRAC_COPY, "min_vs_compile": MIN_VS_COMPILE,
                          "min_vs_eager": MIN_VS_EAGER, "min_model_vs_plain": MIN_MODEL_RATIO}}
    for rows in measure_ops(a, bw["gb_per_s"]):
        result["ops"] += rows
        save(result, stem)  # a run cut short (a time limit) still leaves what it measured
    result["model"] = [] if a.no_model else measure_models(a)
    meta["load_avg_end"] = os.getloadavg()
    result["summary"] = summarize(result["ops"], result["model"])
    save(result, stem)
    plot.write(result, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png\n")
    print(table(result))


if __name__ == "__main__":
    main()
