// SNELL's update recomputed tile by tile from its two factors: the walk that every kernel of
// snell.cu and snell_sparse.cu shares, so that all of them see bit-identical values of Δ.
//
// Layout (row-major, contiguous): In [H, d_in, k] and Out [H, d_out, k] in f32 (k = r/H); head
// coefficients c_h = 0.1·(−1)^h. One entry of the update:
//
//   Δ[i, j] = Σ_h c_h · sqrt(Σ_t (In[h,i,t] − Out[h,j,t])²)
//
// as the direct sum of squared differences (no ‖a‖² + ‖b‖² − 2a·b cancellation), in f32, with
// explicit fmaf so that the compiler cannot contract it differently in different kernels.
//
// A block of 256 threads owns a 64 × 64 tile of (i, j), a thread the 4 × 4 entries
// (ty + 16a, tx + 16b); per head the k columns of the tile's 64 In rows and 64 Out rows go
// through shared memory KC at a time. Grid: ceil(d_out/64) × ceil(d_in/64).
#pragma once
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
