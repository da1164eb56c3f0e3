// Inverted-dropout masks drawn on the device, the same values as the CPU draws:
//
//   h_i  = splitmix64(seed + (i + 1) · 0x9E3779B97F4A7C15)
//   u_i  = (h_i >> 40) · 2^-24                      (24 bits: exact in f32)
//   m_i  = u_i < keep ? 1 / keep : 0                (rounded once to T)
//
// Why: a counter-based draw needs no state, so each element is independent (one thread each)
// and the CPU reference (`Dropout::mask` in `src/adapters/mod.rs`) gives the same mask bit for
// bit; a mask drawn on the host would cost a LLaMA-7B step billions of host draws and their
// upload (a [4096, 11008] mask is 180 MB in f32).
//
// dropout_apply writes `x ⊙ m` without the mask: the fused adapter ops draw drop(x) in forward
// and again in backward from the seed instead of keeping the mask and drop(x) for backward
// (two [T, in] tensors per adapted matrix). m_i is rounded to T before the product, so the
// result is bit for bit `x * mask` as candle computes it in T (the product of two values of T
// is exact in f32 and is rounded once).
//
// Memory layout: out and x are contiguous arrays of n elements of T (f32, f16 or bf16).
// Grid-stride.

#include "common.cuh"

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ bool dropout_kept(long long i, unsigned long long seed, float keep) {
    const unsigned long long h = splitmix64(seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull);
    return (float)(h >> 40) * 5.9604644775390625e-8f < keep;  // 2^-24
}

template <typename T>
__device__ void dropout_mask(T* out, long long n, unsigned long long seed, float keep, float scale) {
    const T kept = from_f32<T>(scale), dropped = from_f32<T>(0.f);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        out[i] = dropout_kept(i, seed, keep) ? kept : dropped;
    }
}

template <typename T>
__device__ void dropout_apply(T* out, const T* x, long long n, unsigned long long seed, float keep, float scale) {
    const float kept = to_f32(from_f32<T>(scale));
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        out[i] = from_f32<T>(to_f32(x[i]) * (dropout_kept(i, seed, keep) ? kept : 0.f));
    }
}

#define DROPOUT_MASK(SUFFIX, T)                                                                                  \
    extern "C" __global__ void dropout_mask_##SUFFIX(T* out, long long n, unsigned long long seed, float keep, \
                                                      float scale) {                                             \
        dropout_mask<T>(out, n, seed, keep, scale);                                                              \
    }

DROPOUT_MASK(f32, float)
DROPOUT_MASK(f16, __half)
DROPOUT_MASK(bf16, __nv_bfloat16)

#define DROPOUT_APPLY(SUFFIX, T)                                                                                  \
    extern "C" __global__ void dropout_apply_##SUFFIX(T* out, const T* x, long long n, unsigned long long seed,  \
                                                       float keep, float scale) {                                 \
        dropout_apply<T>(out, x, n, seed, keep, scale);                                                           \
    }

DROPOUT_APPLY(f32, float)
DROPOUT_APPLY(f16, __half)
DROPOUT_APPLY(bf16, __nv_bfloat16)
