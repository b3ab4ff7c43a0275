#!/usr/bin/env bash
# The whole GPU check in one command, sized to a GPU lease (15 minutes of device time in all,
# the machine's start included, at most 10 minutes a command): one hard deadline, the most
# valuable figures first. Every step logs to <out>/<step>.log as it runs, and a step that the
# deadline cuts short leaves what it measured.
#
#   scripts/gpu_check.sh [--quick] [--deadline SECONDS]
#       --deadline   seconds for the whole check (default 540; --quick: 240)
#       --quick      fewer figures: fp32 model rows only, fewer steps
#   Logs and results go to $OUT (the device tool's output folder), else ./gpu_check_logs.
#   Without a GPU it is a dry run on the CPU: the same steps, the CUDA ones empty or skipped.
#
# Steps, in order; each gets what is left of the deadline, up to its own cap:
#   env        device, driver, versions, commit
#   build      the native CUDA build, in the background (about 40 s on an H200)
#   triton     meanwhile, the Triton op tests (spem, spem_bn) on CUDA tensors (they need no
#              native build)
#   sanitizer  compute-sanitizer's memcheck, racecheck and synccheck over a small matrix of
#              both ops on both GPU backends (scripts/sanitizer_cases.py), where the tool is
#              found: on the PATH, in the CUDA toolkit, in an installed
#              nvidia-cuda-sanitizer-api package, or as that package's wheel in .gpu_tools/
#              (scripts/fetch_gpu_tools.sh fetches it where PyPI is reachable; carry the
#              folder to a GPU machine that has no PyPI); summary.txt says where none is
#   report     ResNet-164 training steps (plain, fused SPEM, fused SPEM+BN; eager and
#              CUDA-graphed; fp32 and bf16 + channels_last; with activation memory), then the
#              op rows (eager and fused, from Python and GPU-only): <out>/<gpu>.json and .png
#   tests      the CUDA tests: native op tests (spem, spem_bn) at full shapes, CUDA graphs (ops,
#              ResNet-164 step, trainer, reduce-overhead), host cost and direct launches
#   compile    if time is left: op rows with torch.compile(spem_reference) (<gpu>-compile.*)
#   imagenet   if time is left: op rows at ImageNet ResNet-50 planes (<gpu>-imagenet.*)
# <out>/summary.txt gets one line per step (exit code, seconds; 124: cut by its time limit).
# The exit code is the first failing step's; later steps still run.
cd "$(dirname "$0")/.." || exit 1
DEADLINE=540
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; DEADLINE=240 ;;
    --deadline) DEADLINE=$2; shift ;;
    *) echo "usage: $0 [--quick] [--deadline SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
START=$SECONDS
OUT_DIR=$(mkdir -p "${OUT:-gpu_check_logs}" && cd "${OUT:-gpu_check_logs}" && pwd)
export PYTHONUNBUFFERED=1
source scripts/env.sh >"$OUT_DIR/env.log" 2>&1 || { cat "$OUT_DIR/env.log"; exit 1; }
set +e -uo pipefail  # env.sh sets -e: here a failing step must not end the check
status=0
: >"$OUT_DIR/summary.txt"

left() { echo $((DEADLINE - (SECONDS - START))); }

limit_for() {  # limit_for CAP: a step's time limit, min(CAP, what is left - 10 s)
  local limit=$(( $(left) - 10 ))
  [ "$limit" -lt "$1" ] || limit=$1
  echo "$limit"
}

record() {  # record NAME RC SECONDS: one summary line; the first failure sets the exit code
  echo "$1: exit $2 after $3 s" | tee -a "$OUT_DIR/summary.txt"
  [ "$2" -eq 0 ] || [ "$status" -ne 0 ] || status=$2
}

step() {  # step NAME CAP COMMAND...: run under limit_for CAP, log, record
  local name=$1 start=$SECONDS limit rc
  limit=$(limit_for "$2")
  shift 2
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped, $(left) s left" | tee -a "$OUT_DIR/summary.txt"
    return
  fi
  echo "== $name (limit ${limit}s, $(left) s left): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  record "$name" "$rc" $((SECONDS - start))
  tail -n 4 "$OUT_DIR/$name.log"
}

DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
{ [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  git log -1 --format='commit %h %cd' --date=iso; date -u
  echo "device ${DEVICE}, deadline ${DEADLINE} s, quick=${QUICK}"; } 2>&1 | tee "$OUT_DIR/env.txt"

build_start=$SECONDS
timeout 300 "$PY" -c "
import torch
from spem_kernels.backends import native_backend
reason = native_backend.is_available(torch.device('$DEVICE'))
print('native on $DEVICE:', reason or 'available')
raise SystemExit(reason is not None)" >"$OUT_DIR/build.log" 2>&1 &
build_pid=$!

# -v: a line per test as it ends, so a log cut by the deadline still says what passed
PYTEST=("$PY" -m pytest -v -rs -p no:cacheprovider)
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)  # the GPU image has pytest-xdist

if [ "$DEVICE" = cuda ]; then
  step triton $((QUICK ? 60 : 120)) "${PYTEST[@]}" "${PARALLEL[@]}" tests/test_op.py \
    tests/test_spem_bn.py -k "triton and cuda"
else
  echo "triton: skipped, no GPU (a dry run)" | tee -a "$OUT_DIR/summary.txt"
fi

wait "$build_pid"
record build $? $((SECONDS - build_start))
tail -n 2 "$OUT_DIR/build.log"

# compute-sanitizer's path, or nothing (see the header: where it is looked for).
find_sanitizer() {
  local major wheel dir
  command -v compute-sanitizer && return
  [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] &&
    { echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"; return; }
  "$PY" -c "import glob, os, nvidia
print(next(iter(glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'bin', 'compute-sanitizer'))), ''))" \
    2>/dev/null | grep . && return
  major=$("$PY" -c "import torch; print((torch.version.cuda or '0').split('.')[0])")
  wheel=$(ls .gpu_tools/nvidia_cuda_sanitizer_api*-"$major".*.whl 2>/dev/null | head -n 1)
  [ -n "$wheel" ] || return 0
  dir=$(mktemp -d)
  "$PY" -m zipfile -e "$wheel" "$dir" && find "$dir" -path "*/bin/*" -exec chmod +x {} + &&
    find "$dir" -name compute-sanitizer -path "*/bin/*" | head -n 1
}

if [ "$DEVICE" = cuda ]; then
  SANITIZER=$(find_sanitizer)
  if [ -n "$SANITIZER" ]; then
    echo "compute-sanitizer: $SANITIZER" >>"$OUT_DIR/env.txt"
    for tool_cap in memcheck:40 racecheck:30 synccheck:20; do
      step "sanitizer-${tool_cap%%:*}" "${tool_cap##*:}" "$SANITIZER" --tool "${tool_cap%%:*}" \
        --error-exitcode 9 "$PY" scripts/sanitizer_cases.py
    done
  else
    echo "sanitizer: not run, no compute-sanitizer (PATH, \$CUDA_HOME/bin, the" \
      "nvidia-cuda-sanitizer-api package, .gpu_tools/: scripts/fetch_gpu_tools.sh)" |
      tee -a "$OUT_DIR/summary.txt"
  fi
else
  echo "sanitizer: skipped, no GPU (a dry run)" | tee -a "$OUT_DIR/summary.txt"
fi

FUSED=$("$PY" -c "from spem_kernels.backends import compiled_backends as b; print(*b('$DEVICE'), sep=',')")
# The report's own --time-budget ends it with its plot and table 15 s before its step's limit.
# (the CUDA resource table needs no GPU: scripts/cuda_resources.py prints it anywhere)
REPORT=("$PY" -m benchmarks.report --out-dir "$OUT_DIR" --min-time 0.05 --no-cuda-resources)
if [ "$QUICK" -eq 1 ]; then
  step report 110 "${REPORT[@]}" --impls "eager,$FUSED" --model-variants plain,fused,fused-bn \
    --model-precisions fp32 --model-steps 3 --model-warmup 2 --model-rounds 2 \
    --dtypes float32 --time-budget $(( $(limit_for 110) - 15 ))
else
  step report 240 "${REPORT[@]}" --impls "eager,$FUSED" --model-variants plain,fused,fused-bn \
    --model-steps 5 --model-warmup 3 --model-rounds 3 --time-budget $(( $(limit_for 240) - 15 ))
fi

step tests 240 "${PYTEST[@]}" "${PARALLEL[@]}" tests/test_op.py tests/test_spem_bn.py \
  tests/test_cuda_graph.py tests/test_host_cost.py -k "(native and cuda) or cuda_graph or host_cost"

step compile 150 "${REPORT[@]}" --no-model --tag compile --impls "compile,$FUSED" \
  --time-budget $(( $(limit_for 150) - 15 ))
step imagenet 120 "${REPORT[@]}" --no-model --tag imagenet --stages imagenet \
  --impls "eager,$FUSED" --time-budget $(( $(limit_for 120) - 15 ))

echo "== summary (exit $status, $((SECONDS - START)) s of ${DEADLINE})"
cat "$OUT_DIR/summary.txt"
exit "$status"
