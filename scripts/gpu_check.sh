#!/usr/bin/env bash
# The whole GPU check in one command, sized to a GPU lease (15 minutes of device time in all,
# machine start included, at most 10 minutes a command): it ends within about 8 minutes on
# an H100.
#
#   scripts/gpu_check.sh            logs and results to $OUT (the device tool's output folder),
#                                   else ./gpu_check_logs
#
# Steps, each under its own time limit and logging to <out>/<step>.log as it runs:
#   env        device, driver and versions
#   build      the native CUDA build (in the background, while the Triton tests run)
#   triton     Triton kernels on CUDA tensors: every op test at full ResNet-164 shapes
#   native     native kernels on CUDA tensors: the op tests, the library's own checks
#   graphs     CUDA graphs: the op, a whole ResNet-164 training step, direct Triton launches,
#              the host-cost tests, torch.compile(mode="reduce-overhead")
#   report     the performance report: <out>/<gpu>.json and .png (and benchmarks/results/)
# <out>/summary.txt gets one line per step (exit code, seconds). The exit code is the first
# failing step's; later steps still run, so one failure does not hide the rest.
cd "$(dirname "$0")/.." || exit 1
OUT_DIR=$(mkdir -p "${OUT:-gpu_check_logs}" && cd "${OUT:-gpu_check_logs}" && pwd)
export PYTHONUNBUFFERED=1
source scripts/env.sh >"$OUT_DIR/env.log" 2>&1 || { cat "$OUT_DIR/env.log"; exit 1; }
set +e -uo pipefail  # env.sh sets -e: here a failing step must not end the check
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, record the outcome
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT_DIR/summary.txt"
  tail -n 3 "$OUT_DIR/$name.log"
  [ "$rc" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  git log -1 --format='commit %h %cd' --date=iso; date -u; } 2>&1 | tee "$OUT_DIR/env.txt"

# The native build takes about 40 s; the Triton tests do not need it (their collection never
# asks for the native backend), so both run at once. The native tests wait for it.
build_start=$SECONDS
timeout 400 "$PY" -c "
import torch
from spem_kernels.backends import native_backend
reason = native_backend.is_available(torch.device('cuda'))
print('native on CUDA:', reason or 'available')
raise SystemExit(reason is not None)" >"$OUT_DIR/build.log" 2>&1 &
build_pid=$!

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
# 8 test processes where pytest-xdist is installed (the GPU image has it): compiles in parallel
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
step triton 200 "${PYTEST[@]}" "${PARALLEL[@]}" tests/test_op.py -k "triton and cuda"

wait "$build_pid"
rc=$?
echo "build: exit $rc after $((SECONDS - build_start)) s (in the background)" | tee -a "$OUT_DIR/summary.txt"
tail -n 3 "$OUT_DIR/build.log"
[ "$rc" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc

step native 150 "${PYTEST[@]}" "${PARALLEL[@]}" tests/test_op.py tests/test_native.py tests/test_api.py \
  -k "native or not cuda"
step graphs 200 "${PYTEST[@]}" tests/test_cuda_graph.py tests/test_host_cost.py
step report 240 "$PY" -m benchmarks.report --out-dir "$OUT_DIR" --min-time 0.05 \
  --model-steps 5 --model-rounds 3 --model-warmup 3

echo "== summary (exit $status)"
cat "$OUT_DIR/summary.txt"
exit "$status"
