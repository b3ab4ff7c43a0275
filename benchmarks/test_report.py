"""The report runs end to end on CPU at a tiny size (the CI slice: a broken report fails it).

One case of spem's op rows, and the model rows on the smallest bottleneck ResNet (depth 11,
batch 2); one case of spem_bn's op rows. The model processes' command lines run in this
process, to keep the test to seconds (each fresh process would spend them importing torch).
Every spem_bn implementation the report times computes what it stands for (float64), so that
no row times a wrong function.
"""
import copy
import json
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import model_bench, report
from benchmarks.conftest import DEVICE
from spem_kernels import spem_reference, timing
from spem_kernels.backends import compiled_backends
from spem_kernels.cases import DIRECTIONS, block_tail_call, bn_tail_inputs


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
    report.main(["--device", "cpu", "--no-cuda-resources", "--quick", "--ops", "spem",
                 "--stages", "stage3",
                 "--dtypes", "float32", "--layouts", "nchw", "--impls", ",".join(impls),
                 "--batch", "2",
                 "--min-time", "0.01", "--model-depth", "11", "--model-batch", "2",
                 "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("*-quick.json")
    assert json_path.with_suffix(".png").stat().st_size > 0
    result = json.loads(json_path.read_text())
    assert [(r["op"], r["direction"], r["impl"]) for r in result["ops"]] == [
        ("spem", direction, impl) for direction in ("fwd", "fwd+bwd") for impl in impls]
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


def test_report_spem_bn_rows_have_their_targets(tmp_path, capsys, one_thread):
    """spem_bn's rows: eager composition, plain tail and each fused backend side by side (no
    torch.compile: minutes on a busy CI machine), a fused row's target its three checks."""
    fused = compiled_backends("cpu")
    impls = ["eager", "plain"] + fused
    report.main(["--device", "cpu", "--no-cuda-resources", "--no-model", "--ops", "spem_bn",
                 "--stages", "stage3",
                 "--dtypes", "float32", "--layouts", "nchw", "--impls", ",".join(impls),
                 "--batch", "2", "--min-time", "0.01", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.with_suffix(".png").stat().st_size > 0
    result = json.loads(json_path.read_text())
    assert [(r["op"], r["direction"], r["impl"]) for r in result["ops"]] == [
        ("spem_bn", direction, impl) for direction in DIRECTIONS for impl in impls]
    act = 2 * 256 * 8 * 8 * 4  # y's bytes at batch 2, stage3, float32
    assert [r["bytes"] // act for r in result["ops"]] == [4] * len(impls) + [11] * len(impls)
    for row in result["ops"]:
        ms = {r["impl"]: r["python"]["median_ms"] for r in result["ops"]
              if r["direction"] == row["direction"]}
        assert row["python"]["median_ms"] > 0
        assert row["vs_plain"] == pytest.approx(ms[row["impl"]] / ms["plain"])
        assert row["vs_eager"] == pytest.approx(ms["eager"] / ms[row["impl"]])
        if row["impl"] in ("eager", "plain"):
            assert row["target"] is None
            continue
        fast = (row["vs_best_peer"] <= 1 and row["vs_plain"] <= 1
                and (row["direction"] == "fwd" or row["vs_eager"] >= 3))
        assert row["target"].startswith("PASS" if fast else "MISS") and row["target"] in out
    assert f"{'/plain':>6} {'/p-comp':>7}" in out
    assert result["meta"]["ops"] == ["spem_bn"]
    assert result["targets"]["op_bn_max_vs_plain"] == 1.0
    assert result["targets"]["op_bn_min_vs_eager_fwd_bwd"] == 3.0
    assert result["summary"]["checked"] == 2 * len(fused)


def expected_bn_tail(inputs, impl):
    """What a spem_bn row's call stands for, spelled out here: BatchNorm in training from its
    formula (batch mean, biased variance; the running statistics' update with the unbiased
    one), then relu(spem_reference(x) + residual), or for the plain tail relu(x + residual).
    Returns the output and the running mean and variance after the call."""
    y, (running_mean, running_var, weight, bias) = inputs.x, inputs.bn
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    x = ((y - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + 1e-5)
         * weight[:, None, None] + bias[:, None, None])
    out = (torch.relu(x + inputs.residual) if impl.startswith("plain")
           else spem_reference(x, *inputs.params, inputs.residual, relu=True))
    n = y.numel() / y.shape[1]
    with torch.no_grad():
        stats = (0.9 * running_mean + 0.1 * mean, 0.9 * running_var + 0.1 * var * n / (n - 1))
    return out, stats


@pytest.mark.parametrize("impl, direction", [
    (impl, direction) for impl in [*report.PEERS, *report.PLAINS, *compiled_backends(DEVICE)]
    for direction in DIRECTIONS
    if impl not in report.COMPILED or direction == "fwd+bwd"])  # a compilation takes seconds
def test_each_spem_bn_row_times_what_it_names(impl, direction):
    """The call a spem_bn row times (report.op_for_impl, cases.block_tail_call) has the
    values (fwd) or gradients (fwd+bwd) and the running-statistics update of what it stands
    for: the eager composition for eager, compile and each fused backend; the plain tail for
    plain and plain-compile. float64, fresh random inputs. torch.compile'd ones are checked
    in fwd+bwd only: the function traced is the same in both directions."""
    torch._dynamo.reset()
    inputs = bn_tail_inputs((3, 4, 5, 6), torch.float64, device=DEVICE, requires_grad=True)
    timed = copy.deepcopy(inputs)  # its own running statistics, updated by the call
    got = block_tail_call(report.op_for_impl("spem_bn", impl), timed, direction)()
    want, stats = expected_bn_tail(inputs, impl)
    if direction == "fwd+bwd":
        got = [g for g in got if g is not None]
        leaves = [t for t in inputs.leaves() if not impl.startswith("plain")
                  or not any(t is p for p in inputs.params)]
        want = torch.autograd.grad(want, leaves, inputs.grad_out)
        assert len(got) == len(want) == (4 if impl.startswith("plain") else 9)
    for g, w in zip([got] if direction == "fwd" else got, [want] if direction == "fwd" else want):
        torch.testing.assert_close(g, w.detach())
    torch.testing.assert_close(timed.bn[:2], stats)


def test_time_budget_ends_with_what_was_measured(tmp_path, capsys, one_thread):
    """--time-budget: what cannot be measured in time is left out, and the report still
    writes its JSON, plot and table, saying it was cut short."""
    report.main(["--device", "cpu", "--no-cuda-resources", "--stages", "in7,stage3",
                 "--dtypes", "float32",
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


def op_rows(python_ms, graph_ms=None, op="spem", direction="fwd"):
    """One case's rows: {impl: ms from Python}, and GPU-only ms where given."""
    return [{"impl": impl, "op": op, "stage": "stage3", "direction": direction,
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


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_spem_bn_target_is_the_best_peer_the_plain_tail_and_3x_eager(direction):
    """A fused spem_bn row passes when no slower than the best peer and than the plain tail
    relu(bn(y) + residual), and in fwd+bwd at least 3x faster than the eager composition;
    plain-compile's ratio is reported, not a target."""
    cpu = torch.device("cpu")

    def native(**ms):
        rows = op_rows({"eager": 3.0, "compile": 2.0, "plain": 1.0, "plain-compile": 0.5,
                        **ms}, op="spem_bn", direction=direction)
        report.add_speedups(rows)
        assert [report.check_op(r, cpu) for r in rows[:-1]] == [None] * 4
        return rows[-1]

    row = native(native=0.8)
    assert row["vs_plain"] == pytest.approx(0.8) and row["vs_plain_compile"] == pytest.approx(1.6)
    assert report.check_op(row, cpu) == "PASS (0.40x best peer, 0.80x plain" + (
        ", 3.8x eager)" if direction == "fwd+bwd" else ")")
    assert report.check_op(native(native=1.25), cpu) == (
        "MISS (1.25x plain > 1.00x" + (", 2.4x eager < 3.0x)" if direction == "fwd+bwd" else ")"))
    row = native(native=1.1, plain=1.2)  # faster than plain, but not 3x eager
    assert report.check_op(row, cpu) == ("MISS (2.7x eager < 3.0x)" if direction == "fwd+bwd"
                                         else "PASS (0.55x best peer, 0.92x plain)")
    row = native(native=0.8, plain=None)  # no plain figure: a miss, as without a peer's
    assert report.check_op(row, cpu).startswith("MISS (n/a plain > 1.00x")


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


def test_a_run_is_quiet_only_while_other_processes_leave_the_cpus_alone():
    # A high load average alone (the report's own threads) does not make a run unquiet.
    meta = {"load_avg_start": (1.9, 0, 0), "load_avg_end": (2.0, 0, 0), "others_cpus": 0.05}
    rows = [{"load_avg": [1.8, 2.0], "others_cpus": 0.1}, {"load_avg": [2.0, 2.0]}]
    summary = report.summarize(meta, rows, [])
    assert summary["quiet"] and summary["max_others_cpus"] == 0.1 and summary["max_load"] == 2.0
    assert report.quiet_line(summary) is None
    rows.append({"load_avg": [0.2, 0.2], "others_cpus": report.QUIET_OTHERS_CPUS})
    summary = report.summarize(meta, rows, [])
    assert not summary["quiet"] and summary["max_others_cpus"] == report.QUIET_OTHERS_CPUS
    assert report.quiet_line(summary).startswith("NOT QUIET")


def test_others_cpu_counts_other_processes_not_this_one():
    """A busy child process counts (about one CPU); this process's own work does not."""
    others = timing.OthersCpu()
    if others.cpus() is None:
        pytest.skip("no /proc/stat here")
    start = time.perf_counter()
    x = torch.randn(512, 512)
    while time.perf_counter() - start < 0.5:
        x @ x  # this process, on every thread torch uses
    assert others.cpus() < 0.5
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\n"
                              "while time.time() - t < 1.5: pass"])
    time.sleep(0.2)
    others = timing.OthersCpu()
    time.sleep(1.0)
    busy = others.cpus()
    child.wait()
    assert busy > 0.5
