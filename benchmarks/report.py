"""Performance report of the SPEM block tail: where the time goes, every implementation side
by side, in one run.

    ./bench.sh [options]            (or: python -m benchmarks.report [options])

Model rows first: ResNet-164 training steps, plain / eager SPEM / fused SPEM, in eager mode
and (GPU) captured in a CUDA graph, in fp32 NCHW and (GPU) bf16 autocast + channels_last, with
the extra activation memory of each; with --model-compile also torch.compile(model), with its
compile time. Then op rows: for each ResNet-164 stage shape (or ImageNet ResNet-50 plane:
--stages imagenet), dtype and memory format, forward and forward+backward of the block tail
in its two forms (--ops): spem, relu(g * x + residual), for eager (spem_reference),
torch.compile of spem_reference and each fused backend; spem_bn, relu(g * bn(y) +
residual) in training, for eager (the composition spem_bn_reference: F.batch_norm, then
spem_reference), torch.compile of it, the plain network's tail relu(bn(y) + residual)
eager ("plain") and compiled ("plain-compile"), and each fused backend. Each is timed two
ways: as called from Python (host cost included; a case's implementations in interleaved
rounds, so that load on a shared machine hits them alike) and, on a GPU, GPU-only (the same
call captured in a CUDA graph and replayed); each with the bytes that must move, the
achieved GB/s and its share of the device's copy bandwidth, speedups over eager and
torch.compile (from Python), and for each fused backend its target: no slower than the
best of the two; for spem_bn also no slower than the plain tail, and forward+backward at
least 3x faster than the eager composition.
Writes <out-dir>/<device>.json (after every case, so a run cut short keeps what it
measured) and .png, prints the table last, and marks the targets PASS/MISS. With
--time-budget it starts nothing it cannot finish in time and ends with what it measured.
Timers: spem_kernels.timing; cases: spem_kernels.cases.
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from itertools import product
from pathlib import Path
from textwrap import shorten

import torch

from spem_kernels.backends import NAMES as BACKENDS, compiled_backends, unavailable_reason
from spem_kernels.cases import (ALL_STAGES, DIRECTIONS, DTYPES, LAYOUTS, OPS, SHAPE_SETS,
                                block_tail_call, stage_shape)
from spem_kernels.provenance import device_name
from spem_kernels.timing import (QUIET_OTHERS_CPUS, OthersCpu, copy_bandwidth, synchronize,
                                 time_calls, time_interleaved, time_replays)

from . import model_bench, plot

# scripts/cuda_resources.py by its path (scripts/ is not a package).
_spec = importlib.util.spec_from_file_location(
    "cuda_resources", Path(__file__).resolve().parents[1] / "scripts" / "cuda_resources.py")
cuda_resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_resources)

# Targets. Model: fused / plain step time at the batch below, per mode (GPU: fp32 and bf16;
# CPU: eager mode, fp32). Op, every row of a fused backend, every device: no slower than the
# best peer (eager or torch.compile(eager), whichever is faster in that row), from Python and
# (GPU) GPU-only. Op (GPU, fused fwd+bwd) also: GPU-only share of the copy bandwidth per
# stage, and speedups from Python over eager and over torch.compile(eager). spem_bn, every
# row of a fused backend, every device: also no slower than the plain network's tail
# relu(bn(y) + residual) from Python, and fwd+bwd at least OP_BN_MIN_VS_EAGER times faster
# than the eager composition (figures set for CPU, batch 16; GPU-only copy share and speedups
# stay spem's).
MODEL_MAX_RATIO = {"fused SPEM": {"eager": 1.10, "graph": 1.05},
                   "fused SPEM+BN": {"eager": 1.00, "graph": 1.00}}
# Memory (BatchNorm fused): bytes kept for the backward at most this much over plain's.
MODEL_MAX_SAVED_VS_PLAIN = {"fused SPEM+BN": 1.05}
MODEL_TARGET_BATCH = {"cuda": 128, "cpu": 16}
OP_MAX_VS_BEST_PEER = 1.0
OP_MIN_FRAC_COPY = {"stage1": 0.8, "stage2": 0.8, "stage3": 0.6}  # ImageNet planes: by size
OP_MIN_VS_EAGER, OP_MIN_VS_COMPILE = 5.0, 1.5
OP_BN_MAX_VS_PLAIN, OP_BN_MIN_VS_EAGER = 1.0, 3.0
PEERS = ("eager", "compile")
PLAINS = ("plain", "plain-compile")  # spem_bn's rows only: the plain network's tail
COMPILED = {"compile": "eager", "plain-compile": "plain"}  # what each torch.compiles
ROTATE_BYTES = 256 * 2**20  # input sets per case are rotated until they span this much
# Model options whose defaults depend on the device (bf16 and graphs are GPU rows).
DEVICE_DEFAULTS = {"cuda": {"model_batch": 128, "model_precisions": "fp32,bf16",
                            "model_steps": 20, "model_warmup": 5},
                   "cpu": {"model_batch": 16, "model_precisions": "fp32", "model_steps": 5,
                           "model_warmup": 2}}
QUICK = {"batch": 16, "min_time": 0.05, "model_batch": 8, "model_steps": 1, "model_rounds": 2,
         "model_warmup": 1}
# --model-variants names -> model_bench.VARIANTS labels
MODEL_VARIANTS = {"plain": "plain", "eager": "eager SPEM", "fused": "fused SPEM",
                  "fused-bn": "fused SPEM+BN"}
# Seconds a model process needs at least (start, build, warm-up, a few rounds): with
# --time-budget, one is not started with less left.
MODEL_PROCESS_MIN_S = 30


def _per_device(name):
    return "default: " + ", ".join(f"{v[name]} on {d}" for d, v in DEVICE_DEFAULTS.items())


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda where there is a GPU)")
    parser.add_argument("--batch", type=int, default=None,
                        help="op batch (default: " + ", ".join(
                            f"{batch} for {name}" for name, (_, batch) in SHAPE_SETS.items()) + ")")
    parser.add_argument("--stages", default="cifar",
                        help="shape sets (" + ", ".join(
                            f"{name}: {','.join(stages)}"
                            for name, (stages, _) in SHAPE_SETS.items())
                        + ") or stages, comma-separated (default: cifar)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--directions", default=",".join(DIRECTIONS))
    parser.add_argument("--ops", default=",".join(OPS),
                        help="op rows of spem (relu(g*x + r)), spem_bn (relu(g*bn(y) + r)) or "
                             "both (default: " + ",".join(OPS) + ")")
    parser.add_argument("--impls", default=None,
                        help="subset of " + ",".join(PEERS + PLAINS) + ",triton,native (default: "
                             "all that run here; " + ",".join(PLAINS) + ": spem_bn rows only)")
    parser.add_argument("--rotate", type=int, default=None,
                        help="input sets per case (default: enough to span 256 MiB, 2 to 8)")
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="seconds timed per op figure (each of from-Python and GPU-only)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds over a case's implementations (from Python); "
                             "the median round is kept")
    parser.add_argument("--no-model", action="store_true", help="skip the model rows")
    parser.add_argument("--no-ops", action="store_true", help="skip the op rows")
    parser.add_argument("--no-cuda-resources", action="store_true",
                        help="skip the CUDA kernels' resource table (printed where a CUDA "
                             "toolkit is found: nvcc compiles for sm_80 and sm_90, ~1 min)")
    parser.add_argument("--model-variants", default=",".join(MODEL_VARIANTS),
                        help="subset of " + ",".join(MODEL_VARIANTS))
    parser.add_argument("--model-batch", type=int, help=_per_device("model_batch"))
    parser.add_argument("--model-depth", type=int, default=164, help="ResNet depth, 9n + 2")
    parser.add_argument("--model-precisions",
                        help="subset of " + ",".join(model_bench.PRECISIONS) + " (bf16: autocast "
                             "+ channels_last; " + _per_device("model_precisions") + ")")
    parser.add_argument("--model-steps", type=int,
                        help="timed steps per round (" + _per_device("model_steps") + ")")
    parser.add_argument("--model-rounds", type=int, default=3,
                        help="interleaved rounds over the variants; the median round is kept")
    parser.add_argument("--model-warmup", type=int,
                        help="untimed steps per variant, before capture for graphs ("
                             + _per_device("model_warmup") + ")")
    parser.add_argument("--model-compile", action="store_true",
                        help="also torch.compile(model) of each variant (ResNet-164: minutes of "
                             "compilation per variant)")
    parser.add_argument("--quick", action="store_true",
                        help="a short check, results named <device>-quick; its defaults: "
                             + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no measurement that cannot end in time, then write "
                             "what was measured (default: no limit)")
    parser.add_argument("--tag", default=None,
                        help="added to the output name: <device>[-quick][-TAG].json")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    first = parser.parse_known_args(argv)[0]
    parser.set_defaults(**DEVICE_DEFAULTS[torch.device(first.device).type])
    if first.quick:
        parser.set_defaults(**QUICK)
    a = parser.parse_args(argv)  # options given explicitly win over both
    a.device = torch.device(a.device)
    fused = compiled_backends(a.device)
    a.impls = a.impls.split(",") if a.impls else [*PEERS, *PLAINS, *fused]
    for impl in a.impls:
        if impl not in PEERS + PLAINS and impl not in fused:
            parser.error(f"implementation {impl!r} does not run on {a.device} "
                         f"(fused backends here: {fused or 'none'})")
    a.stages = ",".join(",".join(SHAPE_SETS[s][0]) if s in SHAPE_SETS else s
                        for s in a.stages.split(","))
    for name, known in (("stages", ALL_STAGES), ("dtypes", DTYPES), ("layouts", LAYOUTS),
                        ("directions", DIRECTIONS), ("model_precisions", model_bench.PRECISIONS),
                        ("model_variants", MODEL_VARIANTS), ("ops", OPS)):
        values = list(dict.fromkeys(getattr(a, name).split(",")))
        if not set(values) <= set(known):
            parser.error(f"--{name.replace('_', '-')} must be a subset of {','.join(known)}")
        setattr(a, name, values)
    a.deadline = None if a.time_budget is None else time.perf_counter() + a.time_budget
    a.cut_short = None  # why measurements were left out, once the budget runs out
    return a


def seconds_left(a):
    """Seconds until --time-budget runs out (None: no budget)."""
    return None if a.deadline is None else a.deadline - time.perf_counter()


def out_of_time(a, need_s=0.0):
    """Whether the budget cannot cover `need_s` more seconds; the first time, says so."""
    left = seconds_left(a)
    if left is None or left > need_s:
        return False
    if not a.cut_short:
        a.cut_short = f"--time-budget {a.time_budget:g} s ran out: later parts were not measured"
        print(f"  {a.cut_short}", file=sys.stderr, flush=True)
    return True


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
        # glibc's allocator settings (bench.sh sets two; docs/benchmarks.md)
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "batch": a.batch,
        "stages": a.stages,
        "ops": a.ops,
        "min_time_s": a.min_time,
        "rounds": a.rounds,
        "quick": a.quick,
        # why each kernel backend is or is not in the report (a failed build shows here)
        "backends": {name: "timed" if name in a.impls
                     else unavailable_reason(name, a.device) or "not requested"
                     for name in BACKENDS if name != "eager"},
    }


def attempt(fn):
    """(fn(), None), or (None, reason) where it raises: a failed compile, kernel or capture
    is reported as n/a, not fatal."""
    try:
        return fn(), None
    except Exception as e:
        return None, model_bench.failure_reason(e)


def impls_of(op, impls):
    """The implementations among `impls` that op `op`'s rows time (the plain tail: spem_bn's)."""
    return [impl for impl in impls if op == "spem_bn" or impl not in PLAINS]


def op_for_impl(op, impl):
    """The callable that `impl` names for op `op` (cases.OPS): "compile" and "plain-compile"
    are torch.compile of the eager and of the plain one."""
    make_op = OPS[op][1]
    if impl in COMPILED:
        return torch.compile(make_op(COMPILED[impl]), dynamic=False)
    return make_op(impl)


def cell(t, nbytes, copy_gbps):
    """A table cell: a Timing with GB/s and share of the copy bandwidth."""
    gb_per_s = nbytes / (t.median_ms * 1e-3) / 1e9
    return dict(t._asdict(), gb_per_s=gb_per_s, frac_copy=gb_per_s / copy_gbps)


def timed_cell(measure, nbytes, copy_gbps):
    """cell() of measure()'s Timing, or {"error": reason}."""
    t, error = attempt(measure)
    return {"error": error} if error else cell(t, nbytes, copy_gbps)


def time_python(calls, device, rounds, min_time):
    """{impl: Timing} from Python, every implementation of a case in interleaved rounds
    (spem_kernels.timing.time_interleaved): a burst of load on a shared machine, or a clock
    change, hits them all alike, so their ratios hold even where their times do not. Each
    round times about min_time / rounds seconds of each, from a first estimate."""
    estimate = {impl: time_calls(fns, device, reps=len(fns), warmup=0).median_ms
                for impl, fns in calls.items()}
    reps = {impl: max(1, math.ceil(min_time / rounds * 1e3 / ms)) for impl, ms in estimate.items()}
    return time_interleaved(calls, device, rounds=rounds, reps=reps, warmup=0)


def measure_ops(a, copy_gbps):
    """Yields the rows of each (stage, dtype, layout, op, direction) case as it is measured."""
    on_gpu = a.device.type == "cuda"
    for stage, dtype, layout, op in product(a.stages, a.dtypes, a.layouts, a.ops):
        if out_of_time(a):
            return
        impls = impls_of(op, a.impls)

        def new_set():
            return OPS[op][0](stage_shape(stage, a.batch), DTYPES[dtype], LAYOUTS[layout],
                              a.device, requires_grad=True)

        probe = new_set()
        set_bytes = 3 * probe.x.numel() * probe.x.element_size()
        sets = a.rotate or min(8, max(2, math.ceil(ROTATE_BYTES / set_bytes)))
        inputs = [probe] + [new_set() for _ in range(sets - 1)]
        for direction in a.directions:
            start = time.perf_counter()
            nbytes = probe.bytes_moved(direction)
            case = {"op": op, "stage": stage, "shape": list(stage_shape(stage, a.batch)),
                    "dtype": dtype, "layout": layout, "direction": direction,
                    "input_sets": sets, "bytes": nbytes}
            load_start, others = os.getloadavg()[0], OthersCpu()
            rows, calls = [], {}
            if set(impls) & set(COMPILED):
                torch._dynamo.reset()  # a fresh cache per case: no recompile limit, honest time
            for impl in impls:
                if out_of_time(a):
                    break  # the case's rows so far still go out
                fns = [block_tail_call(op_for_impl(op, impl), inp, direction) for inp in inputs]
                row = dict(case, impl=impl)
                first = time.perf_counter()
                _, error = attempt(lambda: (fns[0](), synchronize(a.device)))  # compiles
                if impl in COMPILED:
                    row["compile_s"] = None if error else time.perf_counter() - first
                if error:
                    row["python"] = {"error": error}
                    row["graph"] = {"error": error} if on_gpu else None
                else:
                    calls[impl] = fns
                    row["graph"] = timed_cell(
                        lambda: time_replays(fns, min_time_s=a.min_time), nbytes, copy_gbps
                    ) if on_gpu else None  # CUDA graphs need a GPU
                rows.append(row)
            timings, error = attempt(lambda: time_python(calls, a.device, a.rounds, a.min_time))
            for row in rows:
                if row["impl"] in calls:
                    row["python"] = (cell(timings[row["impl"]], nbytes, copy_gbps) if timings
                                     else {"error": error})
                row["load_avg"] = [load_start, os.getloadavg()[0]]  # 1-minute, case start/end
                row["others_cpus"] = others.cpus()  # other processes' CPUs busy in the case
                print(progress(row), file=sys.stderr, flush=True)
            add_speedups(rows)
            for row in rows:
                row["target"] = check_op(row, a.device)
            print(f"  {op} {stage} {dtype} {layout} {direction}: "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            if rows:
                yield rows
        del inputs, probe  # freed before the next case allocates its own


def describe(row):
    return (f"{row['op']} {row['stage']} {row['dtype']} {row['layout']} {row['direction']} "
            f"{row['impl']}")


def progress(row):
    cells = [f"{name} " + (f"{c['median_ms']:.3f} ms" if "median_ms" in c else
                           f"n/a ({c['error']})")
             for name, c in (("from Python", row["python"]), ("GPU-only", row["graph"])) if c]
    return f"  {describe(row)}: " + ", ".join(cells)


def add_speedups(case_rows):
    """Per row: speedups from Python over eager and over torch.compile(eager); where the case
    has the plain tail (spem_bn), the row's time over plain's and over plain-compile's
    (vs_plain, vs_plain_compile); for a fused backend also its time over the best peer's (the
    faster of eager and compile), from Python and (GPU) GPU-only: vs_best_peer,
    vs_best_peer_graph, best_peer."""
    def ms(row, timing):
        return (row[timing] or {}).get("median_ms")

    base = {r["impl"]: r for r in case_rows}
    for r in case_rows:
        mine = ms(r, "python")
        for ref in PEERS:
            theirs = ms(base[ref], "python") if ref in base else None
            r[f"vs_{ref}"] = theirs / mine if mine and theirs else None
        for ref in PLAINS:
            if ref in base:
                theirs = ms(base[ref], "python")
                r["vs_" + ref.replace("-", "_")] = mine / theirs if mine and theirs else None
        if r["impl"] in PEERS:
            continue
        for timing, key in (("python", "vs_best_peer"), ("graph", "vs_best_peer_graph")):
            peers = {ref: ms(base[ref], timing) for ref in PEERS if ref in base}
            peers = {ref: t for ref, t in peers.items() if t}
            if peers and ms(r, timing):
                best = min(peers, key=peers.get)
                r[key] = ms(r, timing) / peers[best]
                if timing == "python":
                    r["best_peer"] = best


def check_op(row, device):
    """PASS/MISS of a fused backend's row (None for the other rows): every row, no slower than
    the best peer from Python and (GPU) GPU-only; spem_bn also no slower than the plain tail
    (from Python) and fwd+bwd OP_BN_MIN_VS_EAGER x eager; spem on a GPU, fwd+bwd, also the
    copy-bandwidth share and the speedups over each peer."""
    if row["impl"] in PEERS + PLAINS:
        return None
    misses = []
    checks = [("vs_best_peer", "")] + ([("vs_best_peer_graph", " GPU-only")]
                                       if device.type == "cuda" else [])
    for key, what in checks:
        got = row.get(key)
        if got is None or got > OP_MAX_VS_BEST_PEER:
            misses.append(f"{'n/a' if got is None else f'{got:.2f}x'} best peer{what} "
                          f"> {OP_MAX_VS_BEST_PEER:.2f}x")
    bn = row["op"] == "spem_bn"
    if bn:
        got = row.get("vs_plain")
        if got is None or got > OP_BN_MAX_VS_PLAIN:
            misses.append(f"{'n/a' if got is None else f'{got:.2f}x'} plain "
                          f"> {OP_BN_MAX_VS_PLAIN:.2f}x")
        got = row.get("vs_eager")
        if row["direction"] == "fwd+bwd" and (got is None or got < OP_BN_MIN_VS_EAGER):
            misses.append(f"{'n/a' if got is None else f'{got:.1f}x'} eager "
                          f"< {OP_BN_MIN_VS_EAGER}x")
    elif device.type == "cuda" and row["direction"] == "fwd+bwd":
        plane = row["shape"][2] * row["shape"][3]
        need = OP_MIN_FRAC_COPY.get(row["stage"], 0.8 if plane >= 256 else 0.6)
        got = row["graph"].get("frac_copy")
        if got is None or got < need:
            misses.append(f"GPU-only {'n/a' if got is None else f'{got:.0%}'} of copy < {need:.0%}")
        for ref, need in (("eager", OP_MIN_VS_EAGER), ("compile", OP_MIN_VS_COMPILE)):
            got = row[f"vs_{ref}"]
            if got is None or got < need:
                misses.append(f"{'n/a' if got is None else f'{got:.1f}x'} {ref} < {need}x")
    if misses:
        return "MISS (" + ", ".join(misses) + ")"
    passed = [f"{row['vs_best_peer']:.2f}x best peer"]
    if bn:
        passed.append(f"{row['vs_plain']:.2f}x plain")
        if row["direction"] == "fwd+bwd":
            passed.append(f"{row['vs_eager']:.1f}x eager")
    return "PASS (" + ", ".join(passed) + ")"


def measure_models(a, save_rows, seconds):
    """The model rows: one timing process per precision and mode, then the memory processes;
    save_rows(rows) after each, seconds[part] = how long it took."""
    fused = compiled_backends(a.device)
    wanted = [MODEL_VARIANTS[v] for v in a.model_variants]
    labels = [label for label in model_bench.VARIANTS
              if label in wanted and (fused or not label.startswith("fused"))]
    modes = ["eager", "graph"] if a.device.type == "cuda" else ["eager"]  # graphs: CUDA only
    modes += ["compile"] if a.model_compile else []
    rows = []
    for mode, precision in product(modes, a.model_precisions):
        if out_of_time(a, MODEL_PROCESS_MIN_S):
            break
        start = time.perf_counter()
        print(f"  model {precision} {mode}: {', '.join(labels)} ...", file=sys.stderr,
              flush=True)
        rows += model_bench.measure_time(labels, precision, mode, str(a.device),
                                         a.model_batch, a.model_depth, a.model_steps,
                                         a.model_rounds, a.model_warmup, deadline=a.deadline)
        for label in wanted if not fused else ():
            if label.startswith("fused"):
                rows.append({"label": label, **model_bench.VARIANTS[label]._asdict(),
                             "precision": precision, "mode": mode, "depth": a.model_depth,
                             "batch": a.model_batch,
                             "error": f"no fused backend on {a.device.type}"})
        finish_model_rows(rows, fused, a)
        save_rows(rows)
        seconds[f"model {precision} {mode}"] = time.perf_counter() - start
    keys = [(r["label"], r["precision"]) for r in rows
            if r["mode"] == "eager" and r["label"] in labels]
    if not keys or out_of_time(a, MODEL_PROCESS_MIN_S):
        return rows
    start = time.perf_counter()
    print(f"  model memory: {len(keys)} processes ...", file=sys.stderr, flush=True)
    for (label, precision), memory in model_bench.measure_memory(
            keys, str(a.device), a.model_batch, a.model_depth, deadline=a.deadline).items():
        row = next(r for r in rows if (r["label"], r["precision"], r["mode"]) ==
                   (label, precision, "eager"))
        row["memory"] = memory
    check_memory(rows)
    save_rows(rows)
    seconds["model memory"] = time.perf_counter() - start
    return rows


def finish_model_rows(rows, fused, a):
    """x plain (step time over plain's, same precision and mode) and the model targets."""
    for r in rows:
        if r["label"].startswith("fused") and fused:
            r["resolved_backend"] = fused[0]  # "auto" tries the fused backends in this order
        plain = next((p.get("ms_per_step") for p in rows if p["label"] == "plain"
                      and (p["precision"], p["mode"]) == (r["precision"], r["mode"])), None)
        r["x_plain"] = r["ms_per_step"] / plain if plain and r.get("ms_per_step") else None
        r["target"] = check_model(r, a)


def check_model(row, a):
    """PASS/MISS of a fused row against the model targets (eager mode and graphs, ResNet-164
    at the target batch); None where none apply."""
    limit = MODEL_MAX_RATIO.get(row["label"], {}).get(row["mode"])
    if (limit is None or row["depth"] != 164
            or row["batch"] != MODEL_TARGET_BATCH[a.device.type]):
        return None
    if row["x_plain"] is None:
        return "MISS (" + (row.get("error") or "no plain figure") + ")"
    if row["x_plain"] <= limit:
        return "PASS"
    return f"MISS ({row['x_plain']:.2f}x plain > {limit}x)"


def check_memory(rows):
    """The memory targets (ResNet-164: bytes kept for the backward vs the plain network's,
    same precision): row["memory_target"] PASS/MISS where one applies."""
    for r in rows:
        limit = MODEL_MAX_SAVED_VS_PLAIN.get(r["label"])
        saved = r.get("memory", {}).get("saved_mb")
        plain = next((p.get("memory", {}).get("saved_mb") for p in rows
                      if p["label"] == "plain" and p["precision"] == r["precision"]
                      and p["mode"] == r["mode"]), None)
        if limit is None or r["mode"] != "eager" or r["depth"] != 164:
            continue
        if saved is None or not plain:
            r["memory_target"] = "MISS (no saved-bytes figure)"
            continue
        r["saved_vs_plain"] = saved / plain
        r["memory_target"] = ("PASS" if saved / plain <= limit else
                              f"MISS ({saved / plain:.3f}x plain's kept for backward > {limit}x)")


def summarize(meta, op_rows, model_rows):
    checked = [(describe(r), r["target"]) for r in op_rows if r.get("target")]
    checked += [(f"model {r['precision']} {r['mode']} {r['label']}", r["target"])
                for r in model_rows if r.get("target")]
    checked += [(f"model {r['precision']} {r['label']} memory", r["memory_target"])
                for r in model_rows if r.get("memory_target")]
    misses = [f"{what}: {verdict}" for what, verdict in checked if not verdict.startswith("PASS")]
    loads = [meta["load_avg_start"][0], meta["load_avg_end"][0]]
    loads += [load for r in op_rows for load in r.get("load_avg", [])]
    others = [r["others_cpus"] for r in op_rows if r.get("others_cpus") is not None]
    others += [meta["others_cpus"]] if meta.get("others_cpus") is not None else []
    return {"checked": len(checked), "passed": len(checked) - len(misses), "misses": misses,
            "max_load": max(loads), "max_others_cpus": max(others, default=None),
            "quiet": max(others, default=0.0) < QUIET_OTHERS_CPUS}


def quiet_line(summary):
    """What a run that was not quiet says, or None."""
    if summary["quiet"]:
        return None
    return (f"NOT QUIET: other processes kept up to {summary['max_others_cpus']:.2f} CPUs busy "
            f"during a case (quiet: < {QUIET_OTHERS_CPUS}; this run's own threads not counted): "
            "calls also waited for a core, and these times and ratios may not reproduce")


def fmt(value, spec):
    """value formatted by spec, or "-" padded to the same width."""
    return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def op_cells(cell):
    """ms, GB/s and share of copy of one timing cell, 24 characters wide."""
    if cell is None or "error" in cell:
        return f"{'-' if cell is None else 'n/a':>24}"
    return f"{cell['median_ms']:9.3f} {cell['gb_per_s']:7.1f} {cell['frac_copy']:6.1%}"


PRECISION_NAMES = {"fp32": "fp32 NCHW", "bf16": "bf16 autocast + channels_last"}


def table(result):
    meta, bw = result["meta"], result["copy_bandwidth"]
    lines = [f"SPEM block tail, spem: relu(g*x + residual), spem_bn: relu(g*bn(y) + residual) "
             f"on {meta['device']} ({meta['device_type']}, "
             f"{meta['cpu_threads']} CPU threads), torch {meta['torch']}, triton {meta['triton']}, "
             f"CUDA {meta['cuda']}; {meta['date']}",
             f"copy bandwidth (read + write of a {bw['bytes'] // 2 // 2**20} MiB tensor): "
             f"{bw['gb_per_s']:.1f} GB/s; load average {meta['load_avg_start'][0]:.2f} at start, "
             f"{meta['load_avg_end'][0]:.2f} at end",
             "kernel backends: " + "; ".join(f"{name}: {shorten(why, 100)}"
                                             for name, why in meta["backends"].items()),
             *filter(None, [quiet_line(result["summary"])]),
             "medians; from Python: CUDA events around back-to-back calls, host cost included "
             "(CPU: perf_counter), a case's implementations in "
             f"{meta.get('rounds', 1)} interleaved rounds (the median round); GPU-only: replays "
             "of the call captured in a CUDA graph (do_bench; '-' without a GPU); x eager, "
             "x comp: from Python; /plain, /p-comp (spem_bn): time over the plain tail "
             "relu(bn(y) + residual)'s, eager and compiled; target: a fused backend no slower "
             "than the best peer (eager or compile), for spem_bn also no slower than plain and "
             f"fwd+bwd {OP_BN_MIN_VS_EAGER:g}x eager; others: CPUs that other processes kept busy "
             "during the case",
             *([f"CUT SHORT: {meta['cut_short']}"] if meta.get("cut_short") else []),
             ""]
    head = (f"{'op':7} {'stage':7} {'N,C,H,W':14} {'dtype':8} {'layout':13} {'dir':7} "
            f"{'impl':13} {'MB':>7} | {'from Python: ms':>15} {'GB/s':>7} {'%copy':>6} | "
            f"{'GPU-only: ms':>12} {'GB/s':>7} {'%copy':>6} | {'x eager':>7} {'x comp':>7} "
            f"{'/plain':>6} {'/p-comp':>7} {'others':>6}  target")
    lines += [head, "-" * len(head)]
    previous = None
    for r in result["ops"]:
        op = r["op"]
        if previous and (op, r["stage"], r["dtype"], r["layout"]) != previous:
            lines.append("")
        previous = (op, r["stage"], r["dtype"], r["layout"])
        shape = ",".join(map(str, r["shape"]))
        lines.append(f"{op:7} {r['stage']:7} {shape:14} {r['dtype']:8} {r['layout']:13} "
                     f"{r['direction']:7} {r['impl']:13} {r['bytes'] / 1e6:7.1f} | "
                     f"{op_cells(r['python']):>30} | {op_cells(r['graph']):>27} | "
                     f"{fmt(r['vs_eager'], '7.2f')} {fmt(r['vs_compile'], '7.2f')} "
                     f"{fmt(r.get('vs_plain'), '6.2f')} {fmt(r.get('vs_plain_compile'), '7.2f')} "
                     f"{fmt(r.get('others_cpus'), '6.2f')}  {r.get('target') or ''}")
        if "error" in r["python"]:
            lines.append(f"{'':65}n/a: {r['python']['error']}")
        elif r["graph"] and "error" in r["graph"]:
            lines.append(f"{'':65}GPU-only n/a: {r['graph']['error']}")
    compile_s = [r["compile_s"] for r in result["ops"] if r.get("compile_s")]
    if compile_s:
        lines.append(f"torch.compile (compile, plain-compile): {sum(compile_s):.0f} s of "
                     f"compilation over {len(compile_s)} rows (at most {max(compile_s):.1f} s)")
    if result["model"]:
        lines += ["", model_heading(result["model"]),
                  f"{'precision':30} {'mode':7} {'variant':22} {'ms/step':>8} {'steps/s':>8} "
                  f"{'x plain':>7} {'act MiB':>8} {'kept MiB':>8} {'compile s':>9}  target"]
        for r in result["model"]:
            label = r["label"] + (f" ({r['resolved_backend']})" if r.get("resolved_backend")
                                  else "")
            left = f"{PRECISION_NAMES[r['precision']]:30} {r['mode']:7} {label:22} "
            if r.get("error"):
                lines.append(left + f"n/a: {r['error']}")
                continue
            memory = r.get("memory", {})
            lines.append(left + f"{r['ms_per_step']:8.1f} {1e3 / r['ms_per_step']:8.2f} "
                         f"{fmt(r['x_plain'], '7.2f')} {fmt(memory.get('activation_mb'), '8.0f')} "
                         f"{fmt(memory.get('saved_mb'), '8.1f')} "
                         f"{fmt(r.get('compile_s'), '9.1f')}  {r.get('target') or ''}"
                         + (f"; memory {r['memory_target']}" if r.get("memory_target") else ""))
            if "error" in memory:
                lines.append(f"{'':60}memory n/a: {memory['error']}")
    s = result["summary"]
    lines += ["", f"targets: {s['passed']}/{s['checked']} PASS"]
    lines += [f"  {m}" for m in s["misses"]]
    lines += ["", "time taken: " + ", ".join(f"{part} {s:.1f} s"
                                              for part, s in result["seconds"].items())]
    return "\n".join(lines)


def model_heading(model_rows):
    r = model_rows[0]
    memory = next((m["memory"]["memory_method"] for m in model_rows
                   if "memory_method" in m.get("memory", {})), "n/a")
    return (f"ResNet-{r['depth']} training step (forward, loss, backward, SGD), batch "
            f"{r['batch']}, synthetic data; ms/step: median of {r.get('rounds')} interleaved "
            f"rounds, each the median of {r.get('steps')} steps; graph: the whole step captured "
            f"in a CUDA graph; act MiB (eager mode): {memory}; kept MiB: bytes autograd keeps "
            f"for the backward of one forward (storages counted once)")


def cuda_resource_rows():
    """Every CUDA kernel's registers, spills, shared memory and occupancy for sm_80 and sm_90
    where a CUDA toolkit is found (none: an empty list); compiled here, no GPU needed."""
    if cuda_resources.find_nvcc() is None:
        print("  no CUDA toolkit: no CUDA kernel resource table", file=sys.stderr)
        return []
    print("  CUDA kernel resources (nvcc, sm_80 and sm_90) ...", file=sys.stderr, flush=True)
    try:
        return [row for arch in (80, 90) for row in cuda_resources.report(arch)]
    except RuntimeError as e:  # a toolkit that cannot compile: the report stands without it
        print(f"  {e}", file=sys.stderr)
        return []


def save(result, stem):
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None):
    started, run_others = time.perf_counter(), OthersCpu()
    a = parse_args(argv)
    meta = environment(a)
    print(f"SPEM report on {meta['device']}: measuring copy bandwidth ...", file=sys.stderr)
    seconds = {}
    start = time.perf_counter()
    bw = copy_bandwidth(a.device, 1 << 30 if a.device.type == "cuda" else 256 << 20,
                        min_time_s=max(a.min_time, 0.1))
    seconds["copy bandwidth"] = time.perf_counter() - start
    os.makedirs(a.out_dir, exist_ok=True)
    stem = os.path.join(a.out_dir, meta["slug"] + ("-quick" if a.quick else "")
                        + (f"-{a.tag}" if a.tag else ""))
    result = {"meta": meta, "copy_bandwidth": bw, "ops": [], "model": [], "seconds": seconds,
              "targets": {"op_max_vs_best_peer": OP_MAX_VS_BEST_PEER,
                          "model_max_vs_plain": MODEL_MAX_RATIO,
                          "model_target_batch": MODEL_TARGET_BATCH,
                          "op_min_frac_copy_gpu_only": OP_MIN_FRAC_COPY,
                          "op_min_vs_eager": OP_MIN_VS_EAGER,
                          "op_min_vs_compile": OP_MIN_VS_COMPILE,
                          "op_bn_max_vs_plain": OP_BN_MAX_VS_PLAIN,
                          "op_bn_min_vs_eager_fwd_bwd": OP_BN_MIN_VS_EAGER}}
    if not a.no_model:  # first: the figures a reader waits for
        def save_rows(rows):
            result["model"] = rows
            save(result, stem)  # a run cut short (a time limit) still leaves what it measured

        measure_models(a, save_rows, seconds)
    start = time.perf_counter()
    for rows in measure_ops(a, bw["gb_per_s"]) if not a.no_ops else ():
        result["ops"] += rows
        seconds["ops"] = time.perf_counter() - start
        save(result, stem)
    meta["load_avg_end"] = os.getloadavg()
    meta["others_cpus"] = run_others.cpus()
    meta["cut_short"] = a.cut_short
    result["summary"] = summarize(meta, result["ops"], result["model"])
    start = time.perf_counter()
    result["cuda_resources"] = [] if a.no_cuda_resources else cuda_resource_rows()
    seconds["cuda resources"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started
    save(result, stem)
    plot.write(result, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png\n")
    print(table(result))
    if result["cuda_resources"]:
        print("\nCUDA kernels (ptxas, scripts/cuda_resources.py): registers, spilled bytes, "
              "stack, static shared memory, occupancy")
        print(cuda_resources.format_rows(result["cuda_resources"]))


if __name__ == "__main__":
    main()
