#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, on what scripts/gpu_pack.sh carried in .gpu/.
# Results go to $OUT (the device tool brings that folder back).
#
#   bash .gpu/run.sh selftest       every CUDA kernel against its CPU reference
#   bash .gpu/run.sh kernels        bench kernels, then the PyTorch + PEFT anchor in the same session
#   bash .gpu/run.sh snell          bench snell, then the seed's PyTorch SNELL layer (snell_anchor.py)
#   bash .gpu/run.sh -- ARGS...     any candle-peft command
set -euo pipefail
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
[ -x .gpu/candle-peft ] || unxz -k .gpu/candle-peft.xz
bin=.gpu/candle-peft
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/device.txt"
case "${1:-selftest}" in
    selftest) "$bin" selftest --json "$OUT/selftest.json" | tee "$OUT/selftest.txt" ;;
    kernels)
        "$bin" bench kernels --ops lora,control,dora,nf4 --json "$OUT/kernels.json" | tee "$OUT/kernels.txt"
        python3 .gpu/anchors/peft_baseline.py > "$OUT/peft_baseline.json" 2> "$OUT/peft_baseline.log"
        ;;
    snell)
        "$bin" bench snell --warmup 2 --iters 5 --json "$OUT/snell.json" | tee "$OUT/snell.txt"
        python3 .gpu/anchors/snell_anchor.py layers > "$OUT/snell_anchor.json" 2> "$OUT/snell_anchor.log"
        ;;
    --) shift; "$bin" "$@" ;;
    *) echo "gpu_run.sh: unknown step '$1' (selftest, kernels, snell, -- ARGS)" >&2; exit 2 ;;
esac
