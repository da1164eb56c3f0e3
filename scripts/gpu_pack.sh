#!/usr/bin/env bash
# Packs what a session carries to the GPU machine (the `device` tool, `carry: [".gpu"]`): the
# CUDA build of candle-peft, stripped and xz-compressed (a 70 MB binary becomes a few MB: the
# embedded PTX is text), the PyTorch + PEFT anchor scripts (bench/*.py), and scripts/gpu_run.sh.
# The GPU machine has the CUDA 13.0 runtime, torch, transformers and peft, but no Rust: build here.
#
#   scripts/gpu_pack.sh                      # then, on the device: bash .gpu/run.sh selftest
set -euo pipefail
cd "$(dirname "$0")/.."
# The anchors live in bench/ (bench/README.md); gpu_run.sh runs them as .gpu/anchors/NAME.py.
for anchor in bench/peft_baseline.py bench/snell_anchor.py; do
    [ -f "$anchor" ] || { echo "gpu_pack.sh: error: $anchor is missing (the anchors live in bench/)" >&2; exit 1; }
done
eval "$(scripts/cuda_toolchain.sh)"
cargo build --release --features cuda --target-dir target/cuda >&2
rm -rf .gpu && mkdir -p .gpu/anchors
strip -o .gpu/candle-peft target/cuda/release/candle-peft
xz -T2 -9 .gpu/candle-peft
cp bench/*.py .gpu/anchors/
cp scripts/gpu_run.sh .gpu/run.sh
echo "gpu_pack.sh: .gpu holds $(du -sh .gpu | cut -f1) (the carry limit is 64 MiB)" >&2
