#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with a CUDA GPU:
#   the test suite (every test on CUDA tensors too, at full shapes), then the demo timings.
# Logs go to $OUT (the device tool's output folder) or ./gpu_check_logs.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-gpu_check_logs}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG_DIR/device.txt"
./test.sh -q -rs 2>&1 | tee "$LOG_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}
./run.sh 2>&1 | tee "$LOG_DIR/demo.log"
echo "tests exit code: $tests_rc"
exit "$tests_rc"
