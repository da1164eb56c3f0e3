// The attention heads of one projection, with the rotary embedding (RoPE) for q and k, forward
// and backward in one pass each:
//
//   forward    y[b, h, t, i]        = x₁ cos − x₂ sin     x₁ = x[b, t, h, i], x₂ = x[b, t, h, i + d/2]
//              y[b, h, t, i + d/2]  = x₂ cos + x₁ sin     cos, sin = table[b, t, i]
//   backward   dx₁ = dy₁ cos + dy₂ sin,  dx₂ = dy₂ cos − dy₁ sin   (the inverse rotation)
//
// Hugging Face's rotate-half layout (halves of d). With `rotate` 0 it is the heads split alone
// (v): y = x moved to [b, h, t, d], and back in backward.
//
// Why a kernel: as candle ops the rotation is narrow, four broadcast products, two sums, a cat
// and a transposed copy, each a pass over [tokens, heads·d], in forward and again in backward;
// here each direction reads its input and writes its output once. The fused projections
// (`ops::fused::ProjectedHeads`) call it on their GEMM's output, so the [tokens, heads·d]
// projection is a transient and the graph holds only the rotated heads.
//
// Memory layout: x (and dx) [b, t, h, d], the projection's output; y (and dy) [b, h, t, d], what
// attention reads; cos, sin [b, t, d/2]; all contiguous, one dtype T (f32, f16 or bf16),
// computed in f32 and rounded once. One thread per pair (i, i + d/2), grid-stride; consecutive
// threads take consecutive i, so reads and writes are coalesced on both sides. CPU reference:
// `RopeHeads` in `src/ops/fused.rs`.

#include "common.cuh"

// The offsets of pair p = ((b·t + t_i)·h + h_i)·half + i in x and in y.
__device__ __forceinline__ void rope_offsets(long long p, int t, int heads, int half, long long* in_x, long long* in_y) {
    const int i = (int)(p % half);
    long long rest = p / half;
    const int h = (int)(rest % heads);
    rest /= heads;
    const int ti = (int)(rest % t);
    const long long bi = rest / t;
    const int d = 2 * half;
    *in_x = ((bi * t + ti) * heads + h) * d + i;
    *in_y = ((bi * heads + h) * t + ti) * d + i;
}

// `sign` +1 rotates (forward), −1 rotates back (backward).
template <typename T>
__device__ void rope_pass(const T* src, const T* cos, const T* sin, T* dst, int b, int t, int heads, int half, int rotate,
                          float sign, bool to_heads) {
    const long long pairs = (long long)b * t * heads * half;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs; p += (long long)gridDim.x * blockDim.x) {
        long long in_x, in_y;
        rope_offsets(p, t, heads, half, &in_x, &in_y);
        const long long from = to_heads ? in_x : in_y, to = to_heads ? in_y : in_x;
        const float a = to_f32(src[from]), b2 = to_f32(src[from + half]);
        if (rotate) {
            const long long table = (p / ((long long)heads * half)) * half + p % half;
            const float c = to_f32(cos[table]), s = sign * to_f32(sin[table]);
            dst[to] = from_f32<T>(a * c - b2 * s);
            dst[to + half] = from_f32<T>(b2 * c + a * s);
        } else {
            dst[to] = src[from];
            dst[to + half] = src[from + half];
        }
    }
}

#define ROPE(SUFFIX, T)                                                                                         \
    extern "C" __global__ void rope_heads_forward_##SUFFIX(const T* x, const T* cos, const T* sin, T* y, int b, \
                                                            int t, int heads, int half, int rotate) {          \
        rope_pass<T>(x, cos, sin, y, b, t, heads, half, rotate, 1.f, true);                                   \
    }                                                                                                           \
    extern "C" __global__ void rope_heads_backward_##SUFFIX(const T* dy, const T* cos, const T* sin, T* dx,     \
                                                             int b, int t, int heads, int half, int rotate) {  \
        rope_pass<T>(dy, cos, sin, dx, b, t, heads, half, rotate, -1.f, false);                               \
    }

ROPE(f32, float)
ROPE(f16, __half)
ROPE(bf16, __nv_bfloat16)
