#!/usr/bin/env bash
# The project's jobs, each after setting up the environment (scripts/env.sh):
#   ./run.sh [ARGS]          the demo: eager SPEM against the fused op on this machine's
#                            device, with timings (python -m spem_kernels.demo ARGS)
#   ./run.sh train ARGS      the CIFAR trainer (python train_cifar.py ARGS)
#   ./run.sh reproduce ARGS  the paper's table, resumable (python -m spem_kernels.reproduce ARGS)
#   ./run.sh curves ARGS     curves of trainer runs (python -m spem_kernels.curves ARGS)
source "$(dirname "$0")/scripts/env.sh"
case "${1:-}" in
  train) shift; exec "$PY" train_cifar.py "$@" ;;
  reproduce|curves) module=$1; shift; exec "$PY" -m "spem_kernels.$module" "$@" ;;
esac
exec "$PY" -m spem_kernels.demo "$@"
