"""reproduce (the paper's table in one resumable command) and curves, end to end on CPU with
tiny data in the official format: results files, a failed run retried, kill -9 in the middle
of a run then resume, a call on a finished DIR that only rewrites the results, bad flags."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bad_flags import BAD_FLAGS
from spem_kernels import curves, paper, reproduce, train, training
from tiny_cifar import write_cifar

ROOT = Path(__file__).resolve().parents[1]
# The trainer's processes: the checkout importable, one thread each (CI has 2 cores).
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
RUNS = ["cifar10-none-s1", "cifar10-spem-s1", "cifar100-none-s1", "cifar100-spem-s1"]


EPOCHS = 4  # enough for a kill to land between a run's first checkpoint and its last


def flags(data_dir, out, *extra, epochs=EPOCHS):
    return ["--out", str(out), "--data-dir", str(data_dir), "--cpu", "--depth", "8",
            "--block-name", "basicblock", "--backend", "eager", "--epochs", str(epochs),
            "--schedule", "2", "--train-batch", "16", "--test-batch", "50", "--lr", "0.05",
            *extra]


def call(argv):
    """(exit status, stdout, seconds) of reproduce.main(argv), in this process."""
    out = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out):
        status = reproduce.main(argv)
    return status, out.getvalue(), time.monotonic() - start


def write_data(root, cifar100_ok=True):
    write_cifar(root, "cifar10", train_sizes=(16, 16, 16, 16, 16), test_size=32, seed=1)
    folder = write_cifar(root, "cifar100", train_sizes=(16, 16, 16, 16, 16), test_size=32,
                         seed=1)
    if not cifar100_ok:
        Path(folder, "train").write_bytes(b"not a pickle")


def killed_during_first_checkpoint(argv, run, log):
    """Start reproduce (a process of its own, its output to `log`) and SIGKILL it once `run`
    has its first checkpoint; wait until the run's trainer has ended too. Returns the epoch
    the run's checkpoint had then."""
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "spem_kernels.reproduce", *argv],
                                   env=dict(os.environ, **ENV), stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(run.path("checkpoint.pth.tar")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 30
    while reproduce._lock_held(run):  # its trainer got SIGTERM when reproduce died
        assert time.monotonic() < deadline, "the trainer outlived reproduce"
        time.sleep(0.05)
    return torch.load(run.path("checkpoint.pth.tar"), weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    """Four calls on one DIR (a trainer process costs seconds, mostly imports: the calls
    share their runs): the first with cifar100's train file corrupt (its two runs fail); the
    second, after mending it, retries them and is killed with SIGKILL once cifar100-none-s1
    has a checkpoint; the third resumes that run and finishes the other; the fourth finds
    the DIR finished."""
    root = tmp_path_factory.mktemp("reproduce")
    data, out = root / "data", root / "out"
    write_data(data, cifar100_ok=False)
    killed = reproduce.Run("cifar100", "none", 1, str(out / "cifar100-none-s1"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        first = call(flags(data, out))
        results = json.loads((out / "results.json").read_text())
        write_data(data)
        killed_at = killed_during_first_checkpoint(flags(data, out), killed, root / "second")
        third = call(flags(data, out))
        outputs = {run: (out / run / "output.txt").read_text() for run in RUNS}
        fourth = call(flags(data, out))
    return dict(out=out, first=first, first_results=results,
                second=(root / "second").read_text(), killed=killed, killed_at=killed_at,
                third=third, fourth=fourth, outputs=outputs)


def records(out):
    return {f"{r['dataset']}-{r['attention']}-s{r['seed']}": r
            for r in json.loads((out / "results.json").read_text())["runs"]}


def test_first_call_trains_both_kinds_and_writes_the_results(calls):
    status, output, _ = calls["first"]
    assert status == 1  # cifar100's runs failed
    runs = {f"{r['dataset']}-{r['attention']}-s{r['seed']}": r
            for r in calls["first_results"]["runs"]}
    assert sorted(runs) == sorted(RUNS)
    for name in RUNS[:2]:
        r, folder = runs[name], calls["out"] / name
        assert r["status"] == "done" and r["epochs"] == EPOCHS, r
        ckpt = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
        log = training.read_log(folder / "log.txt")
        assert r["best_acc"] == ckpt["best_acc"] == max(log["Valid Acc."])
        assert r["final_acc"] == ckpt["acc"] == log["Valid Acc."][-1]
        assert len(log["Valid Acc."]) == EPOCHS and ckpt["args"]["attention"] == r["attention"]
        assert ckpt["args"]["manualSeed"] == 1 and ckpt["args"]["lr"] == 0.05
        assert r["wall_s"] > 0 and r["images_per_s"] > 0
        assert r["device"] and r["versions"]["torch"] == torch.__version__
        assert "commit" in r
        assert f"{name}: started on CPU" in output
    assert calls["first_results"]["recipe"]["epochs"] == EPOCHS


def test_a_failed_run_is_recorded_then_retried(calls):
    out = calls["out"]
    first = {f"{r['dataset']}-{r['attention']}-s{r['seed']}": r
             for r in calls["first_results"]["runs"]}
    for name in RUNS[2:]:
        assert first[name]["status"] == "failed"
        assert "not a readable CIFAR batch file" in first[name]["error"]
        assert f"{name}: FAILED (exit status 2)" in calls["first"][1]
        assert f"{name}: failed before (" in calls["second"]  # the next call retries
        assert records(out)[name]["status"] == "done"
        assert not (out / name / "failed.json").exists()
    for name in RUNS[:2]:  # done in the first call: skipped
        assert f"{name}: done ({EPOCHS} epochs, best " in calls["second"]


def test_kill_9_in_the_middle_of_a_run_then_resume(calls):
    """reproduce killed with SIGKILL while a run trains: its trainer ended with it (no orphan
    held the run: the fixture waits for that), and the next call resumed that run."""
    run, killed_at = calls["killed"], calls["killed_at"]
    assert 1 <= killed_at < EPOCHS
    status, output, _ = calls["third"]
    assert status == 0, output
    assert f"{run.name}: resumed at epoch {killed_at} of {EPOCHS}" in output, output
    assert "cifar100-spem-s1: failed before (" in output  # never started by the killed call
    assert [records(calls["out"])[n]["status"] for n in RUNS] == ["done"] * 4
    for name in RUNS:  # every epoch logged once
        log = training.read_log(calls["out"] / name / "log.txt")
        assert len(log["Valid Acc."]) == EPOCHS
    ckpt = torch.load(run.path("checkpoint.pth.tar"), weights_only=True)
    assert ckpt["epoch"] == EPOCHS and len(ckpt["history"]) == 2  # two processes trained it
    assert not list(calls["out"].glob("**/*.tmp"))


def test_a_second_call_on_a_finished_dir_only_rewrites_the_results(calls):
    status, output, seconds = calls["fourth"]
    assert status == 0 and seconds < 15, (status, seconds)
    assert output.count("skipped") == 4 and "started" not in output
    for name in RUNS:  # no trainer ran
        assert (calls["out"] / name / "output.txt").read_text() == calls["outputs"][name]
    assert {r["status"] for r in records(calls["out"]).values()} == {"done"}
    md = (calls["out"] / "results.md").read_text()
    assert re.search(r"\| ResNet-8 \(basicblock\) \| CIFAR-10 \| [\d.]+ \(n=1\) \[93\.39\] \| "
                     r"[\d.]+ \(n=1\) \[94\.80\] \|", md), md
    assert "| CIFAR-100 |" in md and "Not the paper's (" in md
    assert (calls["out"] / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(calls["out"].glob("**/*.tmp"))


def test_curves_of_any_runs(calls, tmp_path, capsys):
    png = tmp_path / "mine.png"
    curves.main([str(calls["out"] / name) for name in RUNS] + ["-o", str(png), "--paper"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exit_:
        curves.main([str(tmp_path / "nothing"), "-o", str(png)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith("holds no log.txt: not a trainer's output folder\n")


REPRODUCE_BAD_FLAGS = [(bad, message) for bad, message in BAD_FLAGS if bad[0] != "--resume"] + [
    (["--resume", "x.pth.tar"], "unrecognized arguments: --resume x.pth.tar"),
    (["--seeds", "0"], "argument --seeds: must be at least 1, got 0"),
    (["--gpus-per-run", "0"], "argument --gpus-per-run: must be at least 1, got 0"),
    (["--datasets", "mnist"], "argument --datasets: invalid choice: 'mnist' (choose from "
                              "'cifar10', 'cifar100')"),
]


@pytest.mark.parametrize("bad,message", REPRODUCE_BAD_FLAGS,
                         ids=[" ".join(b) for b, _ in REPRODUCE_BAD_FLAGS])
def test_bad_flags_exit_2_naming_the_flag_before_any_data_access(tmp_path, capsys, bad, message,
                                                                 monkeypatch):
    monkeypatch.setattr(reproduce.cifar, "prepare", None)  # any data access would raise
    status, output, _ = call(flags(tmp_path / "no-data", tmp_path / "out", epochs=2) + bad)
    assert (status, output) == (2, "")
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "no-data").exists() and not (tmp_path / "out").exists()


def test_command_line_exit_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "spem_kernels.reproduce",
                           *flags(tmp_path / "no-data", tmp_path / "out"), "--depth", "9"],
                          env=dict(os.environ, **ENV), capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("error: argument --depth: depth of a basicblock ResNet")


def test_another_recipe_in_the_same_dir_is_refused(calls, capsys):
    status, _, _ = call(flags("no-data", calls["out"], epochs=EPOCHS + 1))
    assert status == 2
    assert capsys.readouterr().err == (
        f"error: {calls['out'] / 'cifar10-none-s1'} was trained with --epochs {EPOCHS} (now "
        f"{EPOCHS + 1}): a "
        f"folder holds runs of one recipe; give its flags again, or another --out\n")


def test_table_is_mean_and_std_over_seeds():
    runs = [dict(dataset="cifar10", attention="spem", seed=s, status="done", best_acc=acc,
                 final_acc=acc - 1) for s, acc in ((1, 94.0), (2, 95.0), (3, 96.0))]
    runs += [dict(dataset="cifar10", attention="none", seed=1, status="running",
                  best_acc=50.0, final_acc=50.0)]
    table = reproduce.paper_table(runs, dict(paper.RECIPE), "best_acc").splitlines()
    assert table[2] == ("| ResNet-164 | CIFAR-10 | -, 1 not done [93.39] | "
                        "95.00 +- 1.00 (n=3) [94.80] |")


def test_paper_figures_are_spem_md_and_the_trainer_defaults():
    rows = re.findall(r"^\| ResNet-164 \| CIFAR-(\d+) \| ([\d.]+) \| ([\d.]+) \|$",
                      (ROOT / "SPEM.md").read_text(), re.M)
    assert {f"cifar{n}": {"none": float(a), "spem": float(b)} for n, a, b in rows} \
        == paper.BEST_ACC
    defaults = vars(train.parse_args([]))
    assert {k: defaults[k] for k in paper.RECIPE} == paper.RECIPE


@pytest.mark.parametrize("argv", [[], ["--depth", "8", "--block-name", "basicblock", "--no-fuse-bn",
                                       "--schedule", "3", "5", "--lr", "1e-3", "--amp", "bf16",
                                       "--channels-last", "--manualSeed", "4"]])
def test_a_run_command_line_parses_back(argv):
    args = train.parse_args(argv)
    assert train.parse_args(train.to_argv(args)) == args


@pytest.mark.parametrize("count,visible,per_run,slots", [
    (4, None, 1, [["0"], ["1"], ["2"], ["3"]]),
    (4, None, 2, [["0", "1"], ["2", "3"]]),
    (3, None, 2, [["0", "1"]]),  # the odd GPU stays idle
    (2, "5, 3", 1, [["5"], ["3"]]),  # CUDA_VISIBLE_DEVICES's entries, in its order
])
def test_runs_spread_over_the_visible_gpus(monkeypatch, count, visible, per_run, slots):
    monkeypatch.setattr(reproduce.torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    args = reproduce.parse_args(["--out", "x", "--gpus-per-run", str(per_run)])
    assert reproduce.slots_for(args) == slots
    assert reproduce.slots_for(reproduce.parse_args(["--out", "x", "--cpu"])) == [None]
    with pytest.raises(training.UserError, match="argument --gpus-per-run: 8 GPUs per run, but"):
        reproduce.slots_for(reproduce.parse_args(["--out", "x", "--gpus-per-run", "8"]))
