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
// Memory layout: out is a contiguous array of n elements of T (f32, f16 or bf16). Grid-stride.

#include "common.cuh"

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout_mask(T* out, long long n, unsigned long long seed, float keep, float scale) {
    const T kept = from_f32<T>(scale), dropped = from_f32<T>(0.f);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const unsigned long long h = splitmix64(seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull);
        const float u = (float)(h >> 40) * 5.9604644775390625e-8f;  // 2^-24
        out[i] = u < keep ? kept : dropped;
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
