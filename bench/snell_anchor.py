"""SNELL anchor: the seed paper's reference SNELL layer in eager PyTorch, what `candle-peft bench
snell` is compared against.

The reference layer (seed 002): the update is a kernelized merge of two low-rank factors per head,
dW = sum_h c_h * cdist(In_h, Out_h) (torch.cdist), sparsified by competition: keep dW * |dW| where
|dW| is over its s-quantile (torch.quantile + F.threshold), recomputed in the backward pass
(torch.utils.checkpoint). On a CPU or for more than 2^24 elements torch.quantile refuses, so the
quantile falls back to two torch.kthvalue calls (linear interpolation, as torch.quantile does), and
the output says which was used.

Measures:
  layers   per LLaMA shape (d_in x d_out in {4096x4096, 4096x11008, 11008x4096}, tokens in
           {4096, 16384}; bf16 input and frozen weight): forward + backward time of the frozen
           linear, of the linear with an eager LoRA r 32, and with SNELL r 32 at sparsity 0.5 and
           0.99 (time, ratio to the frozen linear, peak extra memory), and the quantile's time
  model    a LLaMA-2-7B-shaped model (random bf16 weights, SDPA) with SNELL r 32, s 0.5 on
           q, k, v, up, down (f32 factors, as the seed's code keeps them), batch 16 x 256, AdamW,
           no checkpointing of the base: tokens/s and peak memory
  all      both (the default)

Run on the GPU machine (scripts/gpu_run.sh runs `snell_anchor.py layers` as
.gpu/anchors/snell_anchor.py after `candle-peft bench snell`):

    python3 bench/snell_anchor.py [layers|model|all] > snell_anchor.json

DEV=cpu runs `layers` on a CPU with one small shape (256 x 512, 64 tokens) as a smoke test;
`model` needs CUDA.

Output: JSON on stdout {"device", "torch", "layers": [{d_in, d_out, tokens, frozen_ms,
lora_r32_ms, lora_over_frozen, snell_s0.5_ms, snell_s0.5_peak_extra_mib, snell_s0.5_over_frozen,
(the same for s0.99), quantile_ms, quantile_impl}, ...], "model": {model, method, bs, seq,
tokens_per_s, peak_gib, trainable_params} or {error}}, with a progress line per row on stderr.
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEVICE = os.environ.get("DEV", "cuda")
GPU = DEVICE == "cuda"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)] if GPU else [(256, 512)]
TOKENS = [4096, 16384] if GPU else [64]
QUANTILE_LIMIT = 2**24  # torch.quantile refuses larger inputs
KTHVALUE = "kthvalue x2 (torch.quantile refuses > 2^24 elements)"


def quantile(a, q):
    """(the q-quantile of a with linear interpolation, how it was computed)."""
    flat = a.flatten()
    if flat.numel() <= QUANTILE_LIMIT:
        return torch.quantile(flat, q), "torch.quantile"
    pos = q * (flat.numel() - 1)
    lo = math.floor(pos)
    frac = pos - lo
    v0 = torch.kthvalue(flat, lo + 1).values
    v1 = torch.kthvalue(flat, min(lo + 2, flat.numel())).values
    return v0 + frac * (v1 - v0), KTHVALUE


class Snell(nn.Module):
    """The seed's SNELL branch: dW = sum_h c_h cdist(In_h, Out_h); keep dW*|dW| where |dW| > quantile(|dW|, s)."""

    def __init__(self, d_in, d_out, r=32, heads=2, sparsity=0.5):
        super().__init__()
        self.In = nn.Parameter(torch.empty(heads, d_in, r // heads, device=DEVICE))
        nn.init.kaiming_uniform_(self.In, a=math.sqrt(5))
        self.Out = nn.Parameter(torch.empty(heads, d_out, r // heads, device=DEVICE))
        nn.init.kaiming_uniform_(self.Out, a=math.sqrt(5))
        self.register_buffer("c", 0.1 * torch.tensor([1.0, -1.0], device=DEVICE).view(heads, 1, 1))
        self.s = sparsity
        self.how = None

    def delta(self, x, In, Out):
        dw = (self.c * torch.cdist(In, Out, p=2)).sum(0)
        a = dw.abs().detach()
        tau, self.how = quantile(a, self.s)
        return x @ (dw * F.threshold(a, float(tau), 0.0)).to(x.dtype)

    def forward(self, x):
        return checkpoint(self.delta, x, self.In, self.Out, use_reentrant=True)


class Lora(nn.Module):
    def __init__(self, d_in, d_out, r):
        super().__init__()
        self.A = nn.Linear(d_in, r, bias=False, device=DEVICE, dtype=torch.bfloat16)
        self.B = nn.Linear(r, d_out, bias=False, device=DEVICE, dtype=torch.bfloat16)
        nn.init.normal_(self.B.weight, std=0.02)

    def forward(self, x):
        return self.B(self.A(x)) * 2.0


# Memory and timing helpers that do nothing on a CPU.
def sync():
    if GPU:
        torch.cuda.synchronize()


def reset_peak():
    if GPU:
        torch.cuda.reset_peak_memory_stats()


def allocated():
    return torch.cuda.memory_allocated() if GPU else 0


def peak():
    return torch.cuda.max_memory_allocated() if GPU else 0


def empty_cache():
    if GPU:
        torch.cuda.empty_cache()


def timeit(fn, n=10):
    """Mean milliseconds per call of fn over n calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n * 1e3


def layers():
    rows = []
    for d_in, d_out in SHAPES:
        W = torch.randn(d_out, d_in, device=DEVICE, dtype=torch.bfloat16) * 0.02
        for tokens in TOKENS:
            x = torch.randn(tokens, d_in, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(tokens, d_out, device=DEVICE, dtype=torch.bfloat16)

            def frozen():
                (x @ W.t()).backward(g)

            lora = Lora(d_in, d_out, 32)

            def with_lora():
                (x @ W.t() + lora(x)).backward(g)

            row = dict(d_in=d_in, d_out=d_out, tokens=tokens, frozen_ms=timeit(frozen), lora_r32_ms=timeit(with_lora))
            row["lora_over_frozen"] = row["lora_r32_ms"] / row["frozen_ms"]
            for sparsity in (0.5, 0.99):
                snell = Snell(d_in, d_out, sparsity=sparsity)

                def with_snell():
                    (x @ W.t() + snell(x)).backward(g)

                sync()
                reset_peak()
                before = allocated()
                row[f"snell_s{sparsity}_ms"] = timeit(with_snell)
                row[f"snell_s{sparsity}_peak_extra_mib"] = (peak() - before) / 2**20
                row[f"snell_s{sparsity}_over_frozen"] = row[f"snell_s{sparsity}_ms"] / row["frozen_ms"]
                del snell
            a = torch.rand(d_in * d_out, device=DEVICE)
            row["quantile_ms"] = timeit(lambda: quantile(a, 0.5), n=5)
            row["quantile_impl"] = quantile(a[:10], 0.5)[1] if a.numel() <= QUANTILE_LIMIT else KTHVALUE
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
            x.grad = None
            del lora, a
            empty_cache()
    return rows


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in m.parameters():
        p.requires_grad_(False)
    branches = nn.ModuleList()
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"):
            branch = Snell(mod.in_features, mod.out_features)
            branches.append(branch)
            mod.register_forward_hook(lambda mod, inp, out, b=branch: out + b(inp[0]))
    m.train()
    opt = torch.optim.AdamW(branches.parameters(), lr=1e-4)
    bs, seq = 16, 256
    ids = torch.randint(0, 32000, (bs, seq), device=DEVICE)

    def step():
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / 5
    return dict(model="llama2-7b shape", method="SNELL r32 s0.5 (seed reference, PyTorch eager)", bs=bs, seq=seq,
                tokens_per_s=bs * seq / dt, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                trainable_params=sum(p.numel() for p in branches.parameters()))


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what not in ("layers", "model", "all"):
        sys.exit(f"usage: {sys.argv[0]} [layers|model|all]")
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name() if GPU else "cpu", "torch": torch.__version__}
    if what in ("layers", "all"):
        res["layers"] = layers()
    if what in ("model", "all"):
        try:
            res["model"] = model()
        except Exception as e:
            res["model"] = dict(error=str(e)[:400])
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
