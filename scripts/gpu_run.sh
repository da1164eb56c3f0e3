#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, on what scripts/gpu_pack.sh carried in .gpu/.
# Results go to $OUT (the device tool brings that folder back).
#
#   bash .gpu/run.sh all            everything below in one call, most needed first, each step
#                                   under its own time limit so that one slow step costs only itself,
#                                   all of them within GPU_RUN_BUDGET seconds (540)
#   bash .gpu/run.sh selftest       every CUDA kernel against its CPU reference
#   bash .gpu/run.sh kernels        bench kernels, then the PyTorch + PEFT anchor in the same session
#   bash .gpu/run.sh snell          bench snell, then the seed's PyTorch SNELL layer (snell_anchor.py)
#   bash .gpu/run.sh -- ARGS...     any candle-peft command
#
# Off the GPU machine, the same steps run on the CPU emulator as a smoke test of this script:
#   CANDLE_PEFT_BIN=target/cuda/release/candle-peft LD_LIBRARY_PATH=target/cuda-emu \
#       GPU_RUN_SMOKE=1 OUT=target/gpu-smoke bash scripts/gpu_run.sh all
# (tiny shapes, no PyTorch anchors: it checks the commands and their files, measures nothing).
set -euo pipefail
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda-13.0/targets/x86_64-linux/lib"
OUT="${OUT:-gpu-out}"
# The commands refuse to replace an earlier run's reports: start from an empty folder.
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "gpu_run.sh: $OUT holds an earlier run's files; choose another OUT (nothing was run)" >&2
    exit 2
fi
mkdir -p "$OUT"
bin="${CANDLE_PEFT_BIN:-.gpu/candle-peft}"
[ -x "$bin" ] || unxz -k "$bin.xz"
smoke="${GPU_RUN_SMOKE:-}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
else
    echo "no nvidia-smi: ${smoke:+smoke run on the CPU emulator}" | tee "$OUT/device.txt"
fi
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/device.txt"

# The benches' sizes: the issues' shapes on the GPU, tiny ones for the smoke run.
if [ -n "$smoke" ]; then
    LINEAR=(--dims 96x80 --ranks 4 --tokens 24 --warmup 0 --iters 1)
    NF4=("${LINEAR[@]}")
    SNELL=(--dims 96x80 --tokens 24 --snell-rank 8 --warmup 0 --iters 1)
    MODEL=(--shape tiny --batch 2 --seq 16 --steps 2)
    ATTENTION=(--tokens 32 --seqs 16 --attention-heads 2 --head-dim 16 --warmup 0 --iters 1)
    GQA_KV_HEADS=1
else
    LINEAR=()
    NF4=(--dims 4096x4096,4096x11008,11008x4096,16384x16384)  # the last: the anchor's largest
    SNELL=(--warmup 2 --iters 5)
    ATTENTION=(--warmup 2 --iters 5)
    GQA_KV_HEADS=8  # Llama-3-8B's 32 query heads over 8
    MODEL=(--shape llama2-7b --batch 16 --seq 256 --steps 3)
fi

# step NAME SECONDS COMMAND...: runs it under its time limit, stdout to $OUT/NAME.txt and stderr
# to $OUT/NAME.log, and records the outcome in $OUT/steps.txt without stopping the run.
# No step outlives GPU_RUN_BUDGET seconds from the start (default 540, under the device tool's
# 600 s a call): a step gets the smaller of its own limit and what is left, and none starts with
# under 20 s left.
budget_end=$((SECONDS + ${GPU_RUN_BUDGET:-540}))
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget_end - SECONDS))
    if [ "$left" -lt 20 ]; then echo "$name skipped (budget)" | tee -a "$OUT/steps.txt"; return 0; fi
    [ "$limit" -le "$left" ] || limit=$left
    local start=$SECONDS rc=0
    timeout "$limit" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log" || rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
}

# anchor NAME SECONDS ARGS...: a PyTorch anchor script as a step (its JSON is NAME.txt); skipped in
# the smoke run, which has no PyTorch on a GPU.
anchor() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$smoke" ]; then echo "$name skipped (smoke run)" | tee -a "$OUT/steps.txt"; return 0; fi
    step "$name" "$limit" python3 ".gpu/anchors/$name.py" "$@"
}

case "${1:-selftest}" in
    all)
        : > "$OUT/steps.txt"
        step selftest 120 "$bin" selftest --json "$OUT/selftest.json"
        step kernels 150 "$bin" bench kernels --ops lora,control,dora "${LINEAR[@]}" --json "$OUT/kernels.json"
        step nf4 90 "$bin" bench nf4 "${NF4[@]}" --json "$OUT/nf4.json"
        step snell 150 "$bin" bench snell "${SNELL[@]}" --json "$OUT/snell.json"
        anchor snell_anchor 120 layers
        step qlora_7b 150 "$bin" bench methods "${MODEL[@]}" --device cuda --dtype bf16 --methods lora,control --quantize nf4 --gradient-checkpointing --output "$OUT/qlora_7b.json"
        step qlora_7b_gemm 150 "$bin" --attention-kernel gemm bench methods "${MODEL[@]}" --device cuda --dtype bf16 --methods lora --quantize nf4 --gradient-checkpointing --output "$OUT/qlora_7b_gemm.json"
        step attention 60 "$bin" bench kernels --ops attention "${ATTENTION[@]}" --json "$OUT/attention.json"
        step methods_7b 150 "$bin" bench methods "${MODEL[@]}" --device cuda --dtype bf16 --methods lora,control,double_control,snell --output "$OUT/methods_7b.json"
        step attention_gqa 60 "$bin" bench kernels --ops attention "${ATTENTION[@]}" --kv-heads "$GQA_KV_HEADS" --json "$OUT/attention_gqa.json"
        ! grep -q " rc=[1-9]" "$OUT/steps.txt"
        ;;
    selftest) "$bin" selftest --json "$OUT/selftest.json" | tee "$OUT/selftest.txt" ;;
    kernels)
        "$bin" bench kernels --ops lora,control,dora,nf4 "${LINEAR[@]}" --json "$OUT/kernels.json" | tee "$OUT/kernels.txt"
        anchor peft_baseline 600
        ;;
    snell)
        "$bin" bench snell "${SNELL[@]}" --json "$OUT/snell.json" | tee "$OUT/snell.txt"
        anchor snell_anchor 600 layers
        ;;
    --) shift; "$bin" "$@" ;;
    *) echo "gpu_run.sh: unknown step '$1' (all, selftest, kernels, snell, -- ARGS)" >&2; exit 2 ;;
esac
