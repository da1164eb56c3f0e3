#!/usr/bin/env bash
# Builds the CPU emulator of the CUDA path (kernels/emu/) for one `--features cuda` binary, so
# that the binary runs on a machine with no GPU: `candle-peft selftest` then checks every
# project kernel against its CPU reference, with the real host code launching them.
#
#   scripts/cuda_emu.sh target/cuda/release/candle-peft .cache/cuda-emu
#   LD_LIBRARY_PATH=.cache/cuda-emu target/cuda/release/candle-peft selftest
#
# What it builds: every kernels/*.cu and the candle-kernels sources that candle's CUDA tensor ops
# launch (from the cargo registry), compiled as C++ with kernels/emu/include/cuda_emu.h
# force-included, each file in a namespace of its own and each `extern "C"` kernel registered by
# name; the fiber scheduler and the driver / cuBLAS / cuRAND entry points (kernels/emu/*.cpp);
# and a stub that names itself and fails for every other CUDA entry point the binary imports.
# All of it is one shared library, linked under each CUDA soname the binary needs.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BINARY OUTDIR" >&2; exit 2; }
bin=$1
out=$2
root=$(cd "$(dirname "$0")/.." && pwd)
emu="$root/kernels/emu"
fail() { echo "cuda_emu.sh: error: $*" >&2; exit 1; }
[ -x "$bin" ] || fail "$bin is not an executable"

candle=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-kernels-0.11.* 2>/dev/null | head -n1)
[ -n "$candle" ] || fail "candle-kernels 0.11 is not in the cargo registry (build --features cuda first)"
CANDLE_KERNELS=(affine binary cast fill indexing reduce sort ternary unary)

mkdir -p "$out"
work=$(mktemp -d)
trap 'wait; rm -rf "$work"' EXIT  # background compiles finish first
CXX=${CXX:-g++}
# No FMA contraction: the kernels that need fused multiply-adds write fmaf.
FLAGS=(-std=c++20 -O2 -fPIC -ffp-contract=off -fno-strict-aliasing -w -I "$emu/include" -include cuda_emu.h)

sources=("$root"/kernels/*.cu)
for k in "${CANDLE_KERNELS[@]}"; do sources+=("$candle/src/$k.cu"); done

objects=()
pids=()
compiling=()
for cu in "${sources[@]}"; do
    stem=$(basename "$cu" .cu)
    [ "$cu" = "${cu#"$candle"}" ] && tag="project_$stem" || tag="candle_$stem"
    # Dynamic shared memory (`extern __shared__ T name[];`) becomes a pointer to the launch's
    # buffer; the copy is compiled with the original's folder on the include path.
    sed -E 's/extern +__shared__ +(__align__\([^)]*\) +)?([A-Za-z_0-9 ]*[A-Za-z_0-9]) +([A-Za-z_0-9]+) *\[\] *;/\2* \3 = (\2*)emu::dynamic_shared();/' \
        "$cu" > "$work/$tag.cu"
    cu_flags=("${FLAGS[@]}" -I "$(dirname "$cu")")
    "$CXX" "${cu_flags[@]}" -E -x c++ "$work/$tag.cu" > "$work/$tag.i" || fail "preprocessing $cu for the emulator failed"
    names=$({ grep -oE 'extern "C" +void +[A-Za-z_0-9]+ *\(' "$work/$tag.i" || true; } | sed -E 's/.*void +([A-Za-z_0-9]+).*/\1/' | sort -u)
    [ -n "$names" ] || fail "no extern \"C\" kernel found in $cu"
    {
        echo "namespace emu_$tag {"
        echo "#include \"$work/$tag.cu\""
        for n in $names; do echo "EMU_REGISTER($n)"; done
        echo "}"
    } > "$work/$tag.cpp"
    objects+=("$work/$tag.o")
    "$CXX" "${cu_flags[@]}" -c "$work/$tag.cpp" -o "$work/$tag.o" &
    pids+=($!)
    compiling+=("$cu")
    # Two compiles at a time; a failure names its file.
    if [ ${#pids[@]} -ge 2 ]; then
        wait "${pids[0]}" || fail "compiling ${compiling[0]} for the emulator failed"
        pids=("${pids[@]:1}")
        compiling=("${compiling[@]:1}")
    fi
done
for i in "${!pids[@]}"; do wait "${pids[$i]}" || fail "compiling ${compiling[$i]} for the emulator failed"; done

for f in scheduler driver; do
    "$CXX" "${FLAGS[@]}" -c "$emu/$f.cpp" -o "$work/$f.o" || fail "compiling $emu/$f.cpp failed"
    objects+=("$work/$f.o")
done

# Every CUDA entry point the binary imports and the emulator does not define fails loudly.
nm -D --undefined-only "$bin" | awk '{print $2}' | { grep -E '^(cu|cublas|curand|nvrtc|cuda|__cuda)[A-Z_a-z]' || true; } | sort -u > "$work/imported_versioned"
sed 's/@.*//' "$work/imported_versioned" | sort -u > "$work/imported"
nm --defined-only "$work/driver.o" | awk '$2 == "T" {print $3}' | sort -u > "$work/defined"
{
    echo '#include <cstdio>'
    echo 'static int emu_missing(const char* name) { std::fprintf(stderr, "cuda-emu: %s is not emulated\n", name); return 801; }'
    comm -23 "$work/imported" "$work/defined" | while read -r s; do echo "extern \"C\" int $s() { return emu_missing(\"$s\"); }"; done
} > "$work/stubs.cpp"
"$CXX" -O1 -fPIC -c "$work/stubs.cpp" -o "$work/stubs.o"
objects+=("$work/stubs.o")

# The binary asks for some symbols at a version (cublasCreate_v2@libcublas.so.13): each version
# it names becomes a node of the library's version script, holding those symbols.
: > "$work/versions.map"
for v in $(grep '@' "$work/imported_versioned" | sed 's/.*@//' | sort -u); do
    {
        echo "$v {"
        echo "  global:"
        grep "@$v\$" "$work/imported_versioned" | sed 's/@.*//; s/^/    /; s/$/;/'
        echo "};"
    } >> "$work/versions.map"
done

"$CXX" -shared -o "$out/libcuda-emu.so" "${objects[@]}" -Wl,--version-script="$work/versions.map" || fail "linking the emulator failed"
for soname in $(readelf -d "$bin" | sed -n 's/.*NEEDED.*\[\(.*\)\].*/\1/p' | grep -E '^lib(cuda|cublas|cublasLt|curand|nvrtc|cudart)\.so' || true); do
    ln -sf libcuda-emu.so "$out/$soname"
done
echo "cuda_emu.sh: $out/libcuda-emu.so ($(comm -12 "$work/imported" "$work/defined" | wc -l) entry points emulated, $(comm -23 "$work/imported" "$work/defined" | wc -l) stubs)" >&2
