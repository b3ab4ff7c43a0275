"""The report runs end to end on CPU at a tiny size (the CI slice: a broken report fails it).

One case of the op rows, and the model rows on the smallest bottleneck ResNet (depth 11,
batch 2). The model processes' command lines run in this process, to keep the test to
seconds (each fresh process would spend them importing torch).
"""
import json

import pytest
import torch

from benchmarks import model_bench, report
from spem_kernels.backends import compiled_backends


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from more threads, and on a busy CI machine threads that
    wait for cores make each step take up to seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_report_writes_json_png_and_table(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(model_bench, "run",
                        lambda args, *_, **__: model_bench.main(list(map(str, args))))
    impls = ["eager"] + compiled_backends("cpu")
    report.main(["--device", "cpu", "--quick", "--stages", "stage3", "--dtypes", "float32",
                 "--layouts", "nchw", "--impls", ",".join(impls), "--batch", "2",
                 "--min-time", "0.01", "--model-depth", "11", "--model-batch", "2",
                 "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("*-quick.json")
    assert json_path.with_suffix(".png").stat().st_size > 0
    result = json.loads(json_path.read_text())
    assert [(r["direction"], r["impl"]) for r in result["ops"]] == [
        (direction, impl) for direction in ("fwd", "fwd+bwd") for impl in impls]
    for row in result["ops"]:
        assert row["python"]["median_ms"] > 0 and row["graph"] is None  # graphs: GPU only
    assert [(r["label"], r["mode"]) for r in result["model"]] == [
        ("plain", "eager"), ("eager SPEM", "eager"), ("fused SPEM", "eager"),
        ("fused SPEM+BN", "eager")]
    for row in result["model"]:
        if row["label"].startswith("fused") and len(impls) == 1:
            continue  # n/a without a fused backend
        assert row["error"] is None and row["ms_per_step"] > 0
        assert row["memory"]["activation_mb"] >= 0 and row["memory"]["saved_mb"] > 0
    plain, *spem_rows = (r["memory"]["saved_mb"] for r in result["model"])
    if len(impls) > 1:  # BatchNorm fused keeps less for the backward than BatchNorm apart
        assert spem_rows[2] < spem_rows[1] and result["model"][3]["saved_vs_plain"] > 0
    assert "ResNet-11 training step" in out and "time taken:" in out


def test_time_budget_ends_with_what_was_measured(tmp_path, capsys, one_thread):
    """--time-budget: what cannot be measured in time is left out, and the report still
    writes its JSON, plot and table, saying it was cut short."""
    report.main(["--device", "cpu", "--stages", "in7,stage3", "--dtypes", "float32",
                 "--layouts", "nchw", "--impls", "eager", "--batch", "1", "--min-time", "0.01",
                 "--model-depth", "11", "--model-batch", "2", "--time-budget", "0",
                 "--tag", "budget", "--out-dir", str(tmp_path)])
    (json_path,) = tmp_path.glob("*-budget.json")
    assert json_path.with_suffix(".png").stat().st_size > 0
    result = json.loads(json_path.read_text())
    assert result["ops"] == [] and result["model"] == []
    assert "--time-budget 0 s ran out" in result["meta"]["cut_short"]
    assert result["meta"]["stages"] == ["in7", "stage3"]
    assert "CUT SHORT" in capsys.readouterr().out
