#!/usr/bin/env bash
# Runs the test suite (sets up the environment first). Extra arguments go to pytest.
# Without a GPU the Triton kernels run in Triton's interpreter on small shapes; with one,
# the same tests also run on CUDA tensors at full shapes.
source "$(dirname "$0")/scripts/env.sh"
"$PY" -m pytest benchmarks -q --benchmark-disable  # CI slice: every benchmark case runs once
exec "$PY" -m pytest tests "$@"
