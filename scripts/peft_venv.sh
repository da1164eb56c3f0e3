#!/usr/bin/env bash
# Creates, or reuses, the Python virtual environment that the PEFT round-trip tests
# (tests/peft_roundtrip.rs) run PEFT in, and that regenerates the committed fixtures
# (tests/fixtures/check_fixtures.py): torch, transformers, PEFT and bitsandbytes at the versions
# the fixtures in tests/fixtures/peft and tests/fixtures/nf4 were made with, installed from PyPI.
#
#   python=$(scripts/peft_venv.sh) || exit 1    # stdout: the venv's python, and nothing else
#   CANDLE_PEFT_PYTHON="$python" cargo test --test peft_roundtrip -- --ignored
#   "$python" tests/fixtures/check_fixtures.py  # regenerate the fixtures, compare with the committed ones
#
# Progress and errors go to stderr, so stdout's one line is the python path.
#
# The venv lives at ${CANDLE_PEFT_VENV:-$HOME/.cache/candle-peft/peft-venv} so that CI can cache
# it. It is reused as is when it already imports the pinned versions; otherwise it is
# (re)installed. Any failure exits non-zero with a message saying what failed: callers must
# not skip the round-trip tests silently.
#
# On Linux, `pip install torch` from PyPI pulls in NVIDIA's CUDA 13 wheels as dependencies:
# they are 2.7 GB of the venv's 4.9 GB (about 70 s to install on the project's machine). PyPI is
# the only index reachable, so CPU-only wheels are not an option; the tests run torch on the CPU.
set -euo pipefail

TORCH=2.11.0
TRANSFORMERS=5.17.0
PEFT=0.21.0
BITSANDBYTES=0.50.2
VENV="${CANDLE_PEFT_VENV:-$HOME/.cache/candle-peft/peft-venv}"
PY="$VENV/bin/python"
BASE_PYTHON="${PYTHON:-python3}"

fail() { echo "peft_venv.sh: error: $*" >&2; exit 1; }

# True when the venv imports exactly the pinned versions.
pinned_ok() {
    [ -x "$PY" ] && "$PY" - "$TORCH" "$TRANSFORMERS" "$PEFT" "$BITSANDBYTES" <<'PYEOF' >/dev/null 2>&1
import sys, torch, transformers, peft, bitsandbytes
want = sys.argv[1:]
have = [torch.__version__.split("+")[0], transformers.__version__, peft.__version__, bitsandbytes.__version__]
sys.exit(0 if have == want else 1)
PYEOF
}

if pinned_ok; then
    echo "peft_venv.sh: reusing $VENV (torch $TORCH, transformers $TRANSFORMERS, peft $PEFT, bitsandbytes $BITSANDBYTES)" >&2
else
    command -v "$BASE_PYTHON" >/dev/null || fail "no '$BASE_PYTHON' on PATH to create the venv with"
    if [ ! -x "$PY" ]; then
        echo "peft_venv.sh: creating $VENV" >&2
        mkdir -p "$(dirname "$VENV")"
        "$BASE_PYTHON" -m venv "$VENV" || fail "'$BASE_PYTHON -m venv $VENV' failed (is python3-venv installed?)"
    fi
    echo "peft_venv.sh: installing torch==$TORCH transformers==$TRANSFORMERS peft==$PEFT bitsandbytes==$BITSANDBYTES into $VENV (about 5 GB from PyPI, most of it CUDA wheels)" >&2
    start=$(date +%s)
    "$PY" -m pip install --disable-pip-version-check --quiet --upgrade pip >&2 \
        || fail "upgrading pip in $VENV failed"
    "$PY" -m pip install --disable-pip-version-check --quiet \
        "torch==$TORCH" "transformers==$TRANSFORMERS" "peft==$PEFT" "bitsandbytes==$BITSANDBYTES" >&2 \
        || fail "pip install torch==$TORCH transformers==$TRANSFORMERS peft==$PEFT bitsandbytes==$BITSANDBYTES failed (see pip's output above)"
    pinned_ok || fail "$VENV does not import torch $TORCH, transformers $TRANSFORMERS, peft $PEFT and bitsandbytes $BITSANDBYTES after installing them"
    echo "peft_venv.sh: installed in $(( $(date +%s) - start )) s, venv size $(du -sh "$VENV" | cut -f1)" >&2
fi
echo "$PY"
