// SwiGLU's gate, forward and backward, in one pass each:
//
//   y  = silu(g) ⊙ u,             silu(g) = g·σ(g)
//   du = dy ⊙ silu(g)
//   dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))
//
// Why a kernel: as candle ops the backward holds about eight [tokens, intermediate] temporaries
// at once (σ through neg, exp, +1 and recip, then the products), the largest buffers of a LLaMA
// layer's backward (4,096 x 11,008 bf16 is 86 MiB each); here it reads g, u, dy and writes dg,
// du, nothing else.
//
// Memory layout: g, u, dy, y, dg, du are contiguous arrays of n elements of T (f32, f16 or bf16),
// computed in f32 and rounded once. One thread per element, grid-stride. CPU reference: `SwiGlu`
// in `src/ops/fused.rs` (f32 / f64).

#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T>
__device__ void swiglu_forward(const T* g, const T* u, T* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gv = to_f32(g[i]);
        y[i] = from_f32<T>(gv * sigmoid(gv) * to_f32(u[i]));
    }
}

template <typename T>
__device__ void swiglu_backward(const T* g, const T* u, const T* dy, T* dg, T* du, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gv = to_f32(g[i]), uv = to_f32(u[i]), d = to_f32(dy[i]);
        const float s = sigmoid(gv), silu = gv * s;
        du[i] = from_f32<T>(d * silu);
        dg[i] = from_f32<T>(d * uv * (s + silu * (1.f - s)));
    }
}

#define SWIGLU(SUFFIX, T)                                                                                      \
    extern "C" __global__ void swiglu_forward_##SUFFIX(const T* g, const T* u, T* y, long long n) {            \
        swiglu_forward<T>(g, u, y, n);                                                                         \
    }                                                                                                          \
    extern "C" __global__ void swiglu_backward_##SUFFIX(const T* g, const T* u, const T* dy, T* dg, T* du,     \
                                                         long long n) {                                        \
        swiglu_backward<T>(g, u, dy, dg, du, n);                                                               \
    }

SWIGLU(f32, float)
SWIGLU(f16, __half)
SWIGLU(bf16, __nv_bfloat16)
