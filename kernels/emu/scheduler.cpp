// The emulator's execution model: a launch runs its blocks one after another; a block's threads
// are fibers on one OS thread, each with its own stack, switched cooperatively at
// __syncthreads, __syncwarp and warp shuffles. One block at a time makes `static` storage act as
// __shared__ memory, and one fiber at a time makes plain read-modify-writes atomic. A barrier
// that can never complete (some live thread never reaches it) is reported and aborts, instead
// of hanging. The order of blocks and of threads is CUDA_EMU_SCHEDULE's (see `reorder`).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <random>
#include <string>
#include <csignal>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *from, and resumes the context whose stack pointer is `to` (System V
// x86-64).
extern "C" void emu_switch(void** from, void* to);
extern "C" void emu_fiber_start();
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch

    .globl emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_fiber_start, .-emu_fiber_start
)");

namespace emu {
uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {
constexpr size_t STACK_BYTES = 256 * 1024;

struct Barrier {
    int arrived = 0;
    unsigned generation = 0;
};

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;
    uint3 tid{};
    bool done = false;
};

struct Block {
    std::vector<Fiber> fibers;
    void* scheduler_sp = nullptr;
    int current = -1;
    int threads = 0;
    int live = 0;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<int> warp_live;
    std::vector<uint64_t> exchange;
    std::vector<char> shared;
    bool progress = false;
    Thunk thunk = nullptr;
    void** params = nullptr;
    const char* name = "";
} state;

std::unordered_map<std::string, Thunk>& registry() {
    static std::unordered_map<std::string, Thunk> r;
    return r;
}

void yield_to_scheduler() { emu_switch(&state.fibers[state.current].sp, state.scheduler_sp); }

int linear_tid() { return state.current; }

void release_if_complete(Barrier& b, int live) {
    if (b.arrived > 0 && b.arrived >= live) {
        b.arrived = 0;
        ++b.generation;
    }
}

void wait(Barrier& b, int& live) {
    const unsigned generation = b.generation;
    ++b.arrived;
    state.progress = true;
    release_if_complete(b, live);
    while (b.generation == generation) yield_to_scheduler();
}

extern "C" void fiber_main(Block* block) {
    block->thunk(block->params);
    Fiber& me = block->fibers[block->current];
    me.done = true;
    block->progress = true;
    const int warp = block->current / 32;
    --block->live;
    --block->warp_live[warp];
    release_if_complete(block->block_barrier, block->live);
    release_if_complete(block->warp_barriers[warp], block->warp_live[warp]);
    emu_switch(&me.sp, block->scheduler_sp);
    std::abort();  // a finished fiber is never resumed
}

void prepare_fiber(Fiber& f) {
    if (!f.stack) {
        void* m = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "cuda-emu: cannot map a fiber stack\n");
            std::abort();
        }
        f.stack = static_cast<char*>(m);
        mprotect(f.stack, 4096, PROT_NONE);  // a kernel that overflows its stack faults
    }
    // The frame emu_switch pops: MXCSR + x87 word, r15, r14, r13, r12, rbx, rbp, return address.
    uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + STACK_BYTES);
    top -= 2;  // keeps emu_fiber_start's call 16-byte aligned
    *--top = reinterpret_cast<uint64_t>(&emu_fiber_start);
    *--top = 0;                                           // rbp
    *--top = 0;                                           // rbx
    *--top = reinterpret_cast<uint64_t>(&state);          // r12: fiber_main's argument
    *--top = reinterpret_cast<uint64_t>(&fiber_main);     // r13
    *--top = 0;                                           // r14
    *--top = 0;                                           // r15
    uint32_t control[2];
    asm volatile("stmxcsr %0" : "=m"(control[0]));
    asm volatile("fnstcw %0" : "=m"(control[1]));
    control[1] &= 0xffff;
    *--top = (uint64_t)control[0] | ((uint64_t)control[1] << 32);
    f.sp = top;
    f.done = false;
}
}  // namespace

// A fault inside a kernel (a read or write past the end of a device buffer, or a stack
// overflow) is reported with where it happened, then the process aborts as a GPU's context would.
extern "C" void report_fault(int, siginfo_t* info, void*) {
    char msg[512];
    int n = state.current >= 0
                ? std::snprintf(msg, sizeof msg,
                                "cuda-emu: %s accessed %p, outside every buffer (past the end of one?), in block (%u, %u, %u) thread (%u, %u, %u)\n",
                                state.name, info->si_addr, block_idx.x, block_idx.y, block_idx.z, thread_idx.x, thread_idx.y, thread_idx.z)
                : std::snprintf(msg, sizeof msg, "cuda-emu: a memory fault at %p outside any kernel\n", info->si_addr);
    if (write(2, msg, n) < 0) {}
    std::signal(SIGABRT, SIG_DFL);
    std::abort();
}

namespace {
struct FaultReporter {
    FaultReporter() {
        static char alternate[64 * 1024];  // the handler's own stack: a fiber's may be what overflowed
        stack_t ss{};
        ss.ss_sp = alternate;
        ss.ss_size = sizeof alternate;
        sigaltstack(&ss, nullptr);
        struct sigaction sa{};
        sa.sa_sigaction = report_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    }
} fault_reporter;
}  // namespace

void register_kernel(const char* name, Thunk thunk) { registry()[name] = thunk; }

Thunk find_kernel(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : it->second;
}

void sync_block() { wait(state.block_barrier, state.live); }

void sync_warp() {
    const int w = linear_tid() / 32;
    wait(state.warp_barriers[w], state.warp_live[w]);
}

uint64_t exchange_xor(uint64_t bits, int lane_mask, int width) {
    const int me = linear_tid(), lane = me % 32, base = me - lane;
    state.exchange[me] = bits;
    sync_warp();
    int src = lane ^ lane_mask;
    if (width <= 0 || width > 32) width = 32;
    if (src / width != lane / width) src = lane;
    const int n = state.threads;
    const uint64_t got = (src < 32 && base + src < n && !state.fibers[base + src].done) ? state.exchange[base + src] : bits;
    sync_warp();
    return got;
}

void* dynamic_shared() { return state.shared.data(); }

namespace {
// CUDA_EMU_SCHEDULE: the order in which a launch runs its blocks, and a block its threads between
// two barriers: `forward` (the default), `reverse`, or `shuffle` (a new permutation each time,
// seeded by CUDA_EMU_SEED). A kernel whose threads read what another thread writes without a
// barrier between (or whose blocks depend on one another) gives different results in different
// orders, so running the self-test in more than one order finds such races.
enum class Schedule { Forward, Reverse, Shuffle };
Schedule schedule() {
    static const Schedule s = [] {
        const char* v = std::getenv("CUDA_EMU_SCHEDULE");
        if (!v || !std::strcmp(v, "forward")) return Schedule::Forward;
        if (!std::strcmp(v, "reverse")) return Schedule::Reverse;
        if (!std::strcmp(v, "shuffle")) return Schedule::Shuffle;
        std::fprintf(stderr, "cuda-emu: CUDA_EMU_SCHEDULE=%s is not forward, reverse or shuffle\n", v);
        std::abort();
    }();
    return s;
}
std::mt19937_64& shuffle_rng() {
    static std::mt19937_64 rng([] {
        const char* v = std::getenv("CUDA_EMU_SEED");
        return v ? std::strtoull(v, nullptr, 10) : 0ull;
    }());
    return rng;
}
template <typename T> void reorder(std::vector<T>& order, size_t n) {
    for (size_t i = 0; i < n; ++i) order[i] = (T)i;
    if (schedule() == Schedule::Reverse) std::reverse(order.begin(), order.end());
    if (schedule() == Schedule::Shuffle) std::shuffle(order.begin(), order.end(), shuffle_rng());
}
}  // namespace

// Runs `thunk` over the grid; returns false (after printing why) on a deadlock. The driver has
// checked the launch against the GPU's limits (1 to 1024 threads a block).
bool launch(const char* name, Thunk thunk, dim3 grid, dim3 block, unsigned shared_bytes, void** params) {
    const int n = (int)(block.x * block.y * block.z);
    // Fibers (and their stacks) are kept from launch to launch; a launch uses the first n.
    if ((int)state.fibers.size() < n) state.fibers.resize(n);
    state.threads = n;
    state.exchange.assign(n, 0);
    // Dynamic shared memory starts as NaN (0xff bytes), as device buffers do: a kernel that
    // reads what no thread wrote sees it.
    state.shared.assign(shared_bytes + 16, (char)0xff);
    state.thunk = thunk;
    state.params = params;
    state.name = name;
    block_dim = block;
    grid_dim = grid;
    const int warps = (n + 31) / 32;
    std::vector<int> order(n);
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    std::vector<unsigned long long> block_order(blocks);
    reorder(block_order, blocks);
    for (unsigned long long b : block_order) {
        const unsigned bx = b % grid.x, by = (b / grid.x) % grid.y, bz = b / ((unsigned long long)grid.x * grid.y);
        block_idx = uint3{bx, by, bz};
        state.live = n;
        state.block_barrier = Barrier{};
        state.warp_barriers.assign(warps, Barrier{});
        state.warp_live.assign(warps, 32);
        if (n % 32) state.warp_live[warps - 1] = n % 32;
        for (int t = 0; t < n; ++t) {
            Fiber& f = state.fibers[t];
            prepare_fiber(f);
            f.tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        }
        while (state.live > 0) {
            state.progress = false;
            reorder(order, n);
            for (int t : order) {
                if (state.fibers[t].done) continue;
                state.current = t;
                thread_idx = state.fibers[t].tid;
                emu_switch(&state.scheduler_sp, state.fibers[t].sp);
            }
            if (!state.progress && state.live > 0) {
                std::fprintf(stderr, "cuda-emu: %s deadlocked in block (%u, %u, %u): %d threads wait at a barrier others never reach\n",
                             name, bx, by, bz, state.live);
                return false;
            }
        }
    }
    state.current = -1;
    return true;
}
}  // namespace emu
