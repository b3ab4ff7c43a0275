#!/usr/bin/env bash
# The project's jobs, each after setting up the environment (scripts/env.sh):
#   ./run.sh [ARGS]          the demo: eager SPEM against the fused op on this machine's
#                            device, with timings (python -m spem_kernels.demo ARGS)
#   ./run.sh train ARGS      the CIFAR trainer (python train_cifar.py ARGS)
source "$(dirname "$0")/scripts/env.sh"
if [ "${1:-}" = train ]; then
  shift
  exec "$PY" train_cifar.py "$@"
fi
exec "$PY" -m spem_kernels.demo "$@"
