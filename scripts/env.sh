# Sourced by run.sh and test.sh: picks or makes the Python that runs the project and
# installs what it needs, then sets $PY. Never installs an unpinned torch.
#  - a Python that already has torch (a GPU machine's image) is used as it is;
#  - otherwise .venv is made and gets torch==2.13.0 (a CPU wheel here).
# Installs are skipped when everything imports, so a machine without internet that has
# the packages works too.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if ${PYTHON:-python3} -c "import torch" 2>/dev/null; then
  PY=$(${PYTHON:-python3} -c "import sys; print(sys.executable)")
else
  [ -x .venv/bin/python ] || ${PYTHON:-python3} -m venv .venv
  PY=$ROOT/.venv/bin/python
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
need=()
for mod_req in "triton:triton==3.6.0" "pytest:pytest" "pytest_benchmark:pytest-benchmark" \
               "ninja:ninja" "matplotlib:matplotlib" "tqdm:tqdm" \
               "hypothesis:hypothesis>=6.100,<7"; do
  "$PY" -c "import ${mod_req%%:*}" 2>/dev/null || need+=("${mod_req#*:}")
done
# tests/test_wheel.py builds a wheel: setuptools >= 70.1 does that by itself (a Python 3.12+
# venv has no setuptools at all).
"$PY" -c "import sys, setuptools; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" \
  2>/dev/null || need+=("setuptools>=70.1")
# Triton's CPU interpreter (TRITON_INTERPRET=1, how tests run without a GPU) breaks on
# numpy >= 2.4, which refuses int() of a one-element array. GPUs run compiled kernels.
"$PY" - <<'PYEOF' || need+=("numpy<2.4")
import sys, torch
try:
    import numpy
except ImportError:
    sys.exit(1)
sys.exit(0 if torch.cuda.is_available() or tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 4) else 1)
PYEOF
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  "$PY" -m pip install -q --disable-pip-version-check "${need[@]}"
fi
# best_effort WHAT_IS_LOST PACKAGE...: installs, failing fast. A machine that cannot reach
# PyPI (a GPU lease) warns and runs everything else.
best_effort() {
  local lost=$1
  shift
  [ $# -gt 0 ] || return 0
  echo "installing: $*"
  "$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 10 "$@" ||
    echo "warning: could not install $*: $lost" >&2
}
# The export tests' packages (tests/test_export.py: torch.onnx.export, ONNX Runtime), checked
# beside torch 2.13 (none pulls torch). Where they are missing those tests skip; CI (CI=true)
# fails them instead.
onnx_need=()
for mod_req in "onnx:onnx==1.23.2" "onnxscript:onnxscript==0.7.2" "onnxruntime:onnxruntime==1.32.0"; do
  "$PY" -c "import ${mod_req%%:*}" 2>/dev/null || onnx_need+=("${mod_req#*:}")
done
best_effort "the export tests will skip" ${onnx_need[@]+"${onnx_need[@]}"}
# The linter test.sh runs first and the formatter csrc/'s .clang-format is written for, pinned:
# another version may find other things. Where ruff is missing test.sh skips the lint; CI
# fails instead. clang-format is a binary inside its package: $CLANG_FORMAT (empty if none).
tool_need=()
"$PY" -m ruff --version 2>/dev/null | grep -qx "ruff 0.17.5" || tool_need+=("ruff==0.17.5")
"$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('clang-format') != '23.1.3')" \
  2>/dev/null || tool_need+=("clang-format==23.1.3")
best_effort "test.sh skips the lint (CI fails it)" ${tool_need[@]+"${tool_need[@]}"}
CLANG_FORMAT=$("$PY" -c "import clang_format, os
print(os.path.join(os.path.dirname(clang_format.__file__), 'data', 'bin', 'clang-format'))" \
  2>/dev/null || true)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
