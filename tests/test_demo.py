"""The README's main command runs: the demo on this machine's device, at a tiny size."""
import re

from spem_kernels import demo


def test_demo_runs_and_checks_every_fused_backend(capsys):
    demo.main(["--device", "cpu", "--batch", "2", "--reps", "1", "--rounds", "3"])
    out = capsys.readouterr().out
    assert "spem_kernels demo on CPU" in out and "median of 3 interleaved rounds" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("(2,")]
    assert len(rows) >= 3  # eager at each stage shape, plus every fused backend
    for row in rows:
        err = float(row.split()[-1])
        assert err < 1e-5  # each backend against the float64 reference
        # fwd, fwd+bwd and the speedup, each a median with its lowest and highest round
        spreads = re.findall(r"([\d.]+)x? \[([\d.]+)-([\d.]+)\]", row)
        assert len(spreads) == 3, row
        for median, low, high in spreads:
            assert float(low) <= float(median) <= float(high)
