#!/usr/bin/env bash
# Runs the emulated CUDA tests (pytest -m cuda_emulated) once under ThreadSanitizer: the
# emulation built with -fsanitize=thread (its own build, tests/cuda_emulation), each CUDA
# thread a fiber that TSAN tracks as a thread of its own, synchronised only where CUDA
# synchronises (a launch, a block's start and end, __syncthreads). A missing barrier, or two
# blocks writing one place, is a reported race whatever order the threads happened to run
# in. Clean: exit status 0 and no "WARNING: ThreadSanitizer" in the output.
#   scripts/cuda_emulated_races.sh [pytest arguments]     (about 13 minutes on 2 cores)
source "$(dirname "$0")/env.sh"
set +e  # (env.sh sets -e) the report is printed after a failing run
TSAN=$(${CXX:-g++} -print-file-name=libtsan.so)
[ -f "$TSAN" ] || { echo "no libtsan.so for ${CXX:-g++} (Debian: libgcc-12-dev)" >&2; exit 2; }
export SPEM_CUDA_EMULATION_SANITIZE=thread
# torch on one thread: its OpenMP team synchronises in libgomp, which TSAN cannot see (false
# reports inside torch's own ops); the emulation's workers are threads of their own.
export OMP_NUM_THREADS=1
# halt_on_error: the first race fails the run; exitcode 66 tells it from a failed test. The
# report goes to a file (pytest holds stderr while a test runs), printed below.
REPORT=$(mktemp -d)/tsan
export TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 log_path=$REPORT ${TSAN_OPTIONS:-}"
# TSAN must be in the process before the instrumented library (which tests/cuda_emulation
# builds without it: the compilers run with LD_PRELOAD unset).
# First, that it sees what it is here for: the emulation's own kernel without its barrier
# (tests/cuda_emulation/selftest.cpp: neighbour_read) must be reported as a race.
LD_PRELOAD="$TSAN" TSAN_OPTIONS="$TSAN_OPTIONS log_path=$REPORT-selfcheck" "$PY" -c "
import sys; sys.path.insert(0, '$ROOT/tests')
import cuda_emulation; cuda_emulation.load().run_neighbour_read(1, False)"
if [ $? -ne 66 ] || ! grep -q "data race" "$REPORT"-selfcheck.* 2>/dev/null; then
  echo "ThreadSanitizer did not report the planted race (a kernel without its barrier):" \
    "a clean run below would prove nothing" >&2
  exit 3
fi
echo "ThreadSanitizer reports a planted race: yes (neighbour_read without its barrier)"
LD_PRELOAD="$TSAN" "$PY" -m pytest -m cuda_emulated -p no:cacheprovider -q "$@"
status=$?
cat "$REPORT".* 2>/dev/null
[ $status -eq 66 ] && echo "ThreadSanitizer reported a race (above)" >&2
exit $status
