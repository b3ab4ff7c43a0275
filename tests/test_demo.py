"""The README's main command runs: the demo on this machine's device, at a tiny size."""
from spem_kernels import demo


def test_demo_runs_and_checks_every_fused_backend(capsys):
    demo.main(["--device", "cpu", "--batch", "2", "--reps", "1"])
    out = capsys.readouterr().out
    assert "spem_kernels demo on CPU" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("(2,")]
    assert len(rows) >= 3  # eager at each stage shape, plus every fused backend
    for row in rows:
        err = float(row.split()[-1])
        assert err < 1e-5  # each backend against the float64 reference
