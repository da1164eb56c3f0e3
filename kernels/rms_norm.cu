// RMSNorm over the last dimension, forward and backward, one pass each (training's decoder
// layer: two a layer, before attention and before the MLP):
//
//   r  = 1 / √(mean(x²) + ε)                      per row, kept for backward (f32)
//   y  = round(round(x·r) · w)                     the normalised x rounded to T, then scaled
//   n  = x·r,  dn = dy ⊙ w
//   dx = r · (dn − n · mean(dn ⊙ n))
//
// Why a kernel: as candle ops (cast to f32, square, mean, sqrt, recip, products, casts back) the
// forward is ten launches and the backward fifteen, each a pass over a [tokens, hidden] f32
// temporary; here the forward reads x and writes y, the backward reads x and dy and writes dx.
// The weight's gradient `dw = Σ_rows dy ⊙ n` is not here: the norms are frozen in every adapter
// method, and full fine-tuning computes it with candle ops (`RmsNorm`'s bwd).
//
// Memory layout: x, y, dy, dx are row-major [rows, cols] of T (f32, f16 or bf16), contiguous;
// w is [cols]; r is [rows] f32. One block per row, threads striding over its columns; sums in
// f32. CPU reference: `RmsNorm` in `src/ops/fused.rs` (f32 / f64).

#include "common.cuh"

template <typename T>
__device__ void rms_norm_forward(const T* x, const T* w, T* y, float* rstd, int cols, float eps) {
    const long long row = blockIdx.x;
    const T* xr = x + row * cols;
    T* yr = y + row * cols;
    float squares = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_f32(xr[c]);
        squares += v * v;
    }
    const float r = 1.f / sqrtf(block_sum(squares) * (1.f / cols) + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        yr[c] = from_f32<T>(to_f32(from_f32<T>(to_f32(xr[c]) * r)) * to_f32(w[c]));
    }
}

template <typename T>
__device__ void rms_norm_backward(const T* x, const T* w, const float* rstd, const T* dy, T* dx, int cols) {
    const long long row = blockIdx.x;
    const T *xr = x + row * cols, *dyr = dy + row * cols;
    T* dxr = dx + row * cols;
    const float r = rstd[row];
    float dot = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dot += to_f32(dyr[c]) * to_f32(w[c]) * (to_f32(xr[c]) * r);
    }
    const float mean = block_sum(dot) * (1.f / cols);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float dn = to_f32(dyr[c]) * to_f32(w[c]), n = to_f32(xr[c]) * r;
        dxr[c] = from_f32<T>((dn - n * mean) * r);
    }
}

#define RMS_NORM(SUFFIX, T)                                                                                    \
    extern "C" __global__ void rms_norm_forward_##SUFFIX(const T* x, const T* w, T* y, float* rstd, int cols,  \
                                                          float eps) {                                         \
        rms_norm_forward<T>(x, w, y, rstd, cols, eps);                                                         \
    }                                                                                                          \
    extern "C" __global__ void rms_norm_backward_##SUFFIX(const T* x, const T* w, const float* rstd,           \
                                                           const T* dy, T* dx, int cols) {                     \
        rms_norm_backward<T>(x, w, rstd, dy, dx, cols);                                                        \
    }

RMS_NORM(f32, float)
RMS_NORM(f16, __half)
RMS_NORM(bf16, __nv_bfloat16)
