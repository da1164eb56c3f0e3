// The CUDA driver, cuBLAS and cuRAND entry points that candle and cudarc call, on host memory:
// one device (compute capability 8.0, no memory pools), device pointers are host pointers,
// every stream is the host thread (work runs when it is issued, so events and synchronisation
// are no-ops), a module load ignores the PTX and a function is looked up by name among the
// kernels compiled for the emulator, a launch runs it through the fiber scheduler, and the GEMMs
// are column-major loops with f32 (f64 for doubles) accumulation, rounded once to the output
// type, as cuBLAS's CUBLAS_COMPUTE_32F promises. Any other entry point the binary imports is a
// stub that names itself and fails (scripts/cuda_emu.sh generates them).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <mutex>
#include <cerrno>
#include <sys/mman.h>
#include <random>
#include <string>
#include <unordered_map>
#include <map>
#include <vector>
#include <functional>

#include "cuda_emu.h"

namespace emu {
Thunk find_kernel(const char* name);
bool launch(const char* name, Thunk thunk, dim3 grid, dim3 block, unsigned shared_bytes, void** params);
}  // namespace emu

namespace {
constexpr int CUDA_SUCCESS = 0;
constexpr int CUDA_ERROR_INVALID_VALUE = 1;
constexpr int CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr int CUDA_ERROR_NOT_FOUND = 500;
constexpr int CUDA_ERROR_LAUNCH_FAILED = 719;

struct Function {
    std::string name;
    emu::Thunk thunk;
    int max_dynamic_shared = 48 * 1024;
};

int fake_handle_storage[16];
void* fake_handle(int i) { return &fake_handle_storage[i]; }

bool trace() {
    static const bool on = std::getenv("CUDA_EMU_TRACE") != nullptr;
    return on;
}

// CUDA_EMU_MEMORY_ONLY=1: allocations are counted as always, and nothing else runs: launches
// (after their limit checks), GEMMs, copies within the device, memsets and cuRAND do nothing, and
// new buffers are not filled, so pages nothing uploaded to stay unmapped zeros (copies from and
// to the host still run: the host reads back what it uploaded). What is in use on the device at
// any point depends only on the sizes the host code asks for, so this gives the device-memory
// peak of a run at any size in seconds (a LLaMA-7B step costs no host memory for its weights);
// what kernels would have written reads back as zeros, so it is for host code whose allocations
// and control flow do not depend on computed values.
bool memory_only() {
    static const bool on = [] {
        const char* v = std::getenv("CUDA_EMU_MEMORY_ONLY");
        return v && *v && std::strcmp(v, "0") != 0;
    }();
    return on;
}

// The emulated device's memory: CUDA_EMU_MEMORY_GIB GiB (default 80, an H100's).
size_t device_total_bytes() {
    static const size_t gib = [] {
        const char* v = std::getenv("CUDA_EMU_MEMORY_GIB");
        return v ? (size_t)std::strtoull(v, nullptr, 10) : 80;
    }();
    return gib << 30;
}
}  // namespace

extern "C" {
typedef unsigned long long CUdeviceptr;

// ---- initialisation, device and context
int cuInit(unsigned) { return CUDA_SUCCESS; }
int cuDriverGetVersion(int* v) { *v = 13000; return CUDA_SUCCESS; }
int cuDeviceGetCount(int* n) { *n = 1; return CUDA_SUCCESS; }
int cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_VALUE;
    *d = 0;
    return CUDA_SUCCESS;
}
int cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "cuda-emu (CPU emulator)");
    return CUDA_SUCCESS;
}
int cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = device_total_bytes(); return CUDA_SUCCESS; }
int cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
        case 1: *v = 1024; break;                         // max threads per block
        case 2: case 3: case 4: *v = 1024; break;         // max block dims (z is 64 on GPUs)
        case 5: *v = 2147483647; break;                   // max grid dim x
        case 6: case 7: *v = 65535; break;                // max grid dims y, z
        case 8: *v = 48 * 1024; break;                    // shared memory per block
        case 10: *v = 32; break;                          // warp size
        case 16: *v = 1; break;                           // multiprocessors
        case 75: *v = 8; break;                           // compute capability major
        case 76: *v = 0; break;                           // minor
        case 97: *v = 96 * 1024; break;                   // opt-in shared memory per block
        case 115: *v = 0; break;                          // memory pools supported: no
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
int cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = fake_handle(0); return CUDA_SUCCESS; }
int cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }
int cuCtxSetCurrent(void*) { return CUDA_SUCCESS; }
int cuCtxGetCurrent(void** ctx) { *ctx = fake_handle(0); return CUDA_SUCCESS; }
int cuCtxGetDevice(int* d) { *d = 0; return CUDA_SUCCESS; }
int cuCtxPushCurrent_v2(void*) { return CUDA_SUCCESS; }
int cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = fake_handle(0); return CUDA_SUCCESS; }
int cuCtxSynchronize() { return CUDA_SUCCESS; }
int cuGetErrorString(int e, const char** s) {
    *s = e == CUDA_ERROR_NOT_FOUND ? "cuda-emu: no such kernel" : e == CUDA_ERROR_LAUNCH_FAILED ? "cuda-emu: the launch failed" : "cuda-emu: error";
    return CUDA_SUCCESS;
}
int cuGetErrorName(int e, const char** s) { return cuGetErrorString(e, s); }

// ---- streams and events: the host thread runs everything in order
int cuStreamCreate(void** s, unsigned) { *s = fake_handle(1); return CUDA_SUCCESS; }
int cuStreamCreateWithPriority(void** s, unsigned, int) { *s = fake_handle(1); return CUDA_SUCCESS; }
int cuStreamDestroy_v2(void*) { return CUDA_SUCCESS; }
int cuStreamSynchronize(void*) { return CUDA_SUCCESS; }
int cuStreamQuery(void*) { return CUDA_SUCCESS; }
int cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }
int cuEventCreate(void** e, unsigned) { *e = fake_handle(2); return CUDA_SUCCESS; }
int cuEventDestroy_v2(void*) { return CUDA_SUCCESS; }
int cuEventRecord(void*, void*) { return CUDA_SUCCESS; }
int cuEventRecordWithFlags(void*, void*, unsigned) { return CUDA_SUCCESS; }
int cuEventSynchronize(void*) { return CUDA_SUCCESS; }
int cuEventQuery(void*) { return CUDA_SUCCESS; }
int cuEventElapsedTime(float* ms, void*, void*) { *ms = 0.f; return CUDA_SUCCESS; }
int cuEventElapsedTime_v2(float* ms, void*, void*) { *ms = 0.f; return CUDA_SUCCESS; }

}  // extern "C"

// ---- memory: device pointers are host pointers, counted against the device's
// `device_total_bytes`, so that an allocation over it fails as on the
// GPU and cuMemGetInfo reports the bytes in use. Used bytes there are the peak since the
// previous call (at least what is in use now), so a sampler that reads it now and then sees
// every transient; two reads in a row give the bytes in use.
namespace {
// Each buffer ends where an inaccessible page begins (its start 16-byte aligned, so at most 15
// bytes of slack), so a kernel that reads or writes past the end of a buffer faults at once, and
// the fault is reported with the kernel, block and thread (see `report_fault`). A new buffer is
// filled with 0xff bytes (NaN in every float type), as a GPU's is with whatever was there: a
// kernel that reads what nothing wrote gives NaN, not a lucky zero.
struct Mapping {
    char* base;
    size_t length, bytes;
    const char* writer = nullptr;  // the first kernel or GEMM launched after the allocation
};
struct DeviceMemory {
    std::unordered_map<void*, Mapping> buffers;
    size_t live = 0, peak_since_query = 0;
    // CUDA_EMU_PEAK_REPORT=1: the sizes of the buffers live at the run's peak, printed at exit
    // (what holds the memory, by size: 500 MiB buffers in a LLaMA step are [4096, 32000] f32).
    size_t peak = 0;
    std::vector<std::pair<size_t, const char*>> at_peak;
    std::vector<void*> unwritten;  // buffers allocated since the last launch
    std::string last_launch, last_launch_at_peak;  // the kernel launched last before the peak
} memory;
std::mutex memory_lock;

bool peak_report() {
    static const bool on = std::getenv("CUDA_EMU_PEAK_REPORT") != nullptr;
    return on;
}

// Names `name` (a string that lives as long as the process) as the writer of the buffers
// allocated since the previous launch.
void note_launch(const char* name) {
    std::lock_guard<std::mutex> g(memory_lock);
    memory.last_launch = name;
    for (void* p : memory.unwritten) {
        auto it = memory.buffers.find(p);
        if (it != memory.buffers.end() && !it->second.writer) it->second.writer = name;
    }
    memory.unwritten.clear();
}

struct PeakReport {
    ~PeakReport() {
        if (!peak_report()) return;
        std::map<std::pair<size_t, std::string>, int, std::greater<>> by_size;
        for (auto [b, w] : memory.at_peak) ++by_size[{b, w ? w : "(no launch yet)"}];
        std::fprintf(stderr, "cuda-emu: peak %.1f MiB in %zu buffers, reached after a launch of %s; by size (MiB x count, largest first):\n",
                     memory.peak / 1048576.0, memory.at_peak.size(), memory.last_launch_at_peak.empty() ? "nothing" : memory.last_launch_at_peak.c_str());
        int shown = 0;
        for (auto& [key, count] : by_size) {
            if (++shown > 30) break;
            std::fprintf(stderr, "cuda-emu:   %10.2f x %d = %.1f MiB, first launch after: %s\n", key.first / 1048576.0, count,
                         key.first * count / 1048576.0, key.second.c_str());
        }
    }
} peak_reporter;
constexpr size_t PAGE = 4096;

void* device_alloc(size_t bytes) {
    std::lock_guard<std::mutex> g(memory_lock);
    if (memory.live + bytes > device_total_bytes()) return nullptr;
    const size_t data = std::max<size_t>(16, (bytes + 15) / 16 * 16);
    const size_t pages = (data + PAGE - 1) / PAGE;
    const size_t length = (pages + 1) * PAGE;
    void* m = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        std::fprintf(stderr, "cuda-emu: mmap of %zu bytes failed (%d live buffers): %s\n", length, (int)memory.buffers.size(), std::strerror(errno));
        return nullptr;
    }
    char* base = static_cast<char*>(m);
    mprotect(base + pages * PAGE, PAGE, PROT_NONE);
    char* p = base + pages * PAGE - data;
    if (!memory_only()) std::memset(p, 0xff, data);
    memory.buffers[p] = Mapping{base, length, bytes};
    if (peak_report()) memory.unwritten.push_back(p);
    memory.live += bytes;
    memory.peak_since_query = std::max(memory.peak_since_query, memory.live);
    if (peak_report() && memory.live > memory.peak) {
        memory.peak = memory.live;
        memory.at_peak.clear();
        for (auto& [_, m] : memory.buffers) memory.at_peak.emplace_back(m.bytes, m.writer);
        memory.last_launch_at_peak = memory.last_launch;
    }
    return p;
}
void device_free(void* p) {
    if (!p) return;
    std::lock_guard<std::mutex> g(memory_lock);
    auto it = memory.buffers.find(p);
    if (it == memory.buffers.end()) return;
    memory.live -= it->second.bytes;
    munmap(it->second.base, it->second.length);
    memory.buffers.erase(it);
}
}  // namespace

extern "C" {
int cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    void* m = device_alloc(bytes);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = (CUdeviceptr)m;
    return CUDA_SUCCESS;
}
int cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
int cuMemFree_v2(CUdeviceptr p) { device_free((void*)p); return CUDA_SUCCESS; }
int cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
int cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
int cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
int cuMemFreeHost(void* p) { std::free(p); return CUDA_SUCCESS; }
int cuMemHostRegister_v2(void*, size_t, unsigned) { return CUDA_SUCCESS; }
int cuMemHostUnregister(void*) { return CUDA_SUCCESS; }
int cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(memory_lock);
    *total = device_total_bytes();
    *free_bytes = *total - memory.peak_since_query;
    memory.peak_since_query = memory.live;
    return CUDA_SUCCESS;
}
int cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (peak_report()) note_launch("a copy from the host");
    std::memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}
int cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) { return cuMemcpyHtoD_v2(dst, src, n); }
int cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { std::memcpy(dst, (const void*)src, n); return CUDA_SUCCESS; }
int cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoH_v2(dst, src, n); }
int cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (!memory_only()) std::memmove((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
int cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoD_v2(dst, src, n); }
int cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoD_v2(dst, src, n); }
int cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoD_v2(dst, src, n); }
int cuMemcpyPeerAsync(CUdeviceptr dst, void*, CUdeviceptr src, void*, size_t n, void*) { return cuMemcpyDtoD_v2(dst, src, n); }
int cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    if (!memory_only()) std::memset((void*)p, v, n);
    return CUDA_SUCCESS;
}
int cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(p, v, n); }
int cuMemsetD16_v2(CUdeviceptr p, unsigned short v, size_t n) {
    auto* q = (unsigned short*)p;
    for (size_t i = 0; i < n && !memory_only(); ++i) q[i] = v;
    return CUDA_SUCCESS;
}
int cuMemsetD16Async(CUdeviceptr p, unsigned short v, size_t n, void*) { return cuMemsetD16_v2(p, v, n); }
int cuMemsetD32_v2(CUdeviceptr p, unsigned v, size_t n) {
    auto* q = (unsigned*)p;
    for (size_t i = 0; i < n && !memory_only(); ++i) q[i] = v;
    return CUDA_SUCCESS;
}
int cuMemsetD32Async(CUdeviceptr p, unsigned v, size_t n, void*) { return cuMemsetD32_v2(p, v, n); }
int cuPointerGetAttribute(void* data, int attribute, CUdeviceptr) {
    if (attribute == 2) *(int*)data = 2;  // CU_POINTER_ATTRIBUTE_MEMORY_TYPE: device
    return CUDA_SUCCESS;
}

// ---- modules and launches: kernels are found by name among those compiled for the emulator
int cuModuleLoadData(void** module, const void*) { *module = fake_handle(3); return CUDA_SUCCESS; }
int cuModuleLoadDataEx(void** module, const void*, unsigned, void*, void**) { *module = fake_handle(3); return CUDA_SUCCESS; }
int cuModuleUnload(void*) { return CUDA_SUCCESS; }
int cuModuleGetFunction(void** f, void*, const char* name) {
    emu::Thunk thunk = emu::find_kernel(name);
    if (!thunk) {
        std::fprintf(stderr, "cuda-emu: no kernel named %s was compiled for the emulator\n", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    *f = new Function{name, thunk};
    return CUDA_SUCCESS;
}
int cuFuncGetAttribute(int* v, int attribute, void*) {
    *v = attribute == 0 ? 1024 : 0;  // CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK
    return CUDA_SUCCESS;
}
int cuFuncSetAttribute(void* f, int attribute, int value) {
    if (attribute == 8) static_cast<Function*>(f)->max_dynamic_shared = value;  // MAX_DYNAMIC_SHARED_SIZE_BYTES
    return CUDA_SUCCESS;
}
int cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS; }
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared,
                   void*, void** params, void** extra) {
    auto* fn = static_cast<Function*>(f);
    if (extra) {
        std::fprintf(stderr, "cuda-emu: %s: launches with `extra` are not emulated\n", fn->name.c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    // The limits of the GPUs this project targets (compute capability 8.0 and 9.0), which a
    // launch over them fails on: grid, block, and dynamic shared memory without the opt-in.
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    const char* over = !gx || !gy || !gz || gx > 2147483647u || gy > 65535 || gz > 65535 ? "grid"
                       : !threads || bx > 1024 || by > 1024 || bz > 64 || threads > 1024 ? "block"
                       : shared > (unsigned)fn->max_dynamic_shared ? "dynamic shared memory"
                       : nullptr;
    if (over) {
        std::fprintf(stderr, "cuda-emu: %s: the %s of grid (%u,%u,%u) block (%u,%u,%u) shared %u B is over the GPU's limits\n",
                     fn->name.c_str(), over, gx, gy, gz, bx, by, bz, shared);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (peak_report()) note_launch(fn->name.c_str());
    if (trace()) std::fprintf(stderr, "cuda-emu: %s grid (%u,%u,%u) block (%u,%u,%u) shared %u\n", fn->name.c_str(), gx, gy, gz, bx, by, bz, shared);
    if (memory_only()) return CUDA_SUCCESS;
    return emu::launch(fn->name.c_str(), fn->thunk, dim3{gx, gy, gz}, dim3{bx, by, bz}, shared, params) ? CUDA_SUCCESS : CUDA_ERROR_LAUNCH_FAILED;
}
}  // extern "C"

// ---- cuBLAS: column-major GEMMs
namespace {
constexpr int CUBLAS_STATUS_SUCCESS = 0;
constexpr int CUBLAS_STATUS_NOT_SUPPORTED = 15;
enum DataType { R_32F = 0, R_64F = 1, R_16F = 2, R_16BF = 14 };

// Bytes of one element of a data type the GEMMs take; 0 for any other (int8, fp8, complex...).
int element_bytes(int type) {
    switch (type) {
        case R_32F: return 4;
        case R_64F: return 8;
        case R_16F: case R_16BF: return 2;
        default: return 0;
    }
}

// CUBLAS_COMPUTE_64F and its pedantic twin accumulate in f64; the others here in f32.
bool double_compute(int compute) { return compute == 70 || compute == 71; }

double load(const void* p, int type, long long i) {
    switch (type) {
        case R_32F: return ((const float*)p)[i];
        case R_64F: return ((const double*)p)[i];
        case R_16F: return float(((const __half*)p)[i]);
        default: return float(((const __nv_bfloat16*)p)[i]);
    }
}
void store(void* p, int type, long long i, double v) {
    switch (type) {
        case R_32F: ((float*)p)[i] = (float)v; break;
        case R_64F: ((double*)p)[i] = v; break;
        case R_16F: ((__half*)p)[i] = __half((float)v); break;
        default: ((__nv_bfloat16*)p)[i] = __nv_bfloat16((float)v);
    }
}

// C = α op(A) op(B) + β C, column-major; op(A) is m×k, op(B) k×n. β = 0 does not read C.
int gemm(int transa, int transb, int m, int n, int k, double alpha, const void* a, int ta, long long lda, const void* b, int tb,
         long long ldb, double beta, void* c, int tc, long long ldc, bool f64) {
    if (transa > 1 || transb > 1) return CUBLAS_STATUS_NOT_SUPPORTED;  // conjugate transposes: no complex types here
    if (!element_bytes(ta) || !element_bytes(tb) || !element_bytes(tc)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (peak_report()) note_launch("cuBLAS GEMM");
    if (memory_only()) return CUBLAS_STATUS_SUCCESS;
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            double acc64 = 0;
            float acc32 = 0;
            for (int l = 0; l < k; ++l) {
                const double av = load(a, ta, transa ? (long long)i * lda + l : (long long)l * lda + i);
                const double bv = load(b, tb, transb ? (long long)l * ldb + j : (long long)j * ldb + l);
                if (f64) acc64 += av * bv;
                else acc32 = std::fma((float)av, (float)bv, acc32);
            }
            const long long ci = (long long)j * ldc + i;
            const double prod = f64 ? acc64 : (double)acc32;
            double v = f64 ? alpha * prod : (double)((float)alpha * (float)prod);
            if (beta != 0) v = f64 ? v + beta * load(c, tc, ci) : (double)((float)v + (float)beta * (float)load(c, tc, ci));
            store(c, tc, ci, v);
        }
    return CUBLAS_STATUS_SUCCESS;
}

double scalar(const void* p, int compute) {
    // CUBLAS_COMPUTE_16F (64) and its pedantic twin take half scalars, 64F (70, 71) doubles,
    // the 32F family floats.
    if (compute == 64 || compute == 65) return float(*(const __half*)p);
    if (double_compute(compute)) return *(const double*)p;
    return *(const float*)p;
}
}  // namespace

extern "C" {
int cublasCreate_v2(void** h) { *h = fake_handle(4); return CUBLAS_STATUS_SUCCESS; }
int cublasDestroy_v2(void*) { return CUBLAS_STATUS_SUCCESS; }
int cublasSetStream_v2(void*, void*) { return CUBLAS_STATUS_SUCCESS; }
int cublasGetStream_v2(void*, void** s) { *s = fake_handle(1); return CUBLAS_STATUS_SUCCESS; }
int cublasSetMathMode(void*, int) { return CUBLAS_STATUS_SUCCESS; }
int cublasGetMathMode(void*, int* m) { *m = 0; return CUBLAS_STATUS_SUCCESS; }
int cublasSetPointerMode_v2(void*, int mode) { return mode == 0 ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED; }
int cublasGetPointerMode_v2(void*, int* mode) { *mode = 0; return CUBLAS_STATUS_SUCCESS; }
int cublasSetWorkspace_v2(void*, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
int cublasLtCreate(void** h) { *h = fake_handle(5); return CUBLAS_STATUS_SUCCESS; }
int cublasLtDestroy(void*) { return CUBLAS_STATUS_SUCCESS; }

int cublasGemmEx(void*, int transa, int transb, int m, int n, int k, const void* alpha, const void* a, int ta, int lda, const void* b,
                 int tb, int ldb, const void* beta, void* c, int tc, int ldc, int compute, int) {
    return gemm(transa, transb, m, n, k, scalar(alpha, compute), a, ta, lda, b, tb, ldb, scalar(beta, compute), c, tc, ldc,
                double_compute(compute));
}
int cublasGemmStridedBatchedEx(void*, int transa, int transb, int m, int n, int k, const void* alpha, const void* a, int ta, int lda,
                               long long sa, const void* b, int tb, int ldb, long long sb, const void* beta, void* c, int tc, int ldc,
                               long long sc, int batch, int compute, int) {
    for (int i = 0; i < batch; ++i) {
        const int s = gemm(transa, transb, m, n, k, scalar(alpha, compute), (const char*)a + i * sa * element_bytes(ta), ta, lda,
                           (const char*)b + i * sb * element_bytes(tb), tb, ldb, scalar(beta, compute),
                           (char*)c + i * sc * element_bytes(tc), tc, ldc, double_compute(compute));
        if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSgemm_v2(void* h, int transa, int transb, int m, int n, int k, const float* alpha, const float* a, int lda, const float* b,
                   int ldb, const float* beta, float* c, int ldc) {
    return cublasGemmEx(h, transa, transb, m, n, k, alpha, a, R_32F, lda, b, R_32F, ldb, beta, c, R_32F, ldc, 68, 0);
}
int cublasDgemm_v2(void* h, int transa, int transb, int m, int n, int k, const double* alpha, const double* a, int lda, const double* b,
                   int ldb, const double* beta, double* c, int ldc) {
    return cublasGemmEx(h, transa, transb, m, n, k, alpha, a, R_64F, lda, b, R_64F, ldb, beta, c, R_64F, ldc, 70, 0);
}
int cublasSgemmStridedBatched(void* h, int transa, int transb, int m, int n, int k, const float* alpha, const float* a, int lda,
                              long long sa, const float* b, int ldb, long long sb, const float* beta, float* c, int ldc, long long sc,
                              int batch) {
    return cublasGemmStridedBatchedEx(h, transa, transb, m, n, k, alpha, a, R_32F, lda, sa, b, R_32F, ldb, sb, beta, c, R_32F, ldc, sc,
                                      batch, 68, 0);
}
int cublasDgemmStridedBatched(void* h, int transa, int transb, int m, int n, int k, const double* alpha, const double* a, int lda,
                              long long sa, const double* b, int ldb, long long sb, const double* beta, double* c, int ldc, long long sc,
                              int batch) {
    return cublasGemmStridedBatchedEx(h, transa, transb, m, n, k, alpha, a, R_64F, lda, sa, b, R_64F, ldb, sb, beta, c, R_64F, ldc, sc,
                                      batch, 70, 0);
}
int cublasHgemm(void* h, int transa, int transb, int m, int n, int k, const __half* alpha, const __half* a, int lda, const __half* b,
                int ldb, const __half* beta, __half* c, int ldc) {
    return cublasGemmEx(h, transa, transb, m, n, k, alpha, a, R_16F, lda, b, R_16F, ldb, beta, c, R_16F, ldc, 64, 0);
}
int cublasHgemmStridedBatched(void* h, int transa, int transb, int m, int n, int k, const __half* alpha, const __half* a, int lda,
                              long long sa, const __half* b, int ldb, long long sb, const __half* beta, __half* c, int ldc, long long sc,
                              int batch) {
    return cublasGemmStridedBatchedEx(h, transa, transb, m, n, k, alpha, a, R_16F, lda, sa, b, R_16F, ldb, sb, beta, c, R_16F, ldc, sc,
                                      batch, 64, 0);
}

// ---- cuRAND: a seeded host generator (the emulator does not reproduce cuRAND's streams)
struct Generator {
    std::mt19937_64 rng{0};
};
int curandCreateGenerator(void** g, int) { *g = new Generator; return 0; }
int curandDestroyGenerator(void* g) { delete static_cast<Generator*>(g); return 0; }
int curandSetPseudoRandomGeneratorSeed(void* g, unsigned long long seed) { static_cast<Generator*>(g)->rng.seed(seed); return 0; }
int curandSetGeneratorOffset(void*, unsigned long long) { return 0; }
int curandSetStream(void*, void*) { return 0; }
int curandGenerateUniform(void* g, float* out, size_t n) {
    if (memory_only()) return 0;
    std::uniform_real_distribution<float> d(0.f, 1.f);
    for (size_t i = 0; i < n; ++i) out[i] = 1.f - d(static_cast<Generator*>(g)->rng);  // (0, 1], as cuRAND
    return 0;
}
int curandGenerateUniformDouble(void* g, double* out, size_t n) {
    if (memory_only()) return 0;
    std::uniform_real_distribution<double> d(0., 1.);
    for (size_t i = 0; i < n; ++i) out[i] = 1. - d(static_cast<Generator*>(g)->rng);
    return 0;
}
int curandGenerateNormal(void* g, float* out, size_t n, float mean, float std) {
    if (memory_only()) return 0;
    std::normal_distribution<float> d(mean, std);
    for (size_t i = 0; i < n; ++i) out[i] = d(static_cast<Generator*>(g)->rng);
    return 0;
}
int curandGenerateNormalDouble(void* g, double* out, size_t n, double mean, double std) {
    if (memory_only()) return 0;
    std::normal_distribution<double> d(mean, std);
    for (size_t i = 0; i < n; ++i) out[i] = d(static_cast<Generator*>(g)->rng);
    return 0;
}
}  // extern "C"

// ---- the CUDA runtime's registration hooks, which nvcc-compiled host code in candle's
// dependencies calls from static constructors; nothing of that code runs through the emulator
extern "C" {
void** __cudaRegisterFatBinary(void*) {
    static void* handle = nullptr;
    return &handle;
}
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
void __cudaRegisterFunction(void**, const char*, char*, const char*, int, void*, void*, void*, void*, int*) {}
void __cudaRegisterVar(void**, char*, char*, const char*, int, size_t, int, int) {}
}
