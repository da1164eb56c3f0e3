#!/usr/bin/env bash
# Creates, or reuses, the Python virtual environment of the llama.cpp anchor
# (bench/llamacpp_anchor.py, which `candle-peft bench decode --anchor-python` runs): the
# ik_llama.cpp build of the `ik-llama-cpp-python` wheel (x86-64, AVX2), from PyPI.
#
#   python=$(scripts/llamacpp_venv.sh) || exit 1    # stdout: the venv's python, and nothing else
#   candle-peft bench decode --model M.gguf --anchor-python "$python"
#
# The venv lives at ${CANDLE_PEFT_LLAMACPP_VENV:-$HOME/.cache/candle-peft/llamacpp-venv}; it is
# reused when it already imports the pinned version. Progress and errors go to stderr.
set -euo pipefail

VERSION=0.1.5
VENV="${CANDLE_PEFT_LLAMACPP_VENV:-$HOME/.cache/candle-peft/llamacpp-venv}"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('ik-llama-cpp-python') != '$VERSION')" 2>/dev/null; then
    echo "$PY"
    exit 0
fi
echo "llamacpp_venv.sh: installing ik-llama-cpp-python==$VERSION into $VENV" >&2
"${PYTHON:-python3}" -m venv "$VENV" >&2
"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet "ik-llama-cpp-python==$VERSION" >&2 || { echo "llamacpp_venv.sh: pip install failed" >&2; exit 1; }
"$PY" -c "from ik_llama_cpp.llama import IkLlama" >&2 || { echo "llamacpp_venv.sh: the wheel does not import" >&2; exit 1; }
echo "$PY"
