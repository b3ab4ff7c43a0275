#!/usr/bin/env bash
# Runs the test suite (sets up the environment first, then lints). Extra arguments go to pytest.
# Without a GPU the Triton kernels run in Triton's interpreter on small shapes; with one,
# the same tests also run on CUDA tensors at full shapes.
source "$(dirname "$0")/scripts/env.sh"
# The lint rules of pyproject.toml and csrc/'s .clang-format: a finding fails the run.
# Without the tools (a machine that could not install them) the lint is skipped, except in CI.
if [ -n "${CI:-}" ] || "$PY" -m ruff --version >/dev/null 2>&1; then
  "$PY" -m ruff check .
else
  echo "warning: ruff is not installed: the Python lint is skipped" >&2
fi
if [ -n "${CI:-}" ] || [ -x "$CLANG_FORMAT" ]; then
  "${CLANG_FORMAT:?clang-format is not installed (scripts/env.sh)}" --dry-run -Werror "$ROOT"/csrc/*
else
  echo "warning: clang-format is not installed: the C++ format check is skipped" >&2
fi
"$PY" -m pytest benchmarks -q --benchmark-disable  # CI slice: every benchmark case runs once
exec "$PY" -m pytest tests "$@"
