// SNELL's kernelized update recomputed tile by tile from its two factors, never kept between
// forward and backward (seeds.md §3; the math, the backward and the CPU reference are in
// src/kernels/snell.rs, the host side in src/kernels/cuda/snell.rs).
//
// Memory layout (row-major, contiguous): In [H, d_in, k] and Out [H, d_out, k] in f32 (k = r/H);
// update-shaped buffers [d_in, d_out] (f32 for snell_delta, else the activations' dtype T);
// head coefficients c_h = 0.1·(−1)^h. One entry of the update:
//
//   Δ[i, j] = Σ_h c_h · sqrt(Σ_t (In[h,i,t] − Out[h,j,t])²)
//
// as the direct sum of squared differences (no ‖a‖² + ‖b‖² − 2a·b cancellation), in f32, in the
// same order in every kernel here, so the threshold passes, the forward and the backward see
// bit-identical values of Δ.
//
// The tile walk (delta_tile): a block of 256 threads owns a 64 × 64 tile of (i, j), a thread the
// 4 × 4 entries (ty + 16a, tx + 16b); per head the k columns of the tile's 64 In rows and 64 Out
// rows go through shared memory KC at a time. Grid: ceil(d_out/64) × ceil(d_in/64).
//
//   snell_delta          Δ into an f32 buffer (what the selftest compares with the CPU)
//   snell_histogram      one radix-select pass over the bit patterns of |Δ| (non-negative
//                        floats order as their bits): counts the `bins` digits at `shift` among
//                        the entries whose higher bits equal `prefix`
//   snell_min_above      the smallest |Δ| bit pattern above `above` (the quantile's upper neighbour)
//   snell_sparse_delta_* ΔW_s = Δ ⊙ |Δ| ⊙ 1[|Δ| > τ] (Δ when sparsify = 0) into T, the operand
//                        of the forward's and dx's GEMMs
//   snell_mask_grad_*    Ĝ ← Ĝ ⊙ |Δ| ⊙ 1[|Δ| > τ] in place (T)
// and per head, grid ceil(n_a/32) blocks of 256 threads, 64·k floats of dynamic shared memory:
//   snell_dist_grad_*    out[p, :] = c · Σ_q Ĝ(p, q) / D(A_p, B_q) · (A_p − B_q), 0 where D = 0,
//                        with (A, B, Ĝ(p, q)) = (In_h, Out_h, Ĝ[p, q]) for dIn_h and
//                        (Out_h, In_h, Ĝ[q, p]) for dOut_h.

#include "common.cuh"

#define TILE 64
#define KC 16
#define THREADS 256

__device__ __forceinline__ float head_coefficient(int h) { return (h % 2 == 0) ? 0.1f : -0.1f; }

// The thread's 4 × 4 entries of Δ in the block's tile.
__device__ void delta_tile(const float* in, const float* out, int heads, int d_in, int d_out, int k, float d[4][4]) {
    __shared__ float sa[KC][TILE + 1];
    __shared__ float sb[KC][TILE + 1];
    const int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) d[a][b] = 0.f;
    for (int h = 0; h < heads; ++h) {
        const float* ih = in + (long long)h * d_in * k;
        const float* oh = out + (long long)h * d_out * k;
        float acc[4][4] = {};
        for (int t0 = 0; t0 < k; t0 += KC) {
            for (int e = threadIdx.x; e < TILE * KC; e += THREADS) {
                const int row = e / KC, t = e % KC, gt = t0 + t;
                sa[t][row] = (i0 + row < d_in && gt < k) ? ih[(long long)(i0 + row) * k + gt] : 0.f;
                sb[t][row] = (j0 + row < d_out && gt < k) ? oh[(long long)(j0 + row) * k + gt] : 0.f;
            }
            __syncthreads();
            const int tn = min(KC, k - t0);
            for (int t = 0; t < tn; ++t) {
                float av[4], bv[4];
#pragma unroll
                for (int a = 0; a < 4; ++a) av[a] = sa[t][ty + 16 * a];
#pragma unroll
                for (int b = 0; b < 4; ++b) bv[b] = sb[t][tx + 16 * b];
#pragma unroll
                for (int a = 0; a < 4; ++a)
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        const float diff = av[a] - bv[b];
                        acc[a][b] = fmaf(diff, diff, acc[a][b]);
                    }
            }
            __syncthreads();
        }
        const float c = head_coefficient(h);
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) d[a][b] = fmaf(c, sqrtf(acc[a][b]), d[a][b]);
    }
}

// Runs `body(i, j, Δ[i, j])` for the thread's entries that lie inside the matrix.
#define FOR_EACH_ENTRY(body)                                                         \
    do {                                                                             \
        float d[4][4];                                                               \
        delta_tile(in, out, heads, d_in, d_out, k, d);                               \
        const int tx_ = threadIdx.x % 16, ty_ = threadIdx.x / 16;                    \
        for (int a = 0; a < 4; ++a)                                                  \
            for (int b = 0; b < 4; ++b) {                                            \
                const int i = blockIdx.y * TILE + ty_ + 16 * a;                      \
                const int j = blockIdx.x * TILE + tx_ + 16 * b;                      \
                if (i < d_in && j < d_out) {                                         \
                    const float v = d[a][b];                                         \
                    body;                                                            \
                }                                                                    \
            }                                                                        \
    } while (0)

#define FACTORS const float *in, const float *out, int heads, int d_in, int d_out, int k

extern "C" __global__ void snell_delta(FACTORS, float* delta) {
    FOR_EACH_ENTRY(delta[(long long)i * d_out + j] = v);
}

extern "C" __global__ void snell_histogram(FACTORS, unsigned prefix, unsigned prefix_mask, int shift, int bins, unsigned* hist) {
    __shared__ unsigned counts[2048];
    for (int e = threadIdx.x; e < bins; e += THREADS) counts[e] = 0;
    __syncthreads();
    FOR_EACH_ENTRY({
        const unsigned u = __float_as_uint(fabsf(v));
        if ((u & prefix_mask) == prefix) atomicAdd(&counts[(u >> shift) & (bins - 1)], 1u);
    });
    __syncthreads();
    for (int e = threadIdx.x; e < bins; e += THREADS)
        if (counts[e]) atomicAdd(&hist[e], counts[e]);
}

extern "C" __global__ void snell_min_above(FACTORS, unsigned above, unsigned* result) {
    __shared__ unsigned best;
    if (threadIdx.x == 0) best = 0xffffffffu;
    __syncthreads();
    unsigned mine = 0xffffffffu;
    FOR_EACH_ENTRY({
        const unsigned u = __float_as_uint(fabsf(v));
        if (u > above) mine = min(mine, u);
    });
    if (mine != 0xffffffffu) atomicMin(&best, mine);
    __syncthreads();
    if (threadIdx.x == 0 && best != 0xffffffffu) atomicMin(result, best);
}

template <typename T>
__device__ void sparse_delta(FACTORS, float tau, int sparsify, T* dst) {
    FOR_EACH_ENTRY({
        const float a = fabsf(v);
        const float s = sparsify ? ((a > tau) ? v * a : 0.f) : v;
        dst[(long long)i * d_out + j] = from_f32<T>(s);
    });
}

template <typename T>
__device__ void mask_grad(FACTORS, float tau, T* g) {
    FOR_EACH_ENTRY({
        const float a = fabsf(v);
        const long long idx = (long long)i * d_out + j;
        g[idx] = from_f32<T>((a > tau) ? to_f32(g[idx]) * a : 0.f);
    });
}

#define P 32

template <typename T>
__device__ void dist_grad(const float* A, const float* B, const T* g, int n_a, int n_b, int k, int transposed, int ld_g,
                          float c, float* result) {
    extern __shared__ float smem[];
    float* sA = smem;          // [P][k]
    float* sB = smem + P * k;  // [P][k]
    __shared__ float sm[P][P + 1];
    const int p0 = blockIdx.x * P;
    for (int e = threadIdx.x; e < P * k; e += THREADS) {
        const int p = e / k, t = e % k;
        sA[e] = (p0 + p < n_a) ? A[(long long)(p0 + p) * k + t] : 0.f;
    }
    // The thread's outputs (p, t) = idx / k, idx % k for idx = threadIdx.x + THREADS·m; k ≤ 64.
    float acc[8] = {};
    for (int q0 = 0; q0 < n_b; q0 += P) {
        for (int e = threadIdx.x; e < P * k; e += THREADS) {
            const int q = e / k, t = e % k;
            sB[e] = (q0 + q < n_b) ? B[(long long)(q0 + q) * k + t] : 0.f;
        }
        for (int e = threadIdx.x; e < P * P; e += THREADS) {
            // Coalesced along the matrix's fast index either way.
            const int p = transposed ? e % P : e / P, q = transposed ? e / P : e % P;
            float v = 0.f;
            if (p0 + p < n_a && q0 + q < n_b) {
                const long long idx = transposed ? (long long)(q0 + q) * ld_g + p0 + p : (long long)(p0 + p) * ld_g + q0 + q;
                v = to_f32(g[idx]);
            }
            sm[p][q] = v;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < P * P; e += THREADS) {
            const int p = e / P, q = e % P;
            const float gv = sm[p][q];
            if (gv != 0.f) {
                float sq = 0.f;
                for (int t = 0; t < k; ++t) {
                    const float diff = sA[p * k + t] - sB[q * k + t];
                    sq = fmaf(diff, diff, sq);
                }
                const float dist = sqrtf(sq);
                sm[p][q] = dist > 0.f ? c * gv / dist : 0.f;
            }
        }
        __syncthreads();
        for (int m = 0; m < 8; ++m) {
            const int idx = threadIdx.x + THREADS * m;
            if (idx >= P * k) break;
            const int p = idx / k, t = idx % k;
            const float ap = sA[p * k + t];
            float s = acc[m];
            for (int q = 0; q < P; ++q) s = fmaf(sm[p][q], ap - sB[q * k + t], s);
            acc[m] = s;
        }
        __syncthreads();
    }
    for (int m = 0; m < 8; ++m) {
        const int idx = threadIdx.x + THREADS * m;
        if (idx >= P * k) break;
        const int p = idx / k, t = idx % k;
        if (p0 + p < n_a) result[(long long)(p0 + p) * k + t] = acc[m];
    }
}

#define SNELL_TYPED(SUFFIX, T)                                                                                   \
    extern "C" __global__ void snell_sparse_delta_##SUFFIX(FACTORS, float tau, int sparsify, T* dst) {          \
        sparse_delta<T>(in, out, heads, d_in, d_out, k, tau, sparsify, dst);                                   \
    }                                                                                                          \
    extern "C" __global__ void snell_mask_grad_##SUFFIX(FACTORS, float tau, T* g) {                              \
        mask_grad<T>(in, out, heads, d_in, d_out, k, tau, g);                                                  \
    }                                                                                                          \
    extern "C" __global__ void snell_dist_grad_##SUFFIX(const float* A, const float* B, const T* g, int n_a,    \
                                                        int n_b, int k, int transposed, int ld_g, float c,     \
                                                        float* result) {                                       \
        dist_grad<T>(A, B, g, n_a, n_b, k, transposed, ld_g, c, result);                                       \
    }

SNELL_TYPED(f32, float)
SNELL_TYPED(f16, __half)
SNELL_TYPED(bf16, __nv_bfloat16)
