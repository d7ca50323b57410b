#!/usr/bin/env bash
# Creates the project's virtual environment and installs the package with its test and
# training extras, then the gguf extra (llama.cpp, built from source; a failure there only warns). Keeps an existing torch (CPU or CUDA) when the base Python
# has one; otherwise installs torch 2.13.0 (on a CPU-only machine with the local
# CPU wheel this pulls no CUDA packages).
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  # System site packages let a preinstalled torch (e.g. a CUDA build) be reused as-is.
  "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".[train,test]"
# gguf: llama-cpp-python, the oracle of tests/ecosystem/test_gguf.py, builds llama.cpp from source (cmake, a C++
# compiler; 6-15 minutes on 2 cores, once: pip caches the wheel). Without it those tests skip with the reason.
if ! CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    "$VENV/bin/python" -m pip install -q -e ".[gguf]"; then
  echo "WARNING: the gguf extra (llama-cpp-python) did not install: tests/ecosystem/test_gguf.py will skip its llama.cpp runs" >&2
fi
"$VENV/bin/python" -c "import torch, transformers, tnl_model; print(f'torch {torch.__version__}, transformers {transformers.__version__}: environment ready')"
