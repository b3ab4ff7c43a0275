#!/usr/bin/env bash
# The main job (sets up the environment first): for now the demo, eager SPEM against
# the fused op on whatever device is present, with timings. Arguments go to the demo.
source "$(dirname "$0")/scripts/env.sh"
exec "$PY" -m spem_kernels.demo "$@"
