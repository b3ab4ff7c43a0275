"""The trainer end to end on tiny data sets in the official format (CPU, eager SPEM)."""
import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spem_kernels.training import LOG_COLUMNS, load_checkpoint
from test_data import one_thread, patch_spec, write_cifar  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cifar", ROOT / "train_cifar.py")
train_cifar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cifar)


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
        best = train_cifar.main(flags(data_dir, folder, "--schedule", "2", epochs=4))
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
    train_cifar.main(flags(data_dir, tmp_path / "whole", epochs=2))
    train_cifar.main(flags(data_dir, tmp_path / "split", epochs=1))
    # resumed without --manualSeed: the checkpoint's seed and data generator carry on
    resumed = flags(data_dir, tmp_path / "split", epochs=2)
    resumed[resumed.index("--manualSeed"):resumed.index("--manualSeed") + 2] = []
    train_cifar.main(resumed + ["--resume", str(tmp_path / "split" / "checkpoint.pth.tar")])
    whole = torch.load(tmp_path / "whole" / "checkpoint.pth.tar", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pth.tar", weights_only=True)
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, split["state_dict"][k]), k
    for a, b in zip(whole["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert torch.equal(whole["rng"]["data"], split["rng"]["data"])
    assert read_log(tmp_path / "whole") == read_log(tmp_path / "split")  # log kept on resume


def test_original_command_line_parses():
    args = train_cifar.parse_args(
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
    acc = train_cifar.main(["--evaluate", "--data-dir", str(data_dir), "--checkpoint",
                            str(folder), "--depth", "8", "--block-name", "basicblock",
                            "--backend", "eager"])  # reads <checkpoint>/model_best.pth.tar
    assert acc == ckpt["acc"]
    row = read_log(folder)[ckpt["epoch"] - 1]
    loss, shown_acc = capsys.readouterr().out.replace(",", "").split()[2::3]
    assert float(loss) == pytest.approx(row["Valid Loss"], abs=1e-6)
    assert shown_acc == f"{acc:.2f}"
    assert len(read_log(folder)) == 4  # evaluation writes nothing


def test_checkpoint_with_module_prefix_evaluates(data_dir, trained, tmp_path):
    ckpt = torch.load(trained[0] / "checkpoint.pth.tar", weights_only=True)
    dp = {"state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}}
    torch.save(dp, tmp_path / "dp.pth.tar")
    acc = train_cifar.main(flags(data_dir, tmp_path) + [
        "--evaluate", "--resume", str(tmp_path / "dp.pth.tar")])
    assert acc == ckpt["acc"]


def test_bad_checkpoints_name_the_file(data_dir, tmp_path):
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
    wrong = tmp_path / "wrong.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}}, wrong)
    with pytest.raises(RuntimeError, match="wrong.pth.tar does not fit this model"):
        train_cifar.main(flags(data_dir, tmp_path) + ["--evaluate", "--resume", str(wrong)])


@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last"],
                                   ["--amp", "fp16", "--attention", "none"]])
def test_amp_and_channels_last(data_dir, tmp_path, extra):
    train_cifar.main(flags(data_dir, tmp_path, *extra, epochs=1))
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert ("scale" in ckpt["scaler"]) == ("fp16" in extra)


def test_missing_data_error_from_the_trainer(tmp_path, monkeypatch):
    patch_spec(monkeypatch, "cifar100", url=(tmp_path / "offline.tar.gz").as_uri())
    with pytest.raises(FileNotFoundError) as err:
        train_cifar.main(flags(tmp_path / "empty", tmp_path / "out") + ["--dataset", "cifar100"])
    msg = str(err.value)
    assert all(s in msg for s in ("cifar-100-python", "train, test, meta",
                                  "cifar-100-python.tar.gz", str(tmp_path / "empty")))


def test_torchrun_two_processes_gloo(data_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", str(ROOT / "train_cifar.py"),
           *flags(data_dir, tmp_path / "ddp", epochs=2)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("Best acc:") == 1  # rank 0 alone prints
    assert "2 process(es)" in done.stdout
    rows = read_log(tmp_path / "ddp")
    assert len(rows) == 2 and rows[1]["Train Loss"] < rows[0]["Train Loss"]
    ckpt = load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pth.tar"))
    assert not any(k.startswith("module.") for k in torch.load(
        tmp_path / "ddp" / "checkpoint.pth.tar", weights_only=True)["state_dict"])
    assert ckpt["epoch"] == 2
