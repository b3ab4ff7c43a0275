"""The report runs end to end on CPU at a tiny size (the CI slice: a broken report fails it).

One case of the op rows, and the model rows on the smallest bottleneck ResNet (depth 11,
batch 2). The model processes' command lines run in this process, to keep the test to
seconds (each fresh process would spend them importing torch).
"""
import json

import pytest
import torch

from benchmarks import model_bench, report
from spem_kernels import timing
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
        assert row["python"]["reps"] >= 2 and len(row["load_avg"]) == 2
        if row["impl"] == "eager":
            assert row["target"] is None
        else:  # a fused backend against its one peer here
            ratio = row["python"]["median_ms"] / next(
                r["python"]["median_ms"] for r in result["ops"]
                if r["impl"] == "eager" and r["direction"] == row["direction"])
            assert row["vs_best_peer"] == pytest.approx(ratio) and row["best_peer"] == "eager"
            assert row["target"].startswith("PASS" if ratio <= 1 else "MISS")
            assert f"{ratio:.2f}x best peer" in row["target"] and row["target"] in out
    assert result["targets"]["op_max_vs_best_peer"] == 1.0
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
        assert spem_rows[2] < spem_rows[1]
    assert "ResNet-11 training step" in out and "time taken:" in out
    fused = [r for r in result["ops"] if r["impl"] != "eager"]
    missed = [r for r in fused if r["target"].startswith("MISS")]
    assert result["summary"]["checked"] == len(fused)  # the model rows here are too small
    assert result["summary"]["passed"] == len(fused) - len(missed)
    assert len(result["summary"]["misses"]) == len(missed)


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


def op_rows(python_ms, graph_ms=None):
    """One case's rows: {impl: ms from Python}, and GPU-only ms where given."""
    return [{"impl": impl, "stage": "stage3", "direction": "fwd",
             "python": {"median_ms": ms} if ms else {"error": "failed"},
             "graph": {"median_ms": graph_ms[impl]} if graph_ms else None}
            for impl, ms in python_ms.items()]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_op_target_is_the_best_peer(device):
    """A fused backend's row passes when it is no slower than the faster of eager and
    torch.compile, from Python and (GPU) GPU-only, and says by how much either way."""
    device = torch.device(device)
    graph = {"eager": 2.0, "compile": 1.0, "native": 0.9} if device.type == "cuda" else None
    rows = op_rows({"eager": 3.0, "compile": 2.0, "native": 1.5}, graph)
    report.add_speedups(rows)
    native = rows[2]
    assert native["best_peer"] == "compile" and native["vs_best_peer"] == pytest.approx(0.75)
    assert report.check_op(native, device) == "PASS (0.75x best peer)"
    assert report.check_op(rows[0], device) is None and report.check_op(rows[1], device) is None

    rows = op_rows({"eager": 3.0, "compile": 1.2, "native": 1.5}, graph)
    report.add_speedups(rows)
    assert report.check_op(rows[2], device) == "MISS (1.25x best peer > 1.00x)"

    if device.type == "cuda":  # GPU-only counts too
        rows = op_rows({"eager": 3.0, "compile": 2.0, "native": 1.5},
                       {"eager": 2.0, "compile": 0.5, "native": 0.9})
        report.add_speedups(rows)
        assert report.check_op(rows[2], device) == (
            "MISS (1.80x best peer GPU-only > 1.00x)")


def test_op_target_without_a_peer_figure_is_a_miss():
    rows = op_rows({"eager": None, "native": 1.0})
    report.add_speedups(rows)
    assert report.check_op(rows[1], torch.device("cpu")) == "MISS (n/a best peer > 1.00x)"


def test_interleaved_rounds_take_a_count_per_workload():
    calls = {"slow": 0, "fast": 0}

    def count(name):
        def call():
            calls[name] += 1
        return call

    t = timing.time_interleaved({"slow": [count("slow")], "fast": [count("fast")]}, "cpu",
                                rounds=3, reps={"slow": 1, "fast": 4}, warmup=2)
    assert calls == {"slow": 2 + 3, "fast": 2 + 3 * 4}
    assert t["slow"].reps == 3 and t["fast"].reps == 12


def test_a_run_is_quiet_only_below_the_load_limit():
    meta = {"load_avg_start": (0.1, 0, 0), "load_avg_end": (0.2, 0, 0)}
    rows = [{"load_avg": [0.3, 0.4]}]
    assert report.summarize(meta, rows, [])["quiet"]
    rows.append({"load_avg": [0.2, report.QUIET_LOAD]})
    summary = report.summarize(meta, rows, [])
    assert not summary["quiet"] and summary["max_load"] == report.QUIET_LOAD
