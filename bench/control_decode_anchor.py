"""Control and decode anchor on the GPU: Parallel / Double Control (seed 001) written in PyTorch,
against PEFT LoRA, and Hugging Face transformers' greedy decoding; what the engine's control
methods and its decoding are compared against.

Measures, on a LLaMA-2-7B-shaped model (random bf16 weights, SDPA attention, frozen):

1. training steps (forward, backward, AdamW) at batch 16 x 256, warm-up 2, mean of 5, without and
   with gradient checkpointing, for control branches B(A(h)) (f32 weights, B zero-initialised)
   added through PyTorch hooks:
   - parallel_control_r64: one branch per layer, from the post-attention norm's input to the
     MLP's output;
   - double_control_r64 / double_control_r32: that, plus one from the input norm's input to the
     attention's output;
   - control_r64+lora_qkv_r32 (without checkpointing only): Parallel Control r 64 plus PEFT LoRA
     r 32 on q, k, v, the seed's LLaMA-3 mode;
   each: tokens/s, peak memory, trainable parameters (millions);
2. transformers' generate, greedy, batch 1, 128-token prompt, 256 new tokens (after a 16-token
   warm-up): tokens/s and the weights' size.

Run on the GPU machine (torch, transformers, peft installed):

    python3 bench/control_decode_anchor.py > control_decode_anchor.json

Output: JSON on stdout
    {"control_train_step_llama2_7b": [{method, grad_ckpt, tokens_per_s, peak_gib, trainable_m}
                                      or {method, grad_ckpt, error}, ...],
     "hf_decode_llama2_7b_bs1": {new_tokens, tokens_per_s, weight_gib}}
with progress lines on stderr.
"""

import json
import sys
import time

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = "cuda"
HIDDEN = 4096


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


def add_control(model, r, double):
    """Hooks a control branch on every layer's MLP (and, with `double`, its attention)."""
    ctls = nn.ModuleList()
    for layer in model.model.layers:
        c_mlp = Ctl(HIDDEN, r).to(DEVICE)
        ctls.append(c_mlp)
        st = {}

        def pre_norm(mod, args, st=st):
            st["h2"] = args[0]

        def mlp_out(mod, args, out, st=st, c=c_mlp):
            return out + c(st["h2"])

        hooks = [layer.post_attention_layernorm.register_forward_pre_hook(pre_norm),
                 layer.mlp.register_forward_hook(mlp_out)]
        if double:
            c_att = Ctl(HIDDEN, r).to(DEVICE)
            ctls.append(c_att)

            def in_norm(mod, args, st=st):
                st["h"] = args[0]

            def attn_out(mod, args, out, st=st, c=c_att):
                return (out[0] + c(st["h"]),) + tuple(out[1:])

            hooks += [layer.input_layernorm.register_forward_pre_hook(in_norm),
                      layer.self_attn.register_forward_hook(attn_out)]
        layer._ctl_hooks = hooks
    return ctls


def remove_control(model):
    for layer in model.model.layers:
        for h in layer._ctl_hooks:
            h.remove()


def main():
    res = {}
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)

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
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - start) / 5
        if grad_ckpt:
            model.gradient_checkpointing_disable()
        return dict(tokens_per_s=bs * seq / dt, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                    trainable_m=sum(p.numel() for p in params) / 1e6)

    rows = []
    for name, r, double in [("parallel_control_r64", 64, False), ("double_control_r64", 64, True),
                            ("double_control_r32", 32, True)]:
        for grad_ckpt in [False, True]:
            ctls = add_control(model, r, double)
            try:
                rec = dict(method=name, grad_ckpt=grad_ckpt, **bench(list(ctls.parameters()), grad_ckpt))
            except Exception as e:
                rec = dict(method=name, grad_ckpt=grad_ckpt, error=str(e)[:160])
            remove_control(model)
            del ctls
            torch.cuda.empty_cache()
            print(json.dumps(rec), file=sys.stderr)
            rows.append(rec)

    # Control r 64 on the MLP + LoRA r 32 on q, k, v (the seed's LLaMA-3 mode).
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    ctls = add_control(model, 64, False)
    params = [p for p in peft_model.parameters() if p.requires_grad] + list(ctls.parameters())
    for grad_ckpt in [False]:
        try:
            rec = dict(method="control_r64+lora_qkv_r32", grad_ckpt=grad_ckpt, **bench(params, grad_ckpt))
        except Exception as e:
            rec = dict(method="control+lora", error=str(e)[:160])
        print(json.dumps(rec), file=sys.stderr)
        rows.append(rec)
    remove_control(model)
    model = peft_model.unload()
    del ctls, peft_model
    torch.cuda.empty_cache()
    res["control_train_step_llama2_7b"] = rows

    # Greedy decoding, batch 1.
    model.eval()
    model.config.use_cache = True
    ids = torch.randint(0, cfg.vocab_size, (1, 128), device=DEVICE)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=256, do_sample=False, min_new_tokens=256)
        torch.cuda.synchronize()
        dt = time.perf_counter() - start
    res["hf_decode_llama2_7b_bs1"] = dict(new_tokens=256, tokens_per_s=256 / dt,
                                          weight_gib=sum(p.numel() * 2 for p in model.parameters()) / 2**30)
    print(json.dumps(res["hf_decode_llama2_7b_bs1"]), file=sys.stderr)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
