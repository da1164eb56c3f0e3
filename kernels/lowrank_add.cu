// Low-rank accumulate: out = src + scale * (z · Mᵀ) [⊙ mask]; src = out (in place) when null.
//
//   out[t, j] = src[t, j] + scale * mask[t, j] * Σ_k z[t, k] * M[j, k]     (mask = 1 when absent)
//
// Memory layout (all row-major, element offsets):
//   out  [rows, cols]  contiguous, written (and read when src is null)
//   src  [rows, cols]  contiguous or null
//   z    [rows, r]     contiguous
//   M    [cols, r]     strided: M[j, k] = m[j * m_sj + k * m_sk], so that both B [cols, r]
//                      (m_sj = r, m_sk = 1) and Aᵀ for A [r, cols] (m_sj = 1, m_sk = cols) are read
//                      without a transposed copy
//   mask [rows, cols]  contiguous or null; the dropout mask already divided by (1 - p)
//
// Where it runs: the LoRA backward `dx += s · mask ⊙ ((dy B) A)` when dropout is active (cuBLAS
// cannot apply the mask in its epilogue), and the control branch `out = base + α · z Bᵀ`. The
// T x cols product is never written: each output tile is computed in registers from the rank-r
// factors and added to `out` once.
//
// Tiling: a 64 x 64 output tile per block of 256 threads, each thread 4 x 4 outputs spaced 16
// apart so that a half-warp touches 16 consecutive columns (coalesced); the rank is consumed in
// chunks of 16 through shared memory, accumulated in f32. Any rows, cols and r (no multiple of a
// tile required). The CPU reference is `src/ops/lowrank_add.rs`.

#include "common.cuh"

#define TILE_M 64
#define TILE_N 64
#define TILE_K 16

template <typename T>
__device__ void lowrank_add(T* out, const T* src, const T* z, const T* m, const T* mask, int rows, int cols, int r,
                            long long m_sj, long long m_sk, float scale) {
    __shared__ float zs[TILE_K][TILE_M + 1];
    __shared__ float ms[TILE_K][TILE_N + 1];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int row0 = blockIdx.y * TILE_M, col0 = blockIdx.x * TILE_N;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < r; k0 += TILE_K) {
        for (int i = threadIdx.x; i < TILE_M * TILE_K; i += blockDim.x) {
            int rr = i / TILE_K, kk = i % TILE_K, gr = row0 + rr, gk = k0 + kk;
            zs[kk][rr] = (gr < rows && gk < r) ? to_f32(z[(long long)gr * r + gk]) : 0.f;
        }
        for (int i = threadIdx.x; i < TILE_N * TILE_K; i += blockDim.x) {
            // Column-fastest when M's column stride is 1 (Aᵀ), rank-fastest otherwise (B).
            int cc, kk;
            if (m_sj == 1) { cc = i % TILE_N; kk = i / TILE_N; } else { cc = i / TILE_K; kk = i % TILE_K; }
            int gc = col0 + cc, gk = k0 + kk;
            ms[kk][cc] = (gc < cols && gk < r) ? to_f32(m[gc * m_sj + gk * m_sk]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = zs[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = ms[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int row = row0 + ty + 16 * i;
        if (row >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int col = col0 + tx + 16 * j;
            if (col >= cols) continue;
            long long idx = (long long)row * cols + col;
            float v = scale * acc[i][j];
            if (mask) v *= to_f32(mask[idx]);
            out[idx] = from_f32<T>(to_f32(src ? src[idx] : out[idx]) + v);
        }
    }
}

#define LOWRANK_ADD(NAME, T)                                                                       \
    extern "C" __global__ void NAME(T* out, const T* src, const T* z, const T* m, const T* mask,   \
                                    int rows, int cols, int r, long long m_sj, long long m_sk, float scale) { \
        lowrank_add<T>(out, src, z, m, mask, rows, cols, r, m_sj, m_sk, scale);                         \
    }

LOWRANK_ADD(lowrank_add_f32, float)
LOWRANK_ADD(lowrank_add_f16, __half)
LOWRANK_ADD(lowrank_add_bf16, __nv_bfloat16)
