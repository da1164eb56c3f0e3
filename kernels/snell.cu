// SNELL's kernelized update recomputed tile by tile from its two factors, never kept between
// forward and backward (seeds.md §3; the math, the backward and the CPU reference are in
// src/ops/snell.rs, the host side in src/ops/cuda/snell.rs).
//
// Memory layout (row-major, contiguous): In [H, d_in, k] and Out [H, d_out, k] in f32 (k = r/H);
// update-shaped buffers [d_in, d_out] (f32 for snell_delta, else the activations' dtype T). The
// tile walk that recomputes Δ (delta_tile, FOR_EACH_ENTRY) is in snell_delta.cuh, shared with
// snell_sparse.cu, so that the threshold passes, the forward and the backward see bit-identical
// values of Δ.
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
#include "snell_delta.cuh"

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
