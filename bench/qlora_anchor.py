"""QLoRA anchor: bitsandbytes NF4 and QLoRA / QControl training on the GPU, what `candle-peft bench
nf4` and the engine's NF4 training steps are compared against.

Measures, on CUDA with bitsandbytes (NF4, block 64, double quantization):

1. NF4 dequantization to bf16 for 4096x4096, 11008x4096 and 16384x16384 weights: time and
   bandwidth (packed codes read + bf16 written; the statistics are small), the mean absolute
   quantization error, and the 4-bit GEMV at batch 1 (bnb.matmul_4bit) with its bandwidth over the
   packed weights;
2. a LLaMA-2-7B-shaped model (random weights, SDPA attention) with every linear of the decoder
   layers replaced by bnb.nn.Linear4bit (NF4 base, bf16 compute): the weights' GPU memory, then
   training steps at batch 16 x 256 with AdamW:
   - QLoRA: PEFT LoRA r 32, alpha 64 on q, k, v, up, down, without and with gradient checkpointing;
   - QControl: Parallel Control r 64 (a low-rank f32 branch from the post-attention norm's input
     added to the MLP's output, through PyTorch hooks), without checkpointing.

Run on the GPU machine, with the bitsandbytes wheel (it carries its CUDA library) importable, e.g.
installed with `pip install --no-index --no-deps --target DIR bitsandbytes-*.whl` and DIR on
PYTHONPATH:

    python3 bench/qlora_anchor.py > qlora_anchor.json

Output: JSON on stdout {"bitsandbytes": VERSION,
  "nf4_dequant": [{shape, dequant_ms, GBps, mean_abs_err, gemv_4bit_ms, gemv_GBps}, ...],
  "nf4_model_weight_gib": GiB,
  "train_llama2_7b_nf4": [{method, grad_ckpt, tokens_per_s, peak_gib} or {method, ..., error}, ...]},
with progress lines on stderr.
"""

import json
import sys
import time

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = "cuda"


def tm(fn, it=20, w=3):
    """Mean seconds per call of fn over `it` calls after `w` warm-up calls."""
    for _ in range(w):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(it):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / it


def nf4_dequant():
    rows = []
    for out_f, in_f in [(4096, 4096), (11008, 4096), (16384, 16384)]:
        w = torch.randn(out_f, in_f, device=DEVICE, dtype=torch.bfloat16)
        q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        t = tm(lambda: F.dequantize_4bit(q, state, quant_type="nf4"))
        moved = q.numel() * q.element_size() + out_f * in_f * 2  # packed codes read + bf16 written
        err = (F.dequantize_4bit(q, state, quant_type="nf4").float() - w.float()).abs().mean().item()
        x = torch.randn(1, in_f, device=DEVICE, dtype=torch.bfloat16)
        t_gemv = tm(lambda: bnb.matmul_4bit(x, q.t(), quant_state=state))
        rows.append(dict(shape=[out_f, in_f], dequant_ms=t * 1e3, GBps=moved / t / 1e9, mean_abs_err=err,
                         gemv_4bit_ms=t_gemv * 1e3, gemv_GBps=q.numel() * q.element_size() / t_gemv / 1e9))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def nf4_llama2_7b():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent, names in [(layer.self_attn, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                              (layer.mlp, ["gate_proj", "up_proj", "down_proj"])]:
            for n in names:
                old = getattr(parent, n)
                new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=torch.bfloat16,
                                        compress_statistics=True, quant_type="nf4")
                # Quantized when moved to the GPU.
                new.weight = bnb.nn.Params4bit(old.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                               quant_type="nf4", blocksize=64)
                setattr(parent, n, new.to(DEVICE))
                del old
    torch.cuda.empty_cache()
    for p in model.parameters():
        p.requires_grad_(False)
    return cfg, model


class Ctl(nn.Module):
    """A control branch: B(A(h)) in f32, B zero-initialised."""

    def __init__(self, d, r):
        super().__init__()
        self.A = nn.Linear(d, r, bias=False)
        self.B = nn.Linear(r, d, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=5**0.5)
        nn.init.zeros_(self.B.weight)

    def forward(self, h):
        return self.B(self.A(h.float())).to(h.dtype)


def main():
    res = {"bitsandbytes": bnb.__version__}
    res["nf4_dequant"] = nf4_dequant()

    cfg, model = nf4_llama2_7b()
    res["nf4_model_weight_gib"] = torch.cuda.memory_allocated() / 2**30
    print("nf4 model GiB", res["nf4_model_weight_gib"], file=sys.stderr)

    def bench(params, grad_ckpt, bs=16, seq=256):
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (bs, seq), device=DEVICE)

        def step():
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = tm(step, it=4, w=2)
        if grad_ckpt:
            model.gradient_checkpointing_disable()
        return dict(tokens_per_s=bs * seq / t, peak_gib=torch.cuda.max_memory_allocated() / 2**30)

    rows = []
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    for grad_ckpt in [False, True]:
        try:
            rec = dict(method="qlora_r32", grad_ckpt=grad_ckpt,
                       **bench([p for p in peft_model.parameters() if p.requires_grad], grad_ckpt))
        except Exception as e:
            rec = dict(method="qlora_r32", grad_ckpt=grad_ckpt, error=str(e)[:200])
        print(json.dumps(rec), file=sys.stderr)
        rows.append(rec)
    model = peft_model.unload()
    del peft_model
    torch.cuda.empty_cache()

    # QControl: Parallel Control r 64 on each MLP block of the NF4 model.
    ctls = nn.ModuleList()
    for layer in model.model.layers:
        ctl = Ctl(4096, 64).to(DEVICE)
        ctls.append(ctl)
        st = {}
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, st=st: st.__setitem__("h2", a[0]))
        layer.mlp.register_forward_hook(lambda m, a, o, st=st, c=ctl: o + c(st["h2"]))
    try:
        rec = dict(method="qcontrol_r64", grad_ckpt=False, **bench(list(ctls.parameters()), False))
    except Exception as e:
        rec = dict(method="qcontrol_r64", error=str(e)[:200])
    print(json.dumps(rec), file=sys.stderr)
    rows.append(rec)
    res["train_llama2_7b_nf4"] = rows
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
