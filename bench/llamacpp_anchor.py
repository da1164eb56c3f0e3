"""CPU decode anchor: llama.cpp (the ik_llama.cpp AVX2 build in the ik-llama-cpp-python wheel) on a
GGUF, what the engine's CPU decoding speed is compared against.

Measures, greedy, batch 1, n_ctx 2048:
  decode_tok_s    64 new tokens after the prompt "The three primary colors are" (after an
                  8-token warm-up)
  prefill_tok_s   a 400-token prompt, one token generated
  n_generated, threads, and the first 120 characters of the generated text

Install the wheel in a venv (`pip install ik-llama-cpp-python`) and give it a GGUF, e.g. the
SmolLM2-135M-Instruct Q4_1 that scripts/fetch_assets.sh fetches:

    V/bin/python bench/llamacpp_anchor.py MODEL.gguf [THREADS]     (THREADS default 2)

Output: one JSON line on stdout
    {"decode_tok_s", "n_generated", "prefill_tok_s", "threads", "text"}
"""

import json
import sys
import time

from ik_llama_cpp.llama import IkLlama


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: {sys.argv[0]} MODEL.gguf [THREADS]")
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    llm = IkLlama(sys.argv[1], n_ctx=2048, n_threads=threads, verbose=False)

    prompt = llm.tokenize("The three primary colors are")
    llm.generate(prompt, max_tokens=8)  # warm-up
    start = time.perf_counter()
    out = llm.generate(prompt, max_tokens=64)
    decode_s = time.perf_counter() - start

    long_prompt = llm.tokenize("The history of the city " * 80)[:400]
    start = time.perf_counter()
    llm.generate(long_prompt, max_tokens=1)
    prefill_s = time.perf_counter() - start

    print(json.dumps({"decode_tok_s": len(out) / decode_s, "n_generated": len(out),
                      "prefill_tok_s": len(long_prompt) / prefill_s, "threads": threads,
                      "text": llm.detokenize(out)[:120]}))


if __name__ == "__main__":
    main()
