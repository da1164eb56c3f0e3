// The row kernels of the tensor-core attention of training: the products run in cuBLAS
// (strided-batched GEMMs, bf16 / f16 on tensor cores, f32 accumulation), these kernels do what
// lies between them. Same math and same saved state as the flash-style kernels of attention.cu
// (q, k, v, o and lse [b, h, t]); what differs is that the scores of a chunk of heads exist, for
// the time of one chunk, as a transient [heads, t, s] buffer in global memory, which the GEMMs
// need. The host side (src/ops/cuda/attention_gemm.rs) sizes the chunks so that the
// transient stays under a fixed budget; the CPU reference is `Attention` in src/ops/fused.rs.
//
//   forward    S = scale · q kᵀ (GEMM, f32)  →  softmax: P = exp(S + bias − lse), lse  →  o = P v
//   backward   delta = rowsum(do ⊙ o), do into heads  →  S again (GEMM)  →  probs: P
//              dv = Pᵀ do (GEMM)  →  dP = do vᵀ (GEMM, f32, into S's buffer)
//              →  dscores: dS = P ⊙ (dP − delta), in place of P  →  dq = scale · dS k,
//              dk = scale · dSᵀ q (GEMMs)
//
// Memory layout. Grouped-query attention is laid out so that every GEMM is one strided batch: the
// n = h / g query heads of key/value head kv are n·t consecutive rows of q [b, h, t, d], so the
// batch runs over the b·g groups G = bi·g + kv, and a group's scores are an [n·t, s] matrix. Its
// row R is query row i = R mod t of head kv·n + R / t; lse and delta [b, h, t] are then indexed
// by G·n·t + R, one contiguous run per chunk of groups. The kernels see one chunk: S, dP (f32)
// and P, dS (T) are [rows, s] with rows = groups·n·t, starting at group G0 (global row row0 =
// G0·n·t); the bias is [b, t, s] in T. The heads layout [b, h, t, d] of o and do is converted
// from and to the merged [b, t, h, d] the projections use by `merge_heads` and `delta`.
//
// A row of S is walked by one warp (lane j, j + 32, ...): ROWS warps a block.

#include "common.cuh"

#define ROWS 8

__device__ __forceinline__ float warp_max_all(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// The chunk row a warp owns, and the row of the bias its query row reads.
struct ScoreRow {
    long long row;
    int lane;
    __device__ ScoreRow() : row(blockIdx.x * (long long)ROWS + threadIdx.x / 32), lane(threadIdx.x % 32) {}
    template <typename T>
    __device__ const T* bias_row(const T* bias, long long row0, int group_rows, int g, int t, int s) const {
        const long long global = row0 + row;
        const long long bi = global / group_rows / g;
        return bias + (bi * t + global % t) * s;
    }
};

// P = exp(S + bias − lse) with lse = m + log Σ exp(S + bias − m), m the row's max; writes lse.
// A row whose every score is −inf gets P = 0 and lse = −inf, as the flash kernel's.
template <typename T>
__device__ void attention_gemm_softmax(const float* scores, const T* bias, T* probs, float* lse, long long rows, long long row0,
                                       int group_rows, int g, int t, int s) {
    const ScoreRow r;
    if (r.row >= rows) return;
    const float* srow = scores + r.row * s;
    const T* brow = r.bias_row(bias, row0, group_rows, g, t, s);
    float m = -INFINITY;
    for (int j = r.lane; j < s; j += 32) m = fmaxf(m, srow[j] + to_f32(brow[j]));
    m = warp_max_all(m);
    float l = 0.f;
    if (m != -INFINITY)
        for (int j = r.lane; j < s; j += 32) l += expf(srow[j] + to_f32(brow[j]) - m);
    l = warp_sum(l);
    const float row_lse = m == -INFINITY ? -INFINITY : m + logf(l);
    T* prow = probs + r.row * s;
    for (int j = r.lane; j < s; j += 32) {
        const float x = srow[j] + to_f32(brow[j]);
        prow[j] = from_f32<T>(x == -INFINITY ? 0.f : expf(x - row_lse));
    }
    if (r.lane == 0) lse[row0 + r.row] = row_lse;
}

// The backward's P = exp(S + bias − lse) from the forward's lse.
template <typename T>
__device__ void attention_gemm_probs(const float* scores, const T* bias, const float* lse, T* probs, long long rows, long long row0,
                                     int group_rows, int g, int t, int s) {
    const ScoreRow r;
    if (r.row >= rows) return;
    const float* srow = scores + r.row * s;
    const T* brow = r.bias_row(bias, row0, group_rows, g, t, s);
    const float row_lse = lse[row0 + r.row];
    T* prow = probs + r.row * s;
    for (int j = r.lane; j < s; j += 32) {
        const float x = srow[j] + to_f32(brow[j]);
        prow[j] = from_f32<T>(x == -INFINITY ? 0.f : expf(x - row_lse));
    }
}

// dS = P ⊙ (dP − delta), written over P.
template <typename T>
__device__ void attention_gemm_dscores(const float* dprobs, const float* delta, T* probs, long long rows, long long row0, int s) {
    const ScoreRow r;
    if (r.row >= rows) return;
    const float row_delta = delta[row0 + r.row];
    const float* dprow = dprobs + r.row * s;
    T* prow = probs + r.row * s;
    for (int j = r.lane; j < s; j += 32) prow[j] = from_f32<T>(to_f32(prow[j]) * (dprow[j] - row_delta));
}

// delta [b, h, t] = rowsum(do ⊙ o), both read merged [b, t, h, d]; do also copied into heads
// [b, h, t, d] for the GEMMs. A warp per (bi, hi, i) row.
template <typename T>
__device__ void attention_gemm_delta(const T* o, const T* dout, float* delta, T* dout_heads, int b, int h, int t, int d) {
    const ScoreRow r;
    if (r.row >= (long long)b * h * t) return;
    const long long bh = r.row / t, i = r.row % t, bi = bh / h, hi = bh % h;
    const long long merged = ((bi * t + i) * h + hi) * d;
    float part = 0.f;
    for (int e = r.lane; e < d; e += 32) {
        const T dv = dout[merged + e];
        part += to_f32(dv) * to_f32(o[merged + e]);
        dout_heads[r.row * d + e] = dv;
    }
    part = warp_sum(part);
    if (r.lane == 0) delta[r.row] = part;
}

// o [b, t, h, d] from the heads [b, h, t, d] the P·v GEMM wrote. One thread an element.
template <typename T>
__device__ void attention_gemm_merge_heads(const T* heads, T* merged, int b, int h, int t, int d) {
    const long long n = (long long)b * h * t * d;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long c = e % d, row = e / d, i = row % t, bh = row / t, bi = bh / h, hi = bh % h;
        merged[((bi * t + i) * h + hi) * d + c] = heads[e];
    }
}

#define ATTENTION_GEMM(SUFFIX, T)                                                                                         \
    extern "C" __global__ void attention_gemm_softmax_##SUFFIX(const float* scores, const T* bias, T* probs, float* lse,   \
                                                               long long rows, long long row0, int group_rows, int g,     \
                                                               int t, int s) {                                            \
        attention_gemm_softmax<T>(scores, bias, probs, lse, rows, row0, group_rows, g, t, s);                             \
    }                                                                                                                     \
    extern "C" __global__ void attention_gemm_probs_##SUFFIX(const float* scores, const T* bias, const float* lse,        \
                                                             T* probs, long long rows, long long row0, int group_rows,    \
                                                             int g, int t, int s) {                                       \
        attention_gemm_probs<T>(scores, bias, lse, probs, rows, row0, group_rows, g, t, s);                               \
    }                                                                                                                     \
    extern "C" __global__ void attention_gemm_dscores_##SUFFIX(const float* dprobs, const float* delta, T* probs,         \
                                                               long long rows, long long row0, int s) {                   \
        attention_gemm_dscores<T>(dprobs, delta, probs, rows, row0, s);                                                   \
    }                                                                                                                     \
    extern "C" __global__ void attention_gemm_delta_##SUFFIX(const T* o, const T* dout, float* delta, T* dout_heads,      \
                                                             int b, int h, int t, int d) {                                \
        attention_gemm_delta<T>(o, dout, delta, dout_heads, b, h, t, d);                                                  \
    }                                                                                                                     \
    extern "C" __global__ void attention_gemm_merge_heads_##SUFFIX(const T* heads, T* merged, int b, int h, int t,        \
                                                                   int d) {                                               \
        attention_gemm_merge_heads<T>(heads, merged, b, h, t, d);                                                         \
    }

ATTENTION_GEMM(f32, float)
ATTENTION_GEMM(f16, __half)
ATTENTION_GEMM(bf16, __nv_bfloat16)
