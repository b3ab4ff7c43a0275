#!/usr/bin/env bash
# The performance report (sets up the environment first): where the time of the SPEM block
# tail goes, every implementation side by side (from Python and, on a GPU, GPU-only from CUDA
# graphs), and ResNet-164 training steps; written to benchmarks/results/<device>.json and .png.
# Arguments go to the report (--help lists them; --quick is a short check). About 4 minutes
# on an H100: --min-time 0.05 --model-steps 5 --model-rounds 3 --model-warmup 3
source "$(dirname "$0")/scripts/env.sh"
# glibc keeps what is freed for reuse (no mmap, no trimming) unless the caller chose otherwise:
# otherwise every call page-faults its fresh outputs in, which on a VM costs more than the
# kernels themselves and varies from run to run (docs/benchmarks.md). Every implementation
# meets the same allocator; the report records these settings.
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_-0} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_-68719476736}
exec "$PY" -m benchmarks.report "$@"
