#!/usr/bin/env python3
"""Independent reference for the SmolLM2 forward pass: mean log-likelihood of a prompt.

Why: the Rust engine's LLaMA forward (on weights from `candle_peft::loading::gguf`, Q/K
un-permuted, rotate-half RoPE) needs a check that shares no code with it. This script reads the
GGUF with the `gguf` package, dequantizes with `gguf.quants`, and runs a plain numpy LLaMA in
float64 directly on llama.cpp's layout (Q/K left permuted, interleaved-pair RoPE, as llama.cpp
computes it). It prints JSON: token ids, per-token log-probs, and the mean log-likelihood of
tokens 1..n given their prefix.

    pip install -r tests/reference/requirements.txt
    python tests/reference/smollm2_reference.py [--gguf PATH] [--text TEXT | --ids 1,2,3]

Default GGUF: $CANDLE_PEFT_ASSETS or .cache/assets, then smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(see scripts/fetch_assets.sh). Text is tokenized with the `tokenizers` package, from a byte-level
BPE built here from the GGUF's own vocab and merges (no BOS is added, as SmolLM2 does not).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

DEFAULT_TEXT = "The capital of France is Paris. The capital of Germany is Berlin."


def default_gguf() -> Path:
    root = os.environ.get("CANDLE_PEFT_ASSETS") or Path(__file__).resolve().parents[2] / ".cache/assets"
    return Path(root) / "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def load_weights(reader: GGUFReader) -> dict:
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        weights[t.name] = np.asarray(w, dtype=np.float64).reshape([int(d) for d in reversed(t.shape)])
    return weights


def tokenize(reader: GGUFReader, text: str) -> list:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok.encode(text).ids


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x, base):
    """llama.cpp's RoPE on (T, heads, head_dim): rotates adjacent pairs (2i, 2i+1)."""
    t, _, hd = x.shape
    inv_freq = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def forward(reader: GGUFReader, w: dict, ids: list) -> np.ndarray:
    """Logits (T, vocab) of a LLaMA forward over `ids`."""
    n_layers = int(field(reader, "llama.block_count"))
    n_heads = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv"))
    eps = float(field(reader, "llama.attention.layer_norm_rms_epsilon"))
    base = float(field(reader, "llama.rope.freq_base"))
    emb = w["token_embd.weight"]
    hd = emb.shape[1] // n_heads
    t = len(ids)
    mask = np.triu(np.full((t, t), -np.inf), k=1)

    x = emb[ids]
    for i in range(n_layers):
        p = f"blk.{i}."
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)
        q = rope_interleaved((h @ w[p + "attn_q.weight"].T).reshape(t, n_heads, hd), base)
        k = rope_interleaved((h @ w[p + "attn_k.weight"].T).reshape(t, n_kv, hd), base)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, n_kv, hd)
        group = n_heads // n_kv
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, n_heads * hd)
        x = x + attn @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        up = h @ w[p + "ffn_up.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
    x = rms_norm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", emb).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=default_gguf())
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--ids", help="comma-separated token ids (skips tokenization)")
    args = ap.parse_args()
    if not args.gguf.exists():
        sys.exit(f"{args.gguf} not found; run scripts/fetch_assets.sh smollm2")

    reader = GGUFReader(args.gguf)
    ids = [int(x) for x in args.ids.split(",")] if args.ids else tokenize(reader, args.text)
    logits = forward(reader, load_weights(reader), ids)
    logp = logits - logits.max(axis=-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    token_logprobs = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    print(json.dumps({
        "gguf": args.gguf.name,
        "text": None if args.ids else args.text,
        "token_ids": ids,
        "token_logprobs": token_logprobs,
        "mean_logprob": float(np.mean(token_logprobs)),
        "next_token_argmax": int(np.argmax(logits[-1])),
        "precision": "float64",
    }))


if __name__ == "__main__":
    main()
