"""GEMM anchor: PyTorch's CPU matrix products (MKL in f32, oneDNN in bf16) at the shapes of a
frozen linear in training, what the engine's GEMM choices are compared against (the CPU training
issue: "measure the candidates").

For each M x N x K it times `x @ w.T` (the forward, x [M, K], w [N, K]) and `dy @ w` (the input
gradient, dy [M, N]) in f32 and in bf16, the median of ITERS after a warm-up, and prints one JSON
object: {"threads", "torch", "rows": [{"shape", "dtype", "ms", "gflops"}]}, ms and GFLOP/s of
forward plus backward together (4 M N K flops), as `bench kernels --ops lora` reports its frozen
linear. Run with the venv of scripts/peft_venv.sh:

    $(scripts/peft_venv.sh) bench/gemm_anchor.py 1024x576x1536 1024x1536x576

Figures move between machines and days: compare only within one run.
"""

import json
import statistics
import sys
import time

import torch

ITERS = 10


def timed(f):
    f()
    times = []
    for _ in range(ITERS):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    shapes = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1:]] or [(1024, 1536, 576), (1024, 576, 1536)]
    torch.manual_seed(0)
    rows = []
    for m, n, k in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dtype)
            w = (torch.randn(n, k) * 0.02).to(dtype)
            dy = torch.randn(m, n).to(dtype)
            with torch.no_grad():
                s = timed(lambda: (x @ w.T, dy @ w))
            rows.append({"shape": f"{m}x{n}x{k}", "dtype": str(dtype).removeprefix("torch."), "ms": s * 1e3, "gflops": 4 * m * n * k / s / 1e9})
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
