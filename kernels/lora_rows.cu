// LoRA's term at inference for the rows of one adapter, in place (segmented LoRA, Punica's SGMV):
//
//   u[i, k]         = Σ_c A[k, c] · x[rows[i], c]                  (lora_rows_shrink)
//   y[rows[i], j]  += scale · Σ_k B[j, k] · u[i, k]                (lora_rows_expand)
//
// Memory layout (row-major, contiguous, element offsets):
//   x    [T, in]   T: the batch's rows, in the activations' dtype
//   y    [T, out]  written in place (the base product of the same rows, a fresh buffer)
//   A    [r, in]   f32 (PEFT's lora_A)
//   B    [out, r]  f32 (PEFT's lora_B)
//   u    [n, r]    f32 scratch
//   rows [n]       int32: the rows of x and y that belong to this adapter
//
// The host calls the pair once for each adapter present in the batch; rows of other adapters and
// of the base alone are not touched. Sums in f32.
// shrink: a block per row i, a warp per k (k strided by the 8 warps), lanes over c, warp sum.
// expand: a thread per (i, j), grid (ceil(out / 256), n).
// The CPU reference is `src/ops/lora_rows.rs`.

#include "common.cuh"

template <typename T>
__device__ void lora_rows_shrink(const T* x, const int* rows, const float* a, float* u, int n, int in, int r) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const T* xr = x + (long long)rows[i] * in;
    for (int k = warp; k < r; k += warps) {
        const float* ak = a + (long long)k * in;
        float s = 0.f;
        for (int c = lane; c < in; c += 32) s = fmaf(ak[c], to_f32(xr[c]), s);
        s = warp_sum(s);
        if (lane == 0) u[(long long)i * r + k] = s;
    }
}

template <typename T>
__device__ void lora_rows_expand(T* y, const int* rows, const float* b, const float* u, int n, int out, int r, float scale) {
    const int i = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || j >= out) return;
    const float* bj = b + (long long)j * r;
    const float* ui = u + (long long)i * r;
    float s = 0.f;
    for (int k = 0; k < r; ++k) s = fmaf(bj[k], ui[k], s);
    long long idx = (long long)rows[i] * out + j;
    y[idx] = from_f32<T>(to_f32(y[idx]) + scale * s);
}

#define LORA_ROWS(SUFFIX, T)                                                                                   \
    extern "C" __global__ void lora_rows_shrink_##SUFFIX(const T* x, const int* rows, const float* a, float* u, \
                                                         int n, int in, int r) {                                 \
        lora_rows_shrink<T>(x, rows, a, u, n, in, r);                                                           \
    }                                                                                                          \
    extern "C" __global__ void lora_rows_expand_##SUFFIX(T* y, const int* rows, const float* b, const float* u, \
                                                         int n, int out, int r, float scale) {                  \
        lora_rows_expand<T>(y, rows, b, u, n, out, r, scale);                                                  \
    }

LORA_ROWS(f32, float)
LORA_ROWS(f16, __half)
LORA_ROWS(bf16, __nv_bfloat16)
