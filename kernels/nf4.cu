// NF4 (bitsandbytes' 4-bit NormalFloat) dequantize and batch-1 GEMV, straight from the packed
// weights. The format (src/quant/nf4.rs has the full description and the CPU reference):
//
//   packed     [ceil(n/2)] u8   two 4-bit codes per byte over the row-major flattened matrix,
//                               the first value in the high nibble
//   absmax_q   [blocks]    u8   double quantization: the 8-bit code of (absmax − offset) per block
//   scales     [...]       f32  double: nested_absmax, one per `nested` blocks; plain: absmax
//   tables     [16 + 256]  f32  the NF4 code, then the signed dynamic map of the nested codes
//
//   absmax_b = tables[16 + absmax_q[b]] · scales[b / nested] + offset      (double)
//            = scales[b]                                                   (plain)
//   w[e]     = tables[code(e)] · absmax_{e / blocksize}, rounded to the stored dtype
//
// Products and sums use __fmul_rn / __fadd_rn so that nvcc does not contract them into FMAs:
// the values are then bit-identical to the CPU reference (and to bitsandbytes').
//
// Dequantize: one thread per 16 values (8 packed bytes, one uint2 load; 16 divides every
// bitsandbytes block size, so one scale per thread), 2 x 16-byte stores for half types.
// GEMV: one warp per output row, 16 values per lane per step, f32 accumulation, a warp sum.
// Few-row matmul (y [t, out] = x [t, in] · Wᵀ for a handful of rows, e.g. beam search): the
// GEMV's walk with FEW_ROWS rows of x per block row (grid.y covers t), so each 16 weights are
// decoded once and used FEW_ROWS times; the packed matrix is read ceil(t / FEW_ROWS) times,
// mostly from L2, and nothing dense is written.

#include "common.cuh"

// Rounds v to the weights' stored dtype (0 f32, 1 f16, 2 bf16), as the reference does before
// converting to the requested dtype.
__device__ __forceinline__ float round_stored(float v, int stored) {
    if (stored == 1) return __half2float(__float2half_rn(v));
    if (stored == 2) return __bfloat162float(__float2bfloat16_rn(v));
    return v;
}

__device__ __forceinline__ float block_absmax(long long b, const uint8_t* absmax_q, const float* scales,
                                              const float* tables, float offset, int double_quant, int nested) {
    if (!double_quant) return scales[b];
    return __fadd_rn(__fmul_rn(tables[16 + absmax_q[b]], scales[b / nested]), offset);
}

__device__ __forceinline__ int nibble(const uint8_t* packed, long long e) {
    uint8_t byte = packed[e >> 1];
    return (e & 1) ? (byte & 0xF) : (byte >> 4);
}

// The 16 weights from element e (16-aligned, so one block and one absmax), rounded to the stored
// dtype.
__device__ __forceinline__ void decode16(const uint8_t* packed, long long e, float absmax, const float* tables,
                                         int stored, float w[16]) {
    uint2 raw = *reinterpret_cast<const uint2*>(packed + e / 2);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        w[2 * i] = round_stored(__fmul_rn(tables[bytes[i] >> 4], absmax), stored);
        w[2 * i + 1] = round_stored(__fmul_rn(tables[bytes[i] & 0xF], absmax), stored);
    }
}

__device__ __forceinline__ float decode1(const uint8_t* packed, long long e, float absmax, const float* tables, int stored) {
    return round_stored(__fmul_rn(tables[nibble(packed, e)], absmax), stored);
}

template <typename T>
__device__ void nf4_dequantize(const uint8_t* packed, const uint8_t* absmax_q, const float* scales,
                               const float* tables, float offset, int double_quant, int blocksize, int nested,
                               long long n, int stored, T* out) {
    long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 16;
    if (first >= n) return;
    float absmax = block_absmax(first / blocksize, absmax_q, scales, tables, offset, double_quant, nested);
    if (first + 16 <= n) {
        float w[16];
        decode16(packed, first, absmax, tables, stored, w);
        __align__(16) T vals[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) vals[i] = from_f32<T>(w[i]);
        // 16 values of T are 32 (half types) or 64 (f32) bytes: whole 16-byte stores.
        const uint4* src = reinterpret_cast<const uint4*>(vals);
        uint4* dst = reinterpret_cast<uint4*>(out + first);
#pragma unroll
        for (int i = 0; i < (int)(16 * sizeof(T) / 16); ++i) dst[i] = src[i];
    } else {
        for (long long e = first; e < n; ++e) out[e] = from_f32<T>(decode1(packed, e, absmax, tables, stored));
    }
}

#define FEW_ROWS 8

// y [t, rows] = x [t, cols] · dequant(W)ᵀ, R rows of x per block row (blockIdx.y takes rows
// R·y .. R·y + R − 1): R = 1 is the GEMV, R = FEW_ROWS the few-row matmul.
template <typename T, int R>
__device__ void nf4_rows_matmul(const uint8_t* packed, const uint8_t* absmax_q, const float* scales, const float* tables,
                                float offset, int double_quant, int blocksize, int nested, int rows, int cols, int stored,
                                const T* x, int t, T* y) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int t0 = blockIdx.y * R;
    if (row >= rows || t0 >= t) return;
    int nt = min(R, t - t0);
    const T* xs = x + (long long)t0 * cols;
    long long base = (long long)row * cols;
    float acc[R];
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] = 0.f;
    if (cols % 16 == 0) {
        for (int c = lane * 16; c < cols; c += 32 * 16) {
            long long e = base + c;
            float w[16];
            decode16(packed, e, block_absmax(e / blocksize, absmax_q, scales, tables, offset, double_quant, nested), tables, stored, w);
#pragma unroll
            for (int j = 0; j < R; ++j) {
                if (j >= nt) break;
                const T* xr = xs + (long long)j * cols + c;
#pragma unroll
                for (int i = 0; i < 16; ++i) acc[j] = fmaf(w[i], to_f32(xr[i]), acc[j]);
            }
        }
    } else {
        for (int c = lane; c < cols; c += 32) {
            long long e = base + c;
            float absmax = block_absmax(e / blocksize, absmax_q, scales, tables, offset, double_quant, nested);
            float w = decode1(packed, e, absmax, tables, stored);
#pragma unroll
            for (int j = 0; j < R; ++j) {
                if (j >= nt) break;
                acc[j] = fmaf(w, to_f32(xs[(long long)j * cols + c]), acc[j]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
        float v = warp_sum(acc[j]);
        if (lane == 0 && j < nt) y[(long long)(t0 + j) * rows + row] = from_f32<T>(v);
    }
}

#define NF4_KERNELS(SUFFIX, T)                                                                               \
    extern "C" __global__ void nf4_dequantize_##SUFFIX(const uint8_t* packed, const uint8_t* absmax_q,      \
                                                       const float* scales, const float* tables, float offset, \
                                                       int double_quant, int blocksize, int nested,         \
                                                       long long n, int stored, T* out) {                   \
        nf4_dequantize<T>(packed, absmax_q, scales, tables, offset, double_quant, blocksize, nested, n, stored, \
                          out);                                                                             \
    }                                                                                                       \
    extern "C" __global__ void nf4_gemv_##SUFFIX(const uint8_t* packed, const uint8_t* absmax_q,            \
                                                 const float* scales, const float* tables, float offset,    \
                                                 int double_quant, int blocksize, int nested, int rows,     \
                                                 int cols, int stored, const T* x, int t, T* y) {           \
        nf4_rows_matmul<T, 1>(packed, absmax_q, scales, tables, offset, double_quant, blocksize, nested, rows, \
                              cols, stored, x, t, y);                                                       \
    }                                                                                                       \
    extern "C" __global__ void nf4_matmul_few_##SUFFIX(const uint8_t* packed, const uint8_t* absmax_q,      \
                                                       const float* scales, const float* tables, float offset, \
                                                       int double_quant, int blocksize, int nested, int rows, \
                                                       int cols, int stored, const T* x, int t, T* y) {     \
        nf4_rows_matmul<T, FEW_ROWS>(packed, absmax_q, scales, tables, offset, double_quant, blocksize, nested, \
                                     rows, cols, stored, x, t, y);                                          \
    }

NF4_KERNELS(f32, float)
NF4_KERNELS(f16, __half)
NF4_KERNELS(bf16, __nv_bfloat16)
