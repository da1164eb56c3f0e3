// Flash-style attention for training, forward and backward: the [t, s] scores and probabilities
// live in registers and shared memory only, never in global memory. The model's attention and
// the nonlinear controller's token mixing (one head, d = r + 1, scale 1) both take it. The math,
// the backward and the CPU reference are `Attention` in src/ops/fused.rs; the host side is
// src/ops/cuda/attention.rs.
//
// Memory layout (row-major, contiguous): q [b, h, t, d]; k and v [b, g, s, d] with h a multiple
// of g (grouped-query: query head hh reads key/value head hh / (h / g)); bias [b, t, s] in T (the
// CPU op casts it so too), the additive causal and padding mask; o and do [b, t, h, d] (heads
// merged, the layout the output projection reads); lse and delta [b, h, t] f32; dq like q, dk and
// dv like k. d ≤ MAX_D.
//
//   o_i   = Σ_j P_ij v_j,   P_ij = exp(S_ij − lse_i),   S_ij = scale · q_i·k_j + bias_ij
//   D_i   = do_i · o_i,     dS_ij = P_ij (do_i·v_j − D_i)
//   dq_i  = scale Σ_j dS_ij k_j,   dk_j = scale Σ_i dS_ij q_i,   dv_j = Σ_i P_ij do_i
//
// All three kernels give a warp one row and walk the other side in chunks of 32 staged in shared
// memory (f32, rows padded to MAX_D + 1 floats so that lane j reading row j hits its own bank):
// lane j computes the score of the chunk's j-th row, then each lane accumulates the output dims
// lane, lane + 32, ... over the chunk. ROWS warps per block share the chunk.
//
//   attention_forward_*   grid ceil(t/ROWS) × b·h: online softmax (running max m and sum l),
//                         writes o and lse = m + log l
//   attention_dq_*        grid ceil(t/ROWS) × b·h: D_i (written to delta for the next pass), dq
//   attention_dkdv_*      grid ceil(s/ROWS) × b·g: a warp per key row walks the query rows of
//                         every head of its group: dk, dv (the group sum of grouped-query
//                         attention falls out of the walk, no atomics)
// Each pass recomputes S from q and k rather than reading anything of size t × s.
//
// causal = 1 says the bias masks every key j > (s − t) + i of query row i (`attention_bias` does,
// padding or not): the forward and dq passes then stop after the last chunk a block's rows can
// see, and the dkdv pass starts at the first chunk of query rows that can see its keys. The
// chunks skipped would add exact zeros (p = exp(−1e30 − m) = 0 against the row's own key), and
// the chunks keep their boundaries, so the results are bit for bit those of the full walk while
// about half of the work of a square causal attention goes.

#include "common.cuh"

#define MAX_D 128
#define CHUNK 32
#define ROWS 8
#define THREADS (ROWS * 32)
#define DIMS_PER_LANE (MAX_D / 32)

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Rows [row0, row0 + CHUNK) of a [n, d] matrix into shared memory as f32, zeros past n.
template <typename T>
__device__ void stage_chunk(float dst[CHUNK][MAX_D + 1], const T* src, int row0, int n, int d) {
    for (int e = threadIdx.x; e < CHUNK * d; e += THREADS) {
        const int r = e / d, c = e % d;
        dst[r][c] = row0 + r < n ? to_f32(src[(long long)(row0 + r) * d + c]) : 0.f;
    }
}

// The end of the key walk of a block of query rows: all s keys, or causally the chunks up to the
// last row's diagonal key (s − t) + i_last.
__device__ __forceinline__ int key_walk_end(int t, int s, int causal) {
    if (!causal) return s;
    const int last_row = min(t - 1, (int)blockIdx.x * ROWS + ROWS - 1);
    return min(s, s - t + last_row + 1);
}

// The start of the query walk of a block of key rows: 0, or causally the chunk holding the
// first row that sees the block's first key j_first, i = j_first − (s − t).
__device__ __forceinline__ int query_walk_start(int t, int s, int causal) {
    if (!causal) return 0;
    const int first = (int)blockIdx.x * ROWS - (s - t);
    return first <= 0 ? 0 : first / CHUNK * CHUNK;
}

// One row of d elements into a warp's shared row (f32).
template <typename T>
__device__ void stage_row(float* dst, const T* src, int d, int lane) {
    for (int e = lane; e < d; e += 32) dst[e] = to_f32(src[e]);
}

__device__ __forceinline__ float dot(const float* a, const float* b, int d) {
    float acc = 0.f;
    for (int e = 0; e < d; ++e) acc += a[e] * b[e];
    return acc;
}

// Σ_jj w[jj] · rows[jj][e] over a staged chunk: column e of the chunk weighted by one row's w.
__device__ __forceinline__ float chunk_column(const float* w, const float (*rows)[MAX_D + 1], int e) {
    float acc = 0.f;
    for (int jj = 0; jj < CHUNK; ++jj) acc += w[jj] * rows[jj][e];
    return acc;
}

// Where a warp of the row-parallel kernels (forward, dq) stands: its query row i of head hi in
// batch row bi (bh = bi·h + hi), and the key/value head kvh that head reads.
struct QueryRow {
    int warp, lane, bh, bi, hi, kvh, i;
    bool active;
    __device__ QueryRow(int h, int g, int t) {
        warp = threadIdx.x / 32;
        lane = threadIdx.x % 32;
        bh = blockIdx.y;
        bi = bh / h;
        hi = bh % h;
        kvh = bi * g + hi / (h / g);
        i = blockIdx.x * ROWS + warp;
        active = i < t;
    }
    // This head's rows of k or v [.., s, d] (grouped-query: the row's kv head).
    template <typename T>
    __device__ const T* kv_head(const T* kv, int s, int d) const { return kv + (long long)kvh * s * d; }
    // The row's bias [s] (row 0 for an inactive warp, which reads nothing past the chunk walk).
    template <typename T>
    __device__ const T* bias_row(const T* bias, int t, int s) const { return bias + ((long long)bi * t + (active ? i : 0)) * s; }
};

template <typename T>
__device__ void attention_forward(const T* q, const T* k, const T* v, const T* bias, T* o, float* lse, int h, int g, int t,
                                  int s, int d, float scale, int causal) {
    __shared__ float sk[CHUNK][MAX_D + 1];
    __shared__ float sv[CHUNK][MAX_D + 1];
    __shared__ float sq[ROWS][MAX_D];
    __shared__ float sp[ROWS][CHUNK];
    const QueryRow r(h, g, t);
    const int warp = r.warp, lane = r.lane, bh = r.bh, bi = r.bi, hi = r.hi, i = r.i;
    const bool active = r.active;
    const T *kh = r.kv_head(k, s, d), *vh = r.kv_head(v, s, d), *brow = r.bias_row(bias, t, s);
    if (active) stage_row(sq[warp], q + ((long long)bh * t + i) * d, d, lane);
    float m = -INFINITY, l = 0.f, acc[DIMS_PER_LANE] = {};
    const int s_end = key_walk_end(t, s, causal);
    for (int j0 = 0; j0 < s_end; j0 += CHUNK) {
        __syncthreads();  // the previous chunk is consumed (and sq is written, on the first pass)
        stage_chunk(sk, kh, j0, s, d);
        stage_chunk(sv, vh, j0, s, d);
        __syncthreads();
        if (!active) continue;
        const int j = j0 + lane;
        const float score = j < s ? dot(sq[warp], sk[lane], d) * scale + to_f32(brow[j]) : -INFINITY;
        const float m_new = fmaxf(m, warp_max(score));
        // -inf scores (past the end, or an infinite mask) weigh 0 even while m_new is still -inf.
        const float p = score == -INFINITY ? 0.f : expf(score - m_new);
        const float rescale = m == -INFINITY ? 0.f : expf(m - m_new);
        l = l * rescale + warp_sum(p);
        sp[warp][lane] = p;
        __syncwarp();
#pragma unroll
        for (int a = 0; a < DIMS_PER_LANE; ++a) {
            const int e = lane + 32 * a;
            if (e >= d) break;
            acc[a] = acc[a] * rescale + chunk_column(sp[warp], sv, e);
        }
        __syncwarp();
        m = m_new;
    }
    if (!active) return;
    T* orow = o + (((long long)bi * t + i) * h + hi) * d;
#pragma unroll
    for (int a = 0; a < DIMS_PER_LANE; ++a) {
        const int e = lane + 32 * a;
        if (e < d) orow[e] = from_f32<T>(acc[a] / l);
    }
    if (lane == 0) lse[(long long)bh * t + i] = m + logf(l);
}

template <typename T>
__device__ void attention_dq(const T* q, const T* k, const T* v, const T* bias, const T* o, const T* dout, const float* lse,
                             float* delta, T* dq, int h, int g, int t, int s, int d, float scale, int causal) {
    __shared__ float sk[CHUNK][MAX_D + 1];
    __shared__ float sv[CHUNK][MAX_D + 1];
    __shared__ float sq[ROWS][MAX_D];
    __shared__ float sdo[ROWS][MAX_D];
    __shared__ float sds[ROWS][CHUNK];
    const QueryRow r(h, g, t);
    const int warp = r.warp, lane = r.lane, bh = r.bh, bi = r.bi, hi = r.hi, i = r.i;
    const bool active = r.active;
    const T *kh = r.kv_head(k, s, d), *vh = r.kv_head(v, s, d), *brow = r.bias_row(bias, t, s);
    float row_lse = 0.f, row_delta = 0.f;
    if (active) {
        const long long merged = (((long long)bi * t + i) * h + hi) * d;
        stage_row(sq[warp], q + ((long long)bh * t + i) * d, d, lane);
        stage_row(sdo[warp], dout + merged, d, lane);
        float part = 0.f;
        for (int e = lane; e < d; e += 32) part += to_f32(dout[merged + e]) * to_f32(o[merged + e]);
        row_delta = warp_sum(part);
        row_lse = lse[(long long)bh * t + i];
        if (lane == 0) delta[(long long)bh * t + i] = row_delta;
    }
    float acc[DIMS_PER_LANE] = {};
    const int s_end = key_walk_end(t, s, causal);
    for (int j0 = 0; j0 < s_end; j0 += CHUNK) {
        __syncthreads();
        stage_chunk(sk, kh, j0, s, d);
        stage_chunk(sv, vh, j0, s, d);
        __syncthreads();
        if (!active) continue;
        const int j = j0 + lane;
        float ds = 0.f;
        if (j < s) {
            const float p = expf(dot(sq[warp], sk[lane], d) * scale + to_f32(brow[j]) - row_lse);
            ds = p * (dot(sdo[warp], sv[lane], d) - row_delta);
        }
        sds[warp][lane] = ds;
        __syncwarp();
#pragma unroll
        for (int a = 0; a < DIMS_PER_LANE; ++a) {
            const int e = lane + 32 * a;
            if (e >= d) break;
            acc[a] += chunk_column(sds[warp], sk, e);
        }
        __syncwarp();
    }
    if (!active) return;
    T* row = dq + ((long long)bh * t + i) * d;
#pragma unroll
    for (int a = 0; a < DIMS_PER_LANE; ++a) {
        const int e = lane + 32 * a;
        if (e < d) row[e] = from_f32<T>(acc[a] * scale);
    }
}

// dout's rows [i0, i0 + CHUNK) of head hi in the merged layout [b, t, h, d], as f32.
template <typename T>
__device__ void stage_merged_chunk(float dst[CHUNK][MAX_D + 1], const T* dout, int bi, int hi, int i0, int t, int h, int d) {
    for (int e = threadIdx.x; e < CHUNK * d; e += THREADS) {
        const int r = e / d, c = e % d;
        dst[r][c] = i0 + r < t ? to_f32(dout[(((long long)bi * t + i0 + r) * h + hi) * d + c]) : 0.f;
    }
}

template <typename T>
__device__ void attention_dkdv(const T* q, const T* k, const T* v, const T* bias, const T* dout, const float* lse,
                               const float* delta, T* dk, T* dv, int h, int g, int t, int s, int d, float scale,
                               int causal) {
    __shared__ float sq[CHUNK][MAX_D + 1];
    __shared__ float sdo[CHUNK][MAX_D + 1];
    __shared__ float sk[ROWS][MAX_D];
    __shared__ float sv[ROWS][MAX_D];
    __shared__ float sp[ROWS][CHUNK];
    __shared__ float sds[ROWS][CHUNK];
    __shared__ float slse[CHUNK];
    __shared__ float sdelta[CHUNK];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int bg = blockIdx.y, bi = bg / g, gi = bg % g, group = h / g;
    const int j = blockIdx.x * ROWS + warp;
    const bool active = j < s;
    if (active) {
        stage_row(sk[warp], k + ((long long)bg * s + j) * d, d, lane);
        stage_row(sv[warp], v + ((long long)bg * s + j) * d, d, lane);
    }
    float acc_k[DIMS_PER_LANE] = {}, acc_v[DIMS_PER_LANE] = {};
    for (int hi = gi * group; hi < (gi + 1) * group; ++hi) {
        const long long bh = (long long)bi * h + hi;
        for (int i0 = query_walk_start(t, s, causal); i0 < t; i0 += CHUNK) {
            __syncthreads();
            stage_chunk(sq, q + bh * t * d, i0, t, d);
            stage_merged_chunk(sdo, dout, bi, hi, i0, t, h, d);
            if (threadIdx.x < CHUNK) {
                const int i = i0 + threadIdx.x;
                slse[threadIdx.x] = i < t ? lse[bh * t + i] : 0.f;
                sdelta[threadIdx.x] = i < t ? delta[bh * t + i] : 0.f;
            }
            __syncthreads();
            if (!active) continue;
            const int i = i0 + lane;
            float p = 0.f, ds = 0.f;
            if (i < t) {
                p = expf(dot(sq[lane], sk[warp], d) * scale + to_f32(bias[((long long)bi * t + i) * s + j]) - slse[lane]);
                ds = p * (dot(sdo[lane], sv[warp], d) - sdelta[lane]);
            }
            sp[warp][lane] = p;
            sds[warp][lane] = ds;
            __syncwarp();
#pragma unroll
            for (int a = 0; a < DIMS_PER_LANE; ++a) {
                const int e = lane + 32 * a;
                if (e >= d) break;
                float sum_v = 0.f, sum_k = 0.f;
                for (int ii = 0; ii < CHUNK; ++ii) {
                    sum_v += sp[warp][ii] * sdo[ii][e];
                    sum_k += sds[warp][ii] * sq[ii][e];
                }
                acc_v[a] += sum_v;
                acc_k[a] += sum_k;
            }
            __syncwarp();
        }
    }
    if (!active) return;
    const long long row = ((long long)bg * s + j) * d;
#pragma unroll
    for (int a = 0; a < DIMS_PER_LANE; ++a) {
        const int e = lane + 32 * a;
        if (e < d) {
            dk[row + e] = from_f32<T>(acc_k[a] * scale);
            dv[row + e] = from_f32<T>(acc_v[a]);
        }
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                               \
        attention_forward_##SUFFIX(const T* q, const T* k, const T* v, const T* bias, T* o, float* lse, int h, int g, \
                                   int t, int s, int d, float scale, int causal) {                                      \
        attention_forward<T>(q, k, v, bias, o, lse, h, g, t, s, d, scale, causal);                                      \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                               \
        attention_dq_##SUFFIX(const T* q, const T* k, const T* v, const T* bias, const T* o, const T* dout,          \
                              const float* lse, float* delta, T* dq, int h, int g, int t, int s, int d, float scale,     \
                              int causal) {                                                                              \
        attention_dq<T>(q, k, v, bias, o, dout, lse, delta, dq, h, g, t, s, d, scale, causal);                          \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                               \
        attention_dkdv_##SUFFIX(const T* q, const T* k, const T* v, const T* bias, const T* dout, const float* lse,  \
                                const float* delta, T* dk, T* dv, int h, int g, int t, int s, int d, float scale,       \
                                int causal) {                                                                            \
        attention_dkdv<T>(q, k, v, bias, dout, lse, delta, dk, dv, h, g, t, s, d, scale, causal);                      \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
