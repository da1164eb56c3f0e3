"""PyTorch + PEFT anchor on the GPU: what the engine's LoRA / DoRA numbers are compared against.

Measures, in bf16 on CUDA with TF32 matmuls allowed:

1. an unfused LoRA linear, forward + backward in eager PyTorch
   (y = x @ W^T + 2 * (x @ A^T) @ B^T, gradients for x, A and B, W frozen), against the frozen
   linear alone (y = x @ W^T, gradient for x), for d_in x d_out in {4096x4096, 4096x11008,
   11008x4096}, r in {16, 64}, tokens in {4096, 16384};
2. a full training step (forward, backward, AdamW) of PEFT LoRA and DoRA, r 32, alpha 64, on
   q, k, v, up, down of LLaMA-2-7B and LLaMA-3-8B shaped models (random weights, SDPA
   attention), batch 16 x 256 tokens, without and with gradient checkpointing: tokens/s and peak
   memory (torch.cuda.max_memory_allocated).

Run on the GPU machine (torch, transformers, peft installed; scripts/gpu_run.sh kernels runs it
after `candle-peft bench kernels`, as .gpu/anchors/peft_baseline.py):

    python3 bench/peft_baseline.py > peft_baseline.json

Output: JSON on stdout
    {"torch": VERSION,
     "lora_linear_fwd_bwd": [{din, dout, r, tokens, lora_ms, frozen_linear_ms, overhead}, ...],
     "e2e_train_step": [{model, method, grad_ckpt, batch, seq, step_s, tokens_per_s, peak_gib}
                        or {model, method, grad_ckpt, error}, ...]}
with one progress line (JSON) per measurement on stderr.
"""

import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = "cuda"

SHAPES = {
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
BATCH, SEQ = 16, 256


def timeit(fn, iters=10, warm=3):
    """Mean seconds per call of fn, after warm-up calls, synchronised with the GPU."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def lora_linear_microbench():
    rows = []
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)
    for din, dout in [(4096, 4096), (4096, 11008), (11008, 4096)]:
        for r in [16, 64]:
            for tokens in [4096, 16384]:
                W = torch.randn(dout, din, **bf16) * 0.02
                A = (torch.randn(r, din, **bf16) * 0.02).requires_grad_()
                B = (torch.randn(dout, r, **bf16) * 0.02).requires_grad_()
                x = torch.randn(tokens, din, **bf16, requires_grad=True)
                grad = torch.randn(tokens, dout, **bf16)

                def step_lora():
                    y = x @ W.t() + 2.0 * ((x @ A.t()) @ B.t())
                    y.backward(grad)

                def step_base():
                    y = x @ W.t()
                    y.backward(grad)

                t_lora = timeit(step_lora)
                t_base = timeit(step_base)
                rows.append(dict(din=din, dout=dout, r=r, tokens=tokens, lora_ms=t_lora * 1e3,
                                 frozen_linear_ms=t_base * 1e3, overhead=t_lora / t_base))
    print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def train_steps():
    rows = []
    for name, shape in SHAPES.items():
        cfg = LlamaConfig(max_position_embeddings=2048, **shape)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(DEVICE):
            base = LlamaForCausalLM(cfg).to(torch.bfloat16)
        for method in ["lora", "dora"]:
            for grad_ckpt in [False, True]:
                config = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=TARGETS,
                                    use_dora=(method == "dora"), task_type="CAUSAL_LM")
                model = get_peft_model(base, config)
                if grad_ckpt:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    model.enable_input_require_grads()
                model.train()
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), device=DEVICE)

                def step():
                    out = model(input_ids=ids, labels=ids)
                    out.loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                try:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    t = timeit(step, iters=5, warm=2)
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    rec = dict(model=name, method=method, grad_ckpt=grad_ckpt, batch=BATCH, seq=SEQ, step_s=t,
                               tokens_per_s=BATCH * SEQ / t, peak_gib=peak)
                except Exception as e:  # out of memory is a result too
                    rec = dict(model=name, method=method, grad_ckpt=grad_ckpt, error=str(e)[:200])
                print(json.dumps(rec), file=sys.stderr)
                rows.append(rec)
                if grad_ckpt:
                    model.gradient_checkpointing_disable()
                base = model.unload()  # strip the adapter, keep the base for the next method
                del model, opt
                torch.cuda.empty_cache()
        del base
        torch.cuda.empty_cache()
    return rows


def main():
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {"torch": torch.__version__}
    res["lora_linear_fwd_bwd"] = lora_linear_microbench()
    res["e2e_train_step"] = train_steps()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
