"""CPU anchor: PyTorch + PEFT on the real SmolLM2-135M on this project's CPU machines (2 cores), what
the engine's CPU training and decoding figures are compared against.

Measures, with the model in f32:
  decode_bs1_tok_s                          transformers' generate, greedy, batch 1, KV cache:
                                            64 new tokens after a 32-token prompt (after an
                                            8-token warm-up)
  prefill_tok_s                             one forward pass over batch 4 x 256 (after a warm-up)
  lora_train_tok_s_bs4x256                  a PEFT LoRA r 32, alpha 64 training step on q, k, v,
                                            up, down (AdamW), batch 4 x 256, mean of 3 after one
  lora_train_bf16_autocast_tok_s_bs4x256    the same step under torch.autocast("cpu", bf16), as
                                            PyTorch users run it on CPUs with AMX / AVX-512 BF16
  peak_rss_gib, threads, torch

HF_DIR is a transformers model directory of SmolLM2-135M: the GGUF that scripts/fetch_assets.sh
fetches, converted by `candle-peft convert` (GGUF to a Hugging Face directory). Run with the venv
from scripts/peft_venv.sh:

    $(scripts/peft_venv.sh) bench/cpu_anchor.py HF_DIR > cpu_anchor.json

Output: one JSON object on stdout with the keys above. Figures move between machines and days:
compare only within one run.
"""

import json
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

BATCH, SEQ = 4, 256
STEPS = 3


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} HF_DIR")
    hf_dir = sys.argv[1]
    torch.manual_seed(0)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    ids = torch.randint(100, 40000, (1, 32))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        res["decode_bs1_tok_s"] = 64 / (time.perf_counter() - start)

    with torch.no_grad():
        x = torch.randint(100, 40000, (BATCH, SEQ))
        model(input_ids=x)
        start = time.perf_counter()
        model(input_ids=x)
        res["prefill_tok_s"] = BATCH * SEQ / (time.perf_counter() - start)

    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(100, 40000, (BATCH, SEQ))

    def step():
        peft_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for key, fn in [("lora_train_tok_s_bs4x256", step), ("lora_train_bf16_autocast_tok_s_bs4x256", step_bf16)]:
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(STEPS):
            fn()
        res[key] = BATCH * SEQ * STEPS / (time.perf_counter() - start)

    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
