// The CUDA C++ a kernel file sees when it is compiled for the CPU emulator (force-included
// before every .cu by scripts/cuda_emu.sh): qualifiers as plain C++, the thread and block
// indices as globals the scheduler sets, __syncthreads and warp shuffles as barriers between
// fibers, __shared__ as static storage (one block runs at a time), atomics as plain
// read-modify-writes (one fiber runs at a time), and __half / __nv_bfloat16 with
// round-to-nearest-even conversions.
//
// The emulator is a correctness tool: it runs the same source the GPU runs, with the same grid,
// block, barriers and memory, but one thread at a time and without FMA contraction or the
// GPU's approximate intrinsics, so results can differ from a GPU's in the last bits.
#pragma once
#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <stdint.h>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif
#define __CUDACC_VER_MAJOR__ 13
#define __CUDACC_VER_MINOR__ 0

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __constant__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define warpSize 32

struct uint3 {
    unsigned x, y, z;
};
// The vector types, with CUDA's alignment (the kernels use them for wide loads and stores).
#define EMU_VECTOR(NAME, T, N, ALIGN) struct alignas(ALIGN) NAME { T x, y EMU_VECTOR_##N; };
#define EMU_VECTOR_2
#define EMU_VECTOR_4 , z, w
EMU_VECTOR(uint2, unsigned, 2, 8)
EMU_VECTOR(uint4, unsigned, 4, 16)
EMU_VECTOR(int2, int, 2, 8)
EMU_VECTOR(int4, int, 4, 16)
EMU_VECTOR(float2, float, 2, 8)
EMU_VECTOR(float4, float, 4, 16)
EMU_VECTOR(double2, double, 2, 16)
#undef EMU_VECTOR
#undef EMU_VECTOR_2
#undef EMU_VECTOR_4
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
// libcu++'s <cuda/std/limits> (candle's reductions use it)
namespace cuda {
namespace std {
using ::std::numeric_limits;
}
}  // namespace cuda
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;
void sync_block();
void sync_warp();
uint64_t exchange_xor(uint64_t bits, int lane_mask, int width);
void* dynamic_shared();

template <typename T> T bit_cast(const auto& v) {
    static_assert(sizeof(T) == sizeof(v));
    T out;
    std::memcpy(&out, &v, sizeof(T));
    return out;
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T> T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = emu::exchange_xor(bits, lane_mask, width);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

// ---- bit casts, counts, rounding-explicit arithmetic (no contraction in this build)
inline unsigned __float_as_uint(float v) { return emu::bit_cast<unsigned>(v); }
inline int __float_as_int(float v) { return emu::bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return emu::bit_cast<float>(v); }
inline float __int_as_float(int v) { return emu::bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return emu::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return emu::bit_cast<double>(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int __clzll(unsigned long long v) { return v ? __builtin_clzll(v) : 64; }
inline int __ffs(unsigned v) { return __builtin_ffs(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : a); }
template <typename T> T __ldg(const T* p) { return *p; }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752440); }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// CUDA's overloaded min/max in the global namespace.
#define EMU_MINMAX(T)                                  \
    inline T max(T a, T b) { return a > b ? a : b; } \
    inline T min(T a, T b) { return a < b ? a : b; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned)
EMU_MINMAX(long)
EMU_MINMAX(unsigned long)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
#undef EMU_MINMAX

// ---- half precision: storage as bits, arithmetic through f32 (exact for one op: f32 has more
// than twice the significand bits of either type, so rounding twice equals rounding once)
namespace emu {
inline unsigned short f32_to_f16_bits(float f) {
    const uint32_t x = bit_cast<uint32_t>(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to at least 65520: overflow
    if (abs < 0x38800000u) {                         // below 2^-14: subnormal half (or zero)
        const float scaled = bit_cast<float>(abs) * 16777216.0f;  // · 2^24: the subnormal units
        return sign | (unsigned short)std::nearbyint(scaled);      // ties to even (default mode)
    }
    const uint32_t mant_odd = (abs >> 13) & 1u;
    const uint32_t rounded = abs + 0xfffu + mant_odd;
    return sign | (unsigned short)((rounded - 0x38000000u) >> 13);
}
inline float f16_bits_to_f32(unsigned short h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) {
        const float v = (float)mant * (1.0f / 16777216.0f);
        return bit_cast<float>(bit_cast<uint32_t>(v) | sign);
    }
    if (exp == 31) return bit_cast<float>(sign | 0x7f800000u | (mant << 13));
    return bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}
inline unsigned short f32_to_bf16_bits(float f) {
    const uint32_t x = bit_cast<uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(unsigned short b) { return bit_cast<float>((uint32_t)b << 16); }
}  // namespace emu

struct __half_raw {
    unsigned short x;
};
struct __nv_bfloat16_raw {
    unsigned short x;
};

#define EMU_HALF_TYPE(NAME, RAW, TO_BITS, FROM_BITS)                                              \
    struct NAME {                                                                                 \
        unsigned short __x;                                                                       \
        NAME() = default;                                                                         \
        NAME(RAW r) : __x(r.x) {}                                                                 \
        NAME(float f) : __x(TO_BITS(f)) {}                                                        \
        NAME(double f) : __x(TO_BITS((float)f)) {}                                                \
        NAME(int v) : __x(TO_BITS((float)v)) {}                                                   \
        NAME(unsigned v) : __x(TO_BITS((float)v)) {}                                              \
        NAME(long long v) : __x(TO_BITS((float)v)) {}                                             \
        NAME(unsigned long long v) : __x(TO_BITS((float)v)) {}                                    \
        operator float() const { return FROM_BITS(__x); }                                         \
        operator RAW() const { return RAW{__x}; }                                                 \
        NAME& operator+=(NAME o) { return *this = NAME(float(*this) + float(o)); }                \
        NAME& operator-=(NAME o) { return *this = NAME(float(*this) - float(o)); }                \
        NAME& operator*=(NAME o) { return *this = NAME(float(*this) * float(o)); }                \
        NAME& operator/=(NAME o) { return *this = NAME(float(*this) / float(o)); }                \
    };                                                                                            \
    inline NAME operator+(NAME a, NAME b) { return NAME(float(a) + float(b)); }                   \
    inline NAME operator-(NAME a, NAME b) { return NAME(float(a) - float(b)); }                   \
    inline NAME operator*(NAME a, NAME b) { return NAME(float(a) * float(b)); }                   \
    inline NAME operator/(NAME a, NAME b) { return NAME(float(a) / float(b)); }                   \
    inline NAME operator-(NAME a) { NAME r = a; r.__x ^= 0x8000u; return r; }                     \
    inline bool operator==(NAME a, NAME b) { return float(a) == float(b); }                       \
    inline bool operator!=(NAME a, NAME b) { return float(a) != float(b); }                       \
    inline bool operator<(NAME a, NAME b) { return float(a) < float(b); }                         \
    inline bool operator<=(NAME a, NAME b) { return float(a) <= float(b); }                       \
    inline bool operator>(NAME a, NAME b) { return float(a) > float(b); }                         \
    inline bool operator>=(NAME a, NAME b) { return float(a) >= float(b); }

EMU_HALF_TYPE(__half, __half_raw, emu::f32_to_f16_bits, emu::f16_bits_to_f32)
EMU_HALF_TYPE(__nv_bfloat16, __nv_bfloat16_raw, emu::f32_to_bf16_bits, emu::bf16_bits_to_f32)
#undef EMU_HALF_TYPE
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double f) { return __half((float)f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short v) { return __half(__half_raw{v}); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double f) { return __nv_bfloat16((float)f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16(__nv_bfloat16_raw{v}); }

#define EMU_HALF_MATH(T, P)                                                            \
    inline bool __hisnan(T a) { return std::isnan(float(a)); }                         \
    inline bool __hisinf(T a) { return std::isinf(float(a)); }                         \
    inline T __hmax(T a, T b) { return float(a) > float(b) ? a : b; }                  \
    inline T __hmin(T a, T b) { return float(a) < float(b) ? a : b; }                  \
    inline T __hmax_nan(T a, T b) { return __hisnan(a) ? a : (__hisnan(b) ? b : __hmax(a, b)); } \
    inline T __hmin_nan(T a, T b) { return __hisnan(a) ? a : (__hisnan(b) ? b : __hmin(a, b)); } \
    inline T __habs(T a) { T r = a; r.__x &= 0x7fffu; return r; }                      \
    inline T __hadd(T a, T b) { return a + b; }                                        \
    inline T __hsub(T a, T b) { return a - b; }                                        \
    inline T __hmul(T a, T b) { return a * b; }                                        \
    inline T __hdiv(T a, T b) { return a / b; }                                        \
    inline T __hneg(T a) { return -a; }                                                \
    inline T __hfma(T a, T b, T c) { return T(std::fma(float(a), float(b), float(c))); } \
    inline T P##exp(T a) { return T(std::exp(float(a))); }                             \
    inline T P##log(T a) { return T(std::log(float(a))); }                             \
    inline T P##sqrt(T a) { return T(std::sqrt(float(a))); }                           \
    inline T P##rsqrt(T a) { return T(1.0f / std::sqrt(float(a))); }                  \
    inline T P##sin(T a) { return T(std::sin(float(a))); }                             \
    inline T P##cos(T a) { return T(std::cos(float(a))); }                             \
    inline T P##tanh(T a) { return T(std::tanh(float(a))); }                           \
    inline T P##floor(T a) { return T(std::floor(float(a))); }                         \
    inline T P##ceil(T a) { return T(std::ceil(float(a))); }                           \
    inline T P##rint(T a) { return T(std::nearbyint(float(a))); }                      \
    inline T P##trunc(T a) { return T(std::trunc(float(a))); }
EMU_HALF_MATH(__half, h)
EMU_HALF_MATH(__nv_bfloat16, h)
#undef EMU_HALF_MATH

// The paired types, element by element.
#define EMU_PAIR(NAME, T)                                                                             \
    struct alignas(4) NAME {                                                                          \
        T x, y;                                                                                       \
    };                                                                                                \
    inline NAME __hadd2(NAME a, NAME b) { return NAME{a.x + b.x, a.y + b.y}; }                        \
    inline NAME __hsub2(NAME a, NAME b) { return NAME{a.x - b.x, a.y - b.y}; }                        \
    inline NAME __hmul2(NAME a, NAME b) { return NAME{a.x * b.x, a.y * b.y}; }                        \
    inline NAME __h2div(NAME a, NAME b) { return NAME{a.x / b.x, a.y / b.y}; }                        \
    inline NAME __hdiv2(NAME a, NAME b) { return NAME{a.x / b.x, a.y / b.y}; }
EMU_PAIR(__half2, __half)
EMU_PAIR(__nv_bfloat162, __nv_bfloat16)
#undef EMU_PAIR

// fp8 E4M3 (candle instantiates its ops for it; nothing of this project runs in fp8): decoding
// exact, encoding to the nearest value, ties to even, saturating at ±448 as __NV_SATFINITE.
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
namespace emu {
inline float e4m3_to_f32(unsigned char v) {
    const int sign = v >> 7, exp = (v >> 3) & 0xf, mant = v & 7;
    if (exp == 15 && mant == 7) return std::numeric_limits<float>::quiet_NaN();
    const float mag = exp == 0 ? std::ldexp((float)mant, -9) : std::ldexp(1.0f + mant / 8.0f, exp - 7);
    return sign ? -mag : mag;
}
inline unsigned char f32_to_e4m3(float f) {
    if (std::isnan(f)) return 0x7f;
    const unsigned char sign = std::signbit(f) ? 0x80 : 0;
    const float a = std::fmin(std::fabs(f), 448.0f);
    unsigned char best = 0;
    for (unsigned char c = 1; c < 0x7f; ++c) {
        const float d = std::fabs(e4m3_to_f32(c) - a), db = std::fabs(e4m3_to_f32(best) - a);
        if (d < db || (d == db && (c & 1) == 0)) best = c;
    }
    return sign | best;
}
}  // namespace emu
struct __nv_fp8_e4m3 {
    unsigned char __x;
    __nv_fp8_e4m3() = default;
    explicit __nv_fp8_e4m3(float f) : __x(emu::f32_to_e4m3(f)) {}
    explicit __nv_fp8_e4m3(double f) : __x(emu::f32_to_e4m3((float)f)) {}
    explicit __nv_fp8_e4m3(__half h) : __x(emu::f32_to_e4m3(float(h))) {}
    explicit __nv_fp8_e4m3(__nv_bfloat16 h) : __x(emu::f32_to_e4m3(float(h))) {}
    explicit __nv_fp8_e4m3(int v) : __x(emu::f32_to_e4m3((float)v)) {}
    explicit operator float() const { return emu::e4m3_to_f32(__x); }
};
inline __half_raw __nv_cvt_fp8_to_halfraw(unsigned char v, __nv_fp8_interpretation_t) {
    return __half_raw{emu::f32_to_f16_bits(emu::e4m3_to_f32(v))};
}

// ---- atomics: plain read-modify-write, since one fiber runs at a time
#define EMU_ATOMIC(NAME, UPDATE)                                  \
    template <typename T> T NAME(T* p, std::type_identity_t<T> v) { \
        T old = *p;                                                \
        UPDATE;                                                    \
        return old;                                                \
    }
EMU_ATOMIC(atomicAdd, *p = old + v)
EMU_ATOMIC(atomicSub, *p = old - v)
EMU_ATOMIC(atomicExch, *p = v)
EMU_ATOMIC(atomicMin, if (v < old) *p = v)
EMU_ATOMIC(atomicMax, if (v > old) *p = v)
EMU_ATOMIC(atomicOr, *p = old | v)
EMU_ATOMIC(atomicAnd, *p = old & v)
#undef EMU_ATOMIC
template <typename T> T atomicCAS(T* p, std::type_identity_t<T> compare, std::type_identity_t<T> v) {
    T old = *p;
    if (old == compare) *p = v;
    return old;
}

// ---- registration: every `extern "C"` kernel of a file becomes a thunk that unpacks
// cuLaunchKernel's `void** kernelParams` into the kernel's typed arguments
namespace emu {
using Thunk = void (*)(void**);
void register_kernel(const char* name, Thunk thunk);

template <typename F> struct Invoker;
template <typename... A> struct Invoker<void(A...)> {
    template <void (*F)(A...), size_t... I> static void unpack(void** p, std::index_sequence<I...>) {
        F(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
    }
    template <void (*F)(A...)> static void call(void** p) { unpack<F>(p, std::index_sequence_for<A...>{}); }
};
struct Registrar {
    Registrar(const char* name, Thunk thunk) { register_kernel(name, thunk); }
};
}  // namespace emu

#define EMU_REGISTER(name) \
    static emu::Registrar emu_registrar_##name(#name, &emu::Invoker<decltype(name)>::call<&name>);
