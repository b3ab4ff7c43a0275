"""Microbenchmarks and the performance report of the SPEM op (report.py, through ./bench.sh).

pytest-benchmark cases (test_*.py, conftest.py), the report (report.py, model_bench.py,
plot.py) and native_cpu_speedup.py use spem_kernels' public API and its cases and timing
modules; nothing in the package imports this folder. Results: results/<device>.json/.png.
"""
