#!/usr/bin/env bash
# Fetches, on a machine that reaches PyPI, what scripts/gpu_check.sh needs on a GPU machine
# that may not: NVIDIA's compute-sanitizer, from the registry packages that ship it
# (nvidia-cuda-sanitizer-api-cu12 for CUDA 12 builds of torch, nvidia-cuda-sanitizer-api 13
# for CUDA 13), as wheels in .gpu_tools/ (about 23 MB; git ignores it). Carry that folder to
# the GPU machine with the checkout; gpu_check.sh unpacks the one its torch's CUDA wants.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_tools
for req in "nvidia-cuda-sanitizer-api-cu12==12.9.79" "nvidia-cuda-sanitizer-api==13.0.85"; do
  python3 -m pip download -q --no-deps --disable-pip-version-check "$req" -d .gpu_tools
done
ls -l .gpu_tools
