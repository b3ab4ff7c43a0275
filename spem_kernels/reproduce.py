"""Reproduce the paper's table: plain against SPEM on CIFAR, in one command that survives
being killed and writes the table and the curves.

    python -m spem_kernels.reproduce --out DIR [--datasets cifar10 cifar100] [--seeds K]
        [--gpus-per-run G] [--cpu] [the trainer's flags: --data-dir, --depth, --epochs, ...]

Runs every (data set, attention none or spem, seed 1..K) with the trainer (spem_kernels.train),
by default with the paper's recipe (the trainer's defaults: ResNet-164 bottleneck, 164 epochs,
lr 0.1 x0.1 at epochs 81 and 122, weight decay 1e-4, batch 128); the trainer's flags change
it. Each run lives in DIR/<dataset>-<attention>-s<seed>/ (the trainer's checkpoints, log.txt,
and output.txt, what it printed). The runs spread over the visible GPUs, one run per G GPUs
at a time (torchrun when G > 1); without GPUs (or with --cpu) they run one at a time on the
CPU (with G > 1: G torchrun processes, gloo).

Calling it again on the same DIR skips finished runs and resumes the others from their last
checkpoint (the trainer's --resume): kill it, or lose the machine, at any moment and call it
again. A run's state lives in its folder: its checkpoint (epochs done), a lock held while a
process trains it (another call on the same DIR, on this machine or one that shares the
folder, leaves that run alone), failed.json after a failure (retried by the next call).
Writes DIR/results.json, DIR/results.md (the paper's table, mean +- std over seeds) and
DIR/curves.png after each run and at the end. Exit status: 0 when every run is done (or
trained by another call), 1 when a run failed or its trainer was stopped, 2 for flags that
cannot work (checked before any data is read), 130 on Ctrl-C (the runs resume next time).
"""
import argparse
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import glob
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from . import curves, paper, train, training
from .data import cifar

ATTENTIONS = ("none", "spem")
# Flags reproduce sets for each run (the rest are the trainer's, passed on as given).
PER_RUN = ("dataset", "attention", "checkpoint", "resume", "evaluate", "manualSeed", "device")
# Flags that change what a run computes: a DIR holds runs of one recipe, so that its table
# means something (the others, e.g. --backend, --cuda-graph or --data-dir, may change
# between the calls that resume its runs: another machine, another GPU).
RECIPE_FLAGS = ("block_name", "depth", "epochs", "schedule", "gamma", "lr", "momentum", "wd",
                "alpha", "train_batch", "amp")
POLL_S = 0.25
PR_SET_PDEATHSIG = 1
# Looked up now: the function run between fork and exec must not import or load anything.
_PRCTL = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None


def parse_args(argv=None):
    parser = train.Parser(prog="python -m spem_kernels.reproduce", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          allow_abbrev=False)
    parser.add_argument("--out", required=True, metavar="DIR", help="the runs' folder")
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "cifar100"],
                        choices=sorted(training.NUM_CLASSES))
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per data set and attention, seeds 1..K (default 1)")
    parser.add_argument("--gpus-per-run", type=int, default=1,
                        help="GPUs per run, torchrun when > 1 (CPU: processes per run)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with GPUs")
    train.add_flags(parser, skip=PER_RUN)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise training.UserError(f"argument --seeds: must be at least 1, got {args.seeds}")
    if args.gpus_per_run < 1:
        raise training.UserError(f"argument --gpus-per-run: must be at least 1, got "
                                 f"{args.gpus_per_run}")
    if args.train_batch % args.gpus_per_run:
        raise training.UserError(f"argument --gpus-per-run: --train-batch {args.train_batch} "
                                 f"(the global batch) must divide evenly over "
                                 f"{args.gpus_per_run} processes")
    args.datasets = list(dict.fromkeys(args.datasets))
    return args


@dataclasses.dataclass(frozen=True)
class Run:
    dataset: str
    attention: str
    seed: int
    folder: str

    @property
    def name(self):
        return os.path.basename(self.folder)

    def path(self, file):
        return os.path.join(self.folder, file)


def plan(args):
    """The runs the flags ask for: seeds outermost, so that each seed's table fills first."""
    return [Run(d, a, s, os.path.join(args.out, f"{d}-{a}-s{s}"))
            for s in range(1, args.seeds + 1) for d in args.datasets for a in ATTENTIONS]


def found_runs(out):
    """The runs whose folders are in `out` (those of earlier calls included)."""
    runs = []
    for folder in sorted(glob.glob(os.path.join(out, "*-*-s*"))):
        named = curves.RUN_NAME.match(os.path.basename(folder))
        if named and named["dataset"] in training.NUM_CLASSES and os.path.isdir(folder):
            runs.append(Run(named["dataset"], named["attention"], int(named["seed"]), folder))
    return runs


def run_args(args, run, resume="", device=None):
    """The trainer's flags for `run` (a namespace as train.parse_args makes)."""
    flags = {k: v for k, v in vars(args).items()
             if k not in ("out", "datasets", "seeds", "gpus_per_run", "cpu")}
    return argparse.Namespace(**flags, dataset=run.dataset, attention=run.attention,
                              checkpoint=run.folder, resume=resume, evaluate=False,
                              manualSeed=run.seed, device=device)


# --- a run's state, from its folder ---

def _lock_held(run):
    """Whether another process (or another open file of this one) holds the run's lock."""
    try:
        fd = os.open(run.path("lock"), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)


def state(run, epochs):
    """A run's results.json record, from its folder: status "done" (its checkpoint has
    `epochs` epochs), "running" (started, not done: being trained, or interrupted, which the
    next call resumes) or "failed" (failed.json: its last process failed)."""
    summary = _checkpoint(run)
    done = summary.get("epoch", 0) >= epochs
    failure = _read_json(run.path("failed.json")) if not done else None
    status = ("done" if done else "running" if _lock_held(run) or not failure else "failed")
    effort, history = summary.get("effort", {}), summary.get("history", [])
    record = {
        "dataset": run.dataset, "attention": run.attention, "seed": run.seed,
        "epochs": summary.get("epoch", 0), "best_acc": summary.get("best_acc"),
        "final_acc": summary.get("acc"), "status": status,
        "wall_s": effort.get("wall_s"),
        "images_per_s": (effort["train_images"] / effort["train_s"]
                         if effort.get("train_s") else None),
        "device": ", ".join(dict.fromkeys(
            h["device"] if h.get("processes", 1) == 1 else f"{h['processes']} x {h['device']}"
            for h in history)) or None,
        "commit": ", ".join(dict.fromkeys(h["commit"] for h in history if h.get("commit")))
                  or None,
        "versions": history[-1].get("versions") if history else None,
        "folder": run.folder,
    }
    if status == "failed":
        record["error"] = failure.get("error")
    return record


def _checkpoint(run):
    """training.checkpoint_summary of the run's checkpoint ({} where it has none yet)."""
    path = run.path("checkpoint.pth.tar")
    if not os.path.isfile(path):
        return {}
    try:
        return training.checkpoint_summary(path)
    except RuntimeError as e:
        raise training.UserError(f"{e}: move it away to train run {run.name} anew") from e


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:  # cut short: still a failure record
        return {"error": f"{path} is unreadable"}


def check_recipe(args, runs):
    """A UserError unless every run in DIR with a checkpoint was trained with the recipe the
    flags give now."""
    now = vars(args)
    for run in runs:
        then = _checkpoint(run).get("args", {})
        differ = [k for k in RECIPE_FLAGS if k in then and then[k] != now[k]]
        if differ:
            what = ", ".join(f"--{k.replace('_', '-')} {_show(then[k])} (now {_show(now[k])})"
                             for k in differ)
            raise training.UserError(
                f"{run.folder} was trained with {what}: a folder holds runs of one recipe; "
                f"give its flags again, or another --out")


def _show(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


# --- results ---

def write_results(args, command):
    """DIR/results.json, results.md and curves.png from the run folders in DIR; returns the
    records."""
    records = [state(run, args.epochs) for run in found_runs(args.out)]
    recipe = {k: vars(args)[k] for k in RECIPE_FLAGS}
    data = {"command": command, "recipe": recipe, "paper": paper.BEST_ACC, "runs": records,
            "written": _now()}
    _write(os.path.join(args.out, "results.json"), json.dumps(data, indent=1) + "\n")
    _write(os.path.join(args.out, "results.md"), table(records, recipe, command))
    logs = [curves.load(r["folder"]) for r in records
            if os.path.isfile(os.path.join(r["folder"], "log.txt"))]
    if logs:
        curves.draw(logs, os.path.join(args.out, "curves.png"), paper_lines=True)
    return records


def _write(path, text):
    training.replace_atomic(path, lambda f: f.write(text.encode()))


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def table(records, recipe, command):
    """results.md: the paper's table (mean +- std of the best test accuracy over the seeds
    done, the paper's figure beside each), the final-epoch accuracies, then every run."""
    differ = [f"--{k.replace('_', '-')} {_show(recipe[k])}" for k, v in paper.RECIPE.items()
              if k in recipe and recipe[k] != v]
    lines = ["# SPEM on CIFAR: plain against SPEM", "",
             "Best test accuracy (%) over all epochs: mean +- std over the seeds done (n "
             "runs); the paper's figure in brackets.", "",
             paper_table(records, recipe, "best_acc"), "", "Final-epoch test accuracy (%):", "",
             paper_table(records, recipe, "final_acc")]
    lines += ["", "Recipe: " + ", ".join(f"--{k.replace('_', '-')} {_show(v)}"
                                         for k, v in recipe.items()) + ". "
              + ("The paper's recipe." if not differ else
                 f"Not the paper's ({', '.join(differ)}): its figures are for reference only."),
              "", "| run | status | epochs | best | final | wall time | img/s | device |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(
            f"| {r['dataset']}-{r['attention']}-s{r['seed']} | {r['status']} | {r['epochs']} | "
            f"{_num(r['best_acc'])} | {_num(r['final_acc'])} | {_duration(r['wall_s'])} | "
            f"{_num(r['images_per_s'], 0)} | {r['device'] or '-'} |")
    lines += ["", f"Written {_now()} by `{command}`.", ""]
    return "\n".join(lines)


def paper_table(records, recipe, key):
    """The paper's table layout for `key` (best_acc: with the paper's figure in brackets)."""
    model = f"ResNet-{recipe['depth']}" + (
        "" if recipe["block_name"] == "bottleneck" else f" ({recipe['block_name']})")
    lines = ["| model | dataset | plain | with SPEM |", "| --- | --- | --- | --- |"]
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        cells = [_cell(records, dataset, a, key,
                       paper.BEST_ACC[dataset][a] if key == "best_acc" else None)
                 for a in ATTENTIONS]
        lines.append(f"| {model} | {paper.DATASET_NAMES[dataset]} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _cell(records, dataset, attention, key, reference):
    values = [r[key] for r in records if (r["dataset"], r["attention"], r["status"]) ==
              (dataset, attention, "done")]
    others = sum(r["dataset"] == dataset and r["attention"] == attention
                 and r["status"] != "done" for r in records)
    text = "-" if not values else f"{statistics.fmean(values):.2f}" + (
        f" +- {statistics.stdev(values):.2f}" if len(values) > 1 else "") + f" (n={len(values)})"
    if others:
        text += f", {others} not done"
    return text + (f" [{reference:.2f}]" if reference is not None else "")


def _num(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def _duration(seconds):
    if seconds is None:
        return "-"
    return (f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
            if seconds >= 60 else f"{seconds:.0f} s")


# --- running the runs ---

def slots_for(args):
    """Where runs go, one at a time each: lists of CUDA_VISIBLE_DEVICES entries (GPUs), or
    [None] (the CPU)."""
    count = 0 if args.cpu else torch.cuda.device_count()  # counts without starting CUDA
    if not count:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([v.strip() for v in visible.split(",") if v.strip()] if visible is not None
           else [str(i) for i in range(count)])[:count]
    g = args.gpus_per_run
    if g > len(ids):
        raise training.UserError(f"argument --gpus-per-run: {g} GPUs per run, but {len(ids)} "
                                 f"are visible")
    return [ids[i * g:(i + 1) * g] for i in range(len(ids) // g)]


@dataclasses.dataclass
class Active:
    run: Run
    process: subprocess.Popen
    lock_fd: int
    started: float


def _dying_with(parent):
    """A preexec_fn for Popen (None where there is no prctl, off Linux): the child gets
    SIGTERM when `parent` (reproduce) ends, however it ends (kill -9 included), so that no
    orphan keeps training a run that the next call would start again. torchrun passes the
    SIGTERM on to its workers."""
    if _PRCTL is None:
        return None

    def preexec():
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent ended before the line above
            os._exit(1)
    return preexec


def start(args, run, slot, epochs_done):
    """Take the run's lock and start its trainer; None where another process holds it."""
    os.makedirs(run.folder, exist_ok=True)
    fd = os.open(run.path("lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    for stale in glob.glob(run.path("*.tmp")):  # a killed process's unfinished writes
        os.unlink(stale)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run.path("failed.json"))  # tried again now
    resume = run.path("checkpoint.pth.tar") if epochs_done else ""
    argv = train.to_argv(run_args(args, run, resume, "cpu" if slot is None else None))
    processes = args.gpus_per_run
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "spem_kernels.train", *argv]
    else:
        cmd = [sys.executable, "-m", "spem_kernels.train", *argv]
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
    with open(run.path("output.txt"), "a") as out:
        where = f"CUDA_VISIBLE_DEVICES={','.join(slot)} " if slot is not None else ""
        out.write(f"=== {_now()}: {where}{shlex.join(cmd)}\n")
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   pass_fds=(fd,), preexec_fn=_dying_with(os.getpid()),
                                   stdin=subprocess.DEVNULL)
    return Active(run, process, fd, time.monotonic())


def finish(active, epochs, stopping=False):
    """After the trainer ended: release the lock, and record a failure in failed.json.
    Returns how it ended: "done"; "interrupted" (Ctrl-C, or reproduce `stopping` it); or
    "failed" (an error, or killed by a signal that reproduce did not send: out of memory?)."""
    code = active.process.returncode
    os.close(active.lock_fd)
    if code == 0 and _checkpoint(active.run).get("epoch", 0) >= epochs:
        return "done"
    if stopping or code == 130:
        return "interrupted"
    with open(active.run.path("output.txt"), errors="replace") as f:
        tail = [line.strip() for line in f.readlines()[-50:] if line.strip()]
    error = (f"killed by signal {-code}" if code < 0 else
             next((line for line in reversed(tail) if "error" in line.lower()),
                  tail[-1] if tail else f"exit status {code}"))
    _write(active.run.path("failed.json"),
           json.dumps({"returncode": code, "error": error, "date": _now()}) + "\n")
    return "failed"


def logged_epochs(run):
    """Epochs in the run's log.txt so far (the progress of a run being trained)."""
    try:
        with open(run.path("log.txt")) as f:
            return max(0, sum(1 for line in f if line.endswith("\n")) - 1)
    except FileNotFoundError:
        return 0


def execute(args, todo, slots, say, command):
    """Train the runs of `todo` ({run: epochs done}), each slot one run at a time; returns
    the names of the runs that failed, of those interrupted, and of those another process
    held."""
    pending = collections.deque(todo)
    active, failed, stopped, elsewhere = {}, [], [], []
    total = len(todo) * args.epochs
    tqdm.monitor_interval = 0  # no monitor thread: the children are forked (_dying_with)
    bar = tqdm(total=total, initial=sum(todo.values()), unit="epoch", dynamic_ncols=True,
               disable=not sys.stderr.isatty(), desc="runs")
    shown = dict(todo)
    try:
        while pending or active:
            for i, slot in enumerate(slots):
                while i not in active and pending:
                    run = pending.popleft()
                    started = start(args, run, slot, todo[run])
                    if started is None:
                        elsewhere.append(run.name)
                        say(f"{run.name}: being trained by another process (its lock is "
                            f"held): left to it")
                        continue
                    active[i] = started
                    where = f"GPU {','.join(slot)}" if slot is not None else "CPU"
                    say(f"{run.name}: " + (f"resumed at epoch {todo[run]} of {args.epochs}"
                                           if todo[run] else "started")
                        + f" on {where} (output: {run.path('output.txt')})")
            time.sleep(POLL_S)
            for i, a in list(active.items()):
                epochs = min(logged_epochs(a.run), args.epochs)
                if epochs != shown[a.run]:
                    bar.update(epochs - shown[a.run])
                    shown[a.run] = epochs
                    if bar.disable:
                        say(f"{a.run.name}: epoch {epochs}/{args.epochs}")
                if a.process.poll() is None:
                    continue
                del active[i]
                how = finish(a, args.epochs)
                record = state(a.run, args.epochs)
                if how == "failed":
                    failed.append(a.run.name)
                    say(f"{a.run.name}: FAILED (exit status {a.process.returncode}): "
                        f"{record.get('error', '')} (output: {a.run.path('output.txt')})")
                elif how == "interrupted":
                    stopped.append(a.run.name)
                    say(f"{a.run.name}: interrupted at epoch {record['epochs']}")
                else:
                    say(f"{a.run.name}: done, best {record['best_acc']:.2f}, final "
                        f"{record['final_acc']:.2f} ({_duration(time.monotonic() - a.started)})")
                write_results(args, command)
    except BaseException:
        for a in active.values():  # Ctrl-C reached them too; anything else: stop them
            with contextlib.suppress(ProcessLookupError):
                a.process.send_signal(signal.SIGINT)
        for a in active.values():
            try:
                a.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                a.process.kill()
                a.process.wait()
            finish(a, args.epochs, stopping=True)
        write_results(args, command)  # where the runs stand: the next call resumes them
        raise
    finally:
        bar.close()
    return failed, stopped, elsewhere


def main(argv=None):
    """The command line; returns the exit status (see the module's docstring)."""
    try:
        return _main(argv)
    except training.UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: call again with the same flags to resume", file=sys.stderr)
        return 130


def _main(argv):
    args = parse_args(argv)
    runs = plan(args)
    slots = slots_for(args)
    for run in runs:
        train.check_flags(run_args(args, run))
    command = shlex.join(["python", "-m", "spem_kernels.reproduce",
                          *(sys.argv[1:] if argv is None else argv)])

    def say(message):
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()

    known = {r.name: r for r in found_runs(args.out)} if os.path.isdir(args.out) else {}
    check_recipe(args, list(known.values()))
    where = (f"{len(slots)} GPU slot(s) of {args.gpus_per_run} GPU(s)" if slots != [None]
             else "the CPU, one run at a time" + (f" ({args.gpus_per_run} processes each)"
                                                  if args.gpus_per_run > 1 else ""))
    say(f"reproduce: {len(runs)} run(s) in {args.out} on {where}: ResNet-{args.depth} "
        f"{args.block_name}, {args.epochs} epochs")
    todo = {}
    for run in runs:
        record = state(run, args.epochs) if run.name in known else None
        if record and record["status"] == "done":
            say(f"{run.name}: done ({record['epochs']} epochs, best {record['best_acc']:.2f}): "
                f"skipped")
            continue
        todo[run] = record["epochs"] if record else 0
        if record and record["status"] == "failed":
            say(f"{run.name}: failed before ({record['error']}): tried again")
    try:  # downloads each data set once, before the runs start
        for dataset in dict.fromkeys(run.dataset for run in todo):
            cifar.prepare(dataset, args.data_dir)
    except (OSError, ValueError) as e:
        raise training.UserError(str(e)) from e
    os.makedirs(args.out, exist_ok=True)
    failed, stopped, elsewhere = execute(args, todo, slots, say, command) if todo else [[]] * 3
    records = write_results(args, command)
    say(paper_table(records, {k: vars(args)[k] for k in RECIPE_FLAGS}, "best_acc"))
    say(f"results: {os.path.join(args.out, 'results.json')}, results.md, curves.png "
        f"({sum(r['status'] == 'done' for r in records)} of {len(records)} runs done)")
    if failed or stopped:
        say(f"not done: {', '.join(failed + stopped)}; call again to "
            + ("retry them" if failed else "resume them"))
        return 1
    if elsewhere:
        say(f"trained by another process: {', '.join(elsewhere)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
