#!/usr/bin/env bash
# The performance report (sets up the environment first): every SPEM implementation side by
# side, written to benchmarks/results/<device>.json and .png. Arguments go to the report
# (--help lists them; --quick is a short check).
source "$(dirname "$0")/scripts/env.sh"
exec "$PY" -m benchmarks.report "$@"
