"""The trainer end to end on tiny data sets in the official format (CPU, eager SPEM)."""
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spem_kernels import provenance, train, training
from spem_kernels.training import LOG_COLUMNS, load_checkpoint
from bad_flags import BAD_FLAGS
from tiny_cifar import patch_spec, write_cifar

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses: the checkout importable, one thread per process (CI has 2 cores).
SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, train_sizes=(16, 16, 16, 16, 16), test_size=32, seed=1)
    return root


def flags(data_dir, out, *extra, epochs=2):
    return ["--data-dir", str(data_dir), "--checkpoint", str(out), "--depth", "8",
            "--block-name", "basicblock", "--backend", "eager", "--epochs", str(epochs),
            "--schedule", "1", "--train-batch", "16", "--test-batch", "50", "--lr", "0.05",
            "--manualSeed", "7", *extra]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """(folder, best accuracy, stdout) of a 4-epoch run, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("trained")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        best = train.main(flags(data_dir, folder, "--schedule", "2", epochs=4))
    return folder, best, out.getvalue()


def read_log(folder):
    lines = (Path(folder) / "log.txt").read_text().splitlines()
    assert lines[0].split("\t") == list(LOG_COLUMNS)
    return [dict(zip(LOG_COLUMNS, map(float, line.split("\t")))) for line in lines[1:]]


def test_short_run_learns_and_writes_its_files(trained):
    folder, best, out = trained
    rows = read_log(folder)
    assert len(rows) == 4
    assert rows[-1]["Train Loss"] < 0.7 * rows[0]["Train Loss"]
    assert [r["Learning Rate"] for r in rows] == pytest.approx([0.05, 0.05, 0.005, 0.005])
    for r in rows:  # the logged total is cross-entropy plus alpha * penalty
        assert r["Train Loss"] == pytest.approx(r["Classify Loss"] + r["Parameter Loss"], abs=2e-6)
    assert best == max(r["Valid Acc."] for r in rows)
    assert out.rstrip().splitlines()[-1] == f"Best acc: {best:.2f}" and "img/s" in out
    assert (folder / "log.png").stat().st_size > 0
    ckpt = torch.load(folder / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["best_acc"] == best
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["args"]["manualSeed"] == 7 and ckpt["args"]["schedule"] == [2]
    assert torch.load(folder / "model_best.pth.tar", weights_only=True)["acc"] == best
    assert sorted(os.listdir(folder)) == [
        "checkpoint.pth.tar", "log.png", "log.txt", "model_best.pth.tar"]  # no temporaries


def test_resume_is_bitwise_the_uninterrupted_run(data_dir, tmp_path):
    train.main(flags(data_dir, tmp_path / "whole", epochs=2))
    train.main(flags(data_dir, tmp_path / "split", epochs=1))
    # Stopped after logging epoch 2 but before its checkpoint, in the middle of epoch 3's row:
    # the resumed run logs epoch 2 anew, once (issue 23: it used to log it twice).
    with open(tmp_path / "split" / "log.txt", "a") as f:
        f.write("\t".join(["0.5"] * len(LOG_COLUMNS)) + "\n0.1\t0.")
    # resumed without --manualSeed: the checkpoint's seed and data generator carry on
    resumed = flags(data_dir, tmp_path / "split", epochs=2)
    resumed[resumed.index("--manualSeed"):resumed.index("--manualSeed") + 2] = []
    train.main(resumed + ["--resume", str(tmp_path / "split" / "checkpoint.pth.tar")])
    whole = torch.load(tmp_path / "whole" / "checkpoint.pth.tar", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pth.tar", weights_only=True)
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, split["state_dict"][k]), k
    for a, b in zip(whole["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert torch.equal(whole["rng"]["data"], split["rng"]["data"])
    assert read_log(tmp_path / "whole") == read_log(tmp_path / "split")  # log kept on resume
    effort = [ckpt["effort"] for ckpt in (whole, split)]
    assert [e["train_images"] for e in effort] == [160, 160]  # 2 epochs of 80 images
    assert all(0 < e["train_s"] < e["wall_s"] for e in effort)
    assert [h["first_epoch"] for h in whole["history"]] == [1]
    assert [h["first_epoch"] for h in split["history"]] == [1, 2]  # two processes trained it
    assert split["history"][1]["versions"]["torch"] == torch.__version__
    assert split["history"][1]["device"] == provenance.device_name("cpu")


def test_original_command_line_parses():
    args = train.parse_args(
        "--dataset cifar100 --block-name bottleneck --depth 164 --epochs 164 --schedule 81 122 "
        "--gamma 0.1 --wd 1e-4 --lr 0.1 --momentum 0.9 --train-batch 128 --test-batch 100 "
        "--alpha 0.1 --checkpoint ck --resume ck/checkpoint.pth.tar -e --manualSeed 3 "
        "--workers 4".split())
    assert (args.dataset, args.depth, args.schedule, args.wd, args.evaluate, args.manualSeed) \
        == ("cifar100", 164, [81, 122], 1e-4, True, 3)
    assert (args.attention, args.amp, args.backend) == ("spem", "none", "auto")


def test_evaluate_only(data_dir, trained, capsys):
    folder = trained[0]
    ckpt = torch.load(folder / "model_best.pth.tar", weights_only=True)
    acc = train.main(["--evaluate", "--data-dir", str(data_dir), "--checkpoint",
                            str(folder), "--depth", "8", "--block-name", "basicblock",
                            "--backend", "eager"])  # reads <checkpoint>/model_best.pth.tar
    assert acc == ckpt["acc"]
    row = read_log(folder)[ckpt["epoch"] - 1]
    loss, shown_acc = capsys.readouterr().out.replace(",", "").split()[2::3]
    assert float(loss) == pytest.approx(row["Valid Loss"], abs=1e-6)
    assert shown_acc == f"{acc:.2f}"
    assert len(read_log(folder)) == 4  # evaluation writes nothing


def test_run_leaves_the_flags_as_parsed(data_dir, trained, capsys):
    """--evaluate finds <checkpoint>/model_best.pth.tar and takes its seed, 7, without
    writing either into the flags."""
    args = train.parse_args(["--evaluate", "--data-dir", str(data_dir), "--checkpoint",
                             str(trained[0]), "--depth", "8", "--block-name", "basicblock",
                             "--backend", "eager"])
    parsed = dict(vars(args))
    training.run(args)
    assert vars(args) == parsed and (args.resume, args.manualSeed) == ("", None)


def test_checkpoint_with_module_prefix_evaluates(data_dir, trained, tmp_path):
    ckpt = torch.load(trained[0] / "checkpoint.pth.tar", weights_only=True)
    dp = {"state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}}
    torch.save(dp, tmp_path / "dp.pth.tar")
    acc = train.main(flags(data_dir, tmp_path) + [
        "--evaluate", "--resume", str(tmp_path / "dp.pth.tar")])
    assert acc == ckpt["acc"]


def test_bad_checkpoints_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*corrupt.pth.tar"):
        load_checkpoint(str(corrupt))
    foreign = tmp_path / "foreign.pth.tar"
    torch.save({"weights": [1, 2]}, foreign)
    with pytest.raises(ValueError, match="foreign.pth.tar is not a CIFAR ResNet checkpoint"):
        load_checkpoint(str(foreign))
    unsafe = tmp_path / "unsafe.pth.tar"
    torch.save({"state_dict": {}, "args": Path("x")}, unsafe)  # an arbitrary object
    with pytest.raises(RuntimeError, match="unsafe.pth.tar"):
        load_checkpoint(str(unsafe))
    with pytest.raises(FileNotFoundError, match="missing.pth.tar"):
        load_checkpoint(str(tmp_path / "missing.pth.tar"))


def user_error(capsys, argv):
    """The stderr of train.main(argv), which must exit with status 2 and no traceback."""
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    return err


def test_bad_checkpoints_are_user_errors(data_dir, trained, tmp_path, capsys):
    corrupt, foreign, wrong, weights = (tmp_path / f"{name}.pth.tar" for name in
                                        ("corrupt", "foreign", "wrong", "weights"))
    corrupt.write_bytes(b"\x80\x02garbage")
    torch.save({"weights": [1, 2]}, foreign)
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}}, wrong)
    torch.save(torch.load(trained[0] / "checkpoint.pth.tar", weights_only=True)["state_dict"],
               weights)
    evaluate = flags(data_dir, tmp_path) + ["--evaluate", "--resume"]
    assert user_error(capsys, evaluate + [str(corrupt)]).startswith(
        f"error: cannot read checkpoint {corrupt}: ")
    assert user_error(capsys, evaluate + [str(foreign)]).startswith(
        f"error: {foreign} is not a CIFAR ResNet checkpoint")
    assert user_error(capsys, evaluate + [str(wrong)]).startswith(
        f"error: {wrong} does not fit this model (check --dataset, --depth")
    assert user_error(capsys, flags(data_dir, tmp_path) + ["--resume", str(weights)]) == (
        f"error: {weights} holds no training state (no epoch, best_acc, optimizer): it can be "
        "evaluated (--evaluate) but not resumed\n")
    assert user_error(capsys, flags(data_dir, tmp_path / "none") + ["--evaluate"]) == (
        f"error: checkpoint {tmp_path / 'none' / 'model_best.pth.tar'} does not exist\n")


@pytest.mark.parametrize("bad,message", BAD_FLAGS, ids=[" ".join(b) for b, _ in BAD_FLAGS])
def test_bad_flags_exit_2_naming_the_flag_before_any_data_access(tmp_path, capsys, bad,
                                                                 message, monkeypatch):
    """Issue 23: a mistyped flag is one line and exit status 2, before the data is looked
    for (the data folder does not exist, and a download would fail loudly)."""
    monkeypatch.setattr(training.cifar, "prepare", None)  # any data access would raise
    argv = flags(tmp_path / "no-data", tmp_path / "out") + bad
    assert user_error(capsys, argv) == f"error: {message}\n"
    assert not (tmp_path / "no-data").exists() and not (tmp_path / "out").exists()


def test_flags_that_do_not_fit_are_user_errors(data_dir, tmp_path, capsys, monkeypatch):
    assert user_error(capsys, flags(data_dir, tmp_path) + ["--device", "cuda:64"]).startswith(
        "error: --device cuda:64: this process would use cuda:64, but")
    assert user_error(capsys, flags(data_dir, tmp_path) + ["--device", "cpu", "--cuda-graph"]) \
        == "error: --cuda-graph: it needs a CUDA device\n"
    # checked before any process waits for another: no peer needed
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    assert user_error(capsys, flags(data_dir, tmp_path)) == (
        "rank 1: error: --train-batch 16 (the global batch) must divide evenly over 3 "
        "processes\n")


def test_keyboard_interrupt_exits_130(data_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "train_epoch", interrupted)
    with pytest.raises(SystemExit) as exit_:
        train.main(flags(data_dir, tmp_path))
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last"],
                                   ["--amp", "fp16", "--attention", "none"]])
def test_amp_and_channels_last(data_dir, tmp_path, extra):
    train.main(flags(data_dir, tmp_path, *extra, epochs=1))
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert ("scale" in ckpt["scaler"]) == ("fp16" in extra)


def test_missing_data_error_from_the_trainer(tmp_path, monkeypatch, capsys):
    patch_spec(monkeypatch, "cifar100", url=(tmp_path / "offline.tar.gz").as_uri())
    msg = user_error(capsys, flags(tmp_path / "empty", tmp_path / "out") +
                     ["--dataset", "cifar100"])
    assert msg.startswith("error: CIFAR data not found")
    assert all(s in msg for s in ("cifar-100-python", "train, test, meta",
                                  "cifar-100-python.tar.gz", str(tmp_path / "empty")))


@pytest.mark.parametrize("entry", [[str(ROOT / "train_cifar.py")], ["-m", "spem_kernels.train"]])
def test_command_line_exit_status_and_message(tmp_path, entry):
    """Both entries run; a user error is one line on stderr and exit status 2."""
    done = subprocess.run([sys.executable, *entry, *flags(tmp_path / "empty", tmp_path / "out"),
                           "--resume", str(tmp_path / "missing.pth.tar")],
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"error: argument --resume: no such file: "
                           f"{tmp_path / 'missing.pth.tar'}\n")


def torchrun(data_dir, out, *extra, epochs=2):
    """A 2-process gloo run of tests/torchrun_entry.py (spem_kernels.train.main, and exit
    status 3 if the process group outlives the run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests" / "torchrun_entry.py"), *flags(data_dir, out, *extra, epochs=epochs)]
    return subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)


def test_torchrun_runs_end_cleanly_every_time(data_dir, tmp_path):
    """Issue 8: a finished 2-process run used to abort at exit about one time in four, as
    the process group outlived the interpreter. Now every run must exit 0."""
    for run in range(4):
        out = tmp_path / f"run{run}"
        done = torchrun(data_dir, out)
        assert done.returncode == 0, f"run {run}:\n{done.stdout}{done.stderr}"
        assert "terminate called" not in done.stderr
        assert done.stdout.count("Best acc:") == 1  # rank 0 alone prints
        assert "2 process(es)" in done.stdout
        # rank 0 alone writes, every file complete, no temporaries left
        assert sorted(os.listdir(out)) == [
            "checkpoint.pth.tar", "log.png", "log.txt", "model_best.pth.tar"]
        rows = read_log(out)
        assert len(rows) == 2 and rows[1]["Train Loss"] < rows[0]["Train Loss"]
        saved = torch.load(out / "checkpoint.pth.tar", weights_only=True)
        assert saved["epoch"] == 2 and not any(k.startswith("module.") for k in saved["state_dict"])
        assert load_checkpoint(str(out / "model_best.pth.tar"))["best_acc"] == max(
            r["Valid Acc."] for r in rows)
        assert (out / "log.png").stat().st_size > 0


def test_a_failing_rank_ends_every_rank(data_dir, tmp_path):
    """Rank 1 raises after the first epoch. Without torchrun's agent (which would kill the
    other ranks) every rank must still end within seconds, non-zero, naming its rank and
    error, and epoch 1's checkpoint stays loadable."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(SUBPROCESS_ENV, FAIL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE="2")
    cmd = [sys.executable, str(ROOT / "tests" / "torchrun_entry.py"),
           *flags(data_dir, tmp_path / "out", epochs=3)]
    ranks = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    try:
        _, err1 = ranks[1].communicate(timeout=180)
        failed_at = time.monotonic()
        _, err0 = ranks[0].communicate(timeout=60)  # gloo's own timeout would be 30 minutes
        assert time.monotonic() - failed_at < 30
    finally:
        for p in ranks:
            p.kill()
    assert ranks[1].returncode == 1
    assert err1.endswith("rank 1: error: RuntimeError: injected failure in rank 1\n")
    assert ranks[0].returncode == 1
    assert "rank 0: error: " in err0  # the lost peer, as gloo words it
    assert load_checkpoint(str(tmp_path / "out" / "checkpoint.pth.tar"))["epoch"] == 1
    assert len(read_log(tmp_path / "out")) == 1
