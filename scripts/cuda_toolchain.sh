#!/usr/bin/env bash
# Installs, or reuses, a CUDA 13.0 toolchain from PyPI wheels so that
# `cargo build --release --features cuda` works on a machine with no GPU and no system CUDA
# (CI, the build machine). With a system toolkit (nvcc on PATH, libcuda from the driver) this
# script is not needed.
#
#   eval "$(scripts/cuda_toolchain.sh)"     # stdout: export lines, and nothing else
#   cargo build --release --features cuda
#
# Why 13.0 exactly: the PTX that nvcc emits must be accepted by the GPU machine's driver
# (580, CUDA 13.0); a newer nvcc emits PTX that driver rejects. nvidia-nvvm and
# nvidia-cuda-cccl are pinned too: pip would otherwise pull a newer nvvm, and without cccl
# cuda_fp16.h fails on `#include <nv/target>`.
#
# The wheels carry only versioned libraries, and no wheel carries libcuda (it belongs to the
# driver), so two gaps are closed in the toolchain's lib/: unversioned link names, and a
# link-time stub libcuda.so (soname libcuda.so.1) that defines every driver function cudarc
# declares. At run time the driver's real libcuda.so.1 is loaded instead: the stub is for
# linking only and must not be put on LD_LIBRARY_PATH of a machine with a GPU.
#
# Location: ${CANDLE_PEFT_CUDA:-$HOME/.cache/candle-peft/cuda-13.0} (about 1.2 GB), reused when
# nvcc there reports release 13.0. Progress goes to stderr; any failure exits non-zero.
set -euo pipefail

DIR="${CANDLE_PEFT_CUDA:-$HOME/.cache/candle-peft/cuda-13.0}"
BASE_PYTHON="${PYTHON:-python3}"
WHEELS=(
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.5.25 nvidia-cuda-nvrtc==13.0.88
)

fail() { echo "cuda_toolchain.sh: error: $*" >&2; exit 1; }

root() { echo "$("$DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"; }

toolchain_ok() {
    [ -x "$DIR/bin/python" ] || return 1
    local c; c=$(root)
    [ -x "$c/bin/nvcc" ] && "$c/bin/nvcc" --version 2>/dev/null | grep -q "release 13.0" \
        && [ -e "$c/lib/libcuda.so" ] && [ -e "$c/lib/libcublas.so" ]
}

# cudarc's declared driver functions: every one gets an empty definition in the stub.
cudarc_driver_sys() {
    local f
    for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs; do
        [ -e "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

if toolchain_ok; then
    echo "cuda_toolchain.sh: reusing $DIR" >&2
else
    command -v "$BASE_PYTHON" >/dev/null || fail "no '$BASE_PYTHON' on PATH to create the venv with"
    start=$(date +%s)
    [ -x "$DIR/bin/python" ] || "$BASE_PYTHON" -m venv "$DIR" || fail "'$BASE_PYTHON -m venv $DIR' failed"
    echo "cuda_toolchain.sh: installing ${WHEELS[*]} into $DIR (about 1.2 GB from PyPI)" >&2
    "$DIR/bin/pip" install --disable-pip-version-check --quiet "${WHEELS[@]}" >&2 \
        || fail "pip install of the CUDA 13.0 wheels failed (no network? see pip's output above)"
    c=$(root)
    for lib in cublas cublasLt curand nvrtc cudart; do
        versioned=$(cd "$c/lib" && ls "lib$lib.so."* 2>/dev/null | sort | head -n1)
        [ -n "$versioned" ] || fail "no lib$lib.so.* in $c/lib"
        ln -sf "$versioned" "$c/lib/lib$lib.so"
    done
    if ! sys=$(cudarc_driver_sys); then
        echo "cuda_toolchain.sh: fetching cudarc's sources to read the driver API from" >&2
        (cd "$(dirname "$0")/.." && cargo fetch --quiet) || fail "cargo fetch failed"
        sys=$(cudarc_driver_sys) || fail "cudarc 0.19's driver/sys/mod.rs is not in the cargo registry"
    fi
    stub=$(mktemp -d)
    grep -o 'pub unsafe fn cu[A-Za-z0-9_]*(' "$sys" | sed 's/pub unsafe fn \(.*\)(/void \1(void){}/' \
        | sort -u > "$stub/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$c/lib/libcuda.so" "$stub/libcuda_stub.c" \
        || fail "building the libcuda link stub failed"
    rm -rf "$stub"
    toolchain_ok || fail "$DIR does not hold a working CUDA 13.0 nvcc after installing"
    echo "cuda_toolchain.sh: installed in $(( $(date +%s) - start )) s, $(du -sh "$DIR" | cut -f1)" >&2
fi
c=$(root)
echo "export CUDA_HOME='$c'"
echo "export PATH='$c/bin':\"\$PATH\""
echo "export LIBRARY_PATH='$c/lib':\"\${LIBRARY_PATH:-}\""
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
