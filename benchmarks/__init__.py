"""Microbenchmarks and the performance report of the SPEM op (see report.py)."""
