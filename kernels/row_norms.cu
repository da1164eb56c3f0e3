// DoRA's weight norm per output row, without materialising the adapted weight:
//
//   n[i] = ‖W[i, :] + s · B[i, :] A‖₂ = sqrt( Σ_j (W[i, j] + s · Σ_k B[i, k] A[k, j])² )
//
// Memory layout (row-major, contiguous): W [rows, cols] in T (the model's dtype); B [rows, r] and
// A [r, cols] in f32 (the adapters' master weights); n [rows] in f32.
//
// Each block of 256 threads owns ROWS output rows: their B rows sit in shared memory (f32, ROWS·r
// floats of dynamic shared memory), the threads stride over the columns, so each loaded A[k, j]
// serves ROWS rows and W + s·BA exists only in registers. Partial sums of squares are reduced per
// warp, then across warps. Any rows, cols, r. CPU reference: `src/ops/row_norms.rs`.

#include "common.cuh"

#define ROWS 8
#define THREADS 256

template <typename T>
__device__ void row_norms(const T* w, const float* b, const float* a, float* n, int rows, int cols, int r, float s) {
    extern __shared__ float bs[];  // [ROWS][r]
    __shared__ float partial[ROWS][THREADS / 32];
    const int row0 = blockIdx.x * ROWS;
    for (int i = threadIdx.x; i < ROWS * r; i += blockDim.x) {
        int rr = i / r, k = i % r;
        bs[i] = (row0 + rr < rows) ? b[(long long)(row0 + rr) * r + k] : 0.f;
    }
    __syncthreads();
    float sq[ROWS] = {};
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float delta[ROWS] = {};
        for (int k = 0; k < r; ++k) {
            float akj = a[(long long)k * cols + j];
#pragma unroll
            for (int rr = 0; rr < ROWS; ++rr) delta[rr] = fmaf(bs[rr * r + k], akj, delta[rr]);
        }
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
            if (row0 + rr < rows) {
                float v = to_f32(w[(long long)(row0 + rr) * cols + j]) + s * delta[rr];
                sq[rr] = fmaf(v, v, sq[rr]);
            }
        }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
        float t = warp_sum(sq[rr]);
        if (lane == 0) partial[rr][warp] = t;
    }
    __syncthreads();
    if (threadIdx.x < ROWS && row0 + threadIdx.x < rows) {
        float t = 0.f;
        for (int i = 0; i < THREADS / 32; ++i) t += partial[threadIdx.x][i];
        n[row0 + threadIdx.x] = sqrtf(t);
    }
}

#define ROW_NORMS(NAME, T)                                                                              \
    extern "C" __global__ void NAME(const T* w, const float* b, const float* a, float* n, int rows, int cols, \
                                    int r, float s) {                                                  \
        row_norms<T>(w, b, a, n, rows, cols, r, s);                                                    \
    }

ROW_NORMS(row_norms_f32, float)
ROW_NORMS(row_norms_f16, __half)
ROW_NORMS(row_norms_bf16, __nv_bfloat16)
