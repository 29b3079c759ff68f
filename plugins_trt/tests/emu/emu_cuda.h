/*
 * CPU emulation of the CUDA features that plugins_trt/kernels/rocketSparseVKernel.cu uses, for running the kernels
 * under g++ with -fsanitize=address,undefined (see emu_build.py).
 *
 * Execution model: every CUDA thread of a block is a cooperative fiber (ucontext) on ONE host thread; blocks run one
 * after another. A fiber runs until it reaches a barrier (__syncthreads, a warp collective: shuffle, __syncwarp,
 * a WMMA op) and then hands over to the next runnable fiber, lowest thread index first (or highest first: set
 * rocket_emu::gReverseOrder). So thread 0 always runs as far ahead of the others as the barriers allow, which makes
 * a missing barrier show up deterministically (it reads shared memory that nobody has written yet), and a barrier
 * that some thread never reaches is reported as a deadlock the moment no fiber can run, naming who waits where.
 *
 * Checks besides ASan / UBSan:
 *  - shared memory: one exact-size heap block per __shared__ array and per launch's dynamic size, fresh for every
 *    block and filled with 0xFF bytes (NaN as fp32 / fp16 / bf16) so that reading an unwritten element poisons the
 *    result; static + dynamic <= 48 KiB (the kernels never opt into more);
 *  - warp collectives: full mask and width 32 only, every lane of the warp at the same kind of collective (no
 *    divergence), no collective in a warp with exited lanes;
 *  - __ldg: natural alignment of the loaded type (a uint4 load needs 16 bytes);
 *  - launches: block <= the kernel's __launch_bounds__, 1-D blocks, grid.y <= 65535, non-empty grid.
 * Anything else fails with "EMU FAILURE: ..." and abort(), so that the test driver dies loudly.
 *
 * The kernel source is compiled unchanged except for a mechanical rewrite (emu_source.py): each `<<<...>>>` launch
 * becomes a call of rocket_emu::launch and each __shared__ declaration a reference to rocket_emu's per-block buffer.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ROCKET_EMU_ASAN 1
#else
#define ROCKET_EMU_ASAN 0
#endif

// Device-code keywords: everything is host code here.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace rocket_emu
{

inline std::string gKernelName;  //!< kernel of the launch in progress (for messages)
inline uint3 gBlockIdx;
inline dim3 gBlockDim;
inline dim3 gGridDim;
inline bool gReverseOrder = false;          //!< schedule the highest runnable thread first
inline std::vector<std::string> gLaunchLog;  //!< kernel names, in launch order (the driver clears it)
inline cudaError_t gLastError = cudaSuccess;

struct Fiber;
inline Fiber* gCurrent = nullptr;
[[noreturn]] void fail(char const* fmt, ...);

// ---- Fibers --------------------------------------------------------------------------------------------------------
enum class Wait
{
    kNone,
    kBlock,
    kWarp
};

enum class Collective
{
    kNone,
    kShfl,
    kShflUp,
    kShflXor,
    kSyncWarp,
    kWmmaLoad,
    kWmmaStore,
    kWmmaMma
};

inline char const* collectiveName(Collective c)
{
    switch (c)
    {
    case Collective::kShfl: return "__shfl_sync";
    case Collective::kShflUp: return "__shfl_up_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kSyncWarp: return "__syncwarp";
    case Collective::kWmmaLoad: return "wmma::load_matrix_sync";
    case Collective::kWmmaStore: return "wmma::store_matrix_sync";
    case Collective::kWmmaMma: return "wmma::mma_sync";
    case Collective::kNone: break;
    }
    return "?";
}

struct Fiber
{
    ucontext_t ctx{};
    unsigned char* stack = nullptr;  //!< usable stack (a PROT_NONE guard page lies below it)
    size_t stackSize = 0;
    uint3 tid{};
    int lane = 0;
    int warp = 0;
    bool done = false;
    Wait wait = Wait::kNone;
    uint64_t warpSeq = 0;  //!< warp collectives this lane has entered (selects the exchange slot)
    void* fakeStack = nullptr;
};

struct WarpState
{
    int live = 0;
    int arrived = 0;
    Collective kind = Collective::kNone;
    uint64_t slots[2][32] = {};
    void const* ptrs[2][32] = {};
};

constexpr size_t kStackBytes = size_t{256} << 10;
constexpr size_t kPage = 4096;
constexpr size_t kMaxSharedBytes = 48 << 10;

struct SharedBlock
{
    void* ptr = nullptr;
    size_t bytes = 0;
};

struct BlockState
{
    std::vector<Fiber> fibers;
    std::vector<WarpState> warps;
    int live = 0;
    int blockArrived = 0;
    ucontext_t mainCtx{};
    void* mainFakeStack = nullptr;
    void const* mainStackBottom = nullptr;
    size_t mainStackSize = 0;
    void (*invoke)(void*) = nullptr;
    void* callable = nullptr;
    SharedBlock dynamicShared;
    std::map<int, SharedBlock> staticShared;
    size_t staticBytes = 0;
};

inline BlockState& block()
{
    static BlockState b;
    return b;
}

inline Fiber& current()
{
    if (gCurrent == nullptr)
    {
        fail("a device built-in was used outside of a kernel");
    }
    return *gCurrent;
}

[[noreturn]] inline void fail(char const* fmt, ...)
{
    char msg[1024];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(msg, sizeof(msg), fmt, args);
    va_end(args);
    if (gCurrent != nullptr)
    {
        std::fprintf(stderr, "EMU FAILURE in %s, block (%u,%u), thread %u: %s\n", gKernelName.c_str(), gBlockIdx.x,
            gBlockIdx.y, gCurrent->tid.x, msg);
    }
    else
    {
        std::fprintf(stderr, "EMU FAILURE%s%s: %s\n", gKernelName.empty() ? "" : " in ", gKernelName.c_str(), msg);
    }
    std::fflush(stderr);
    std::abort();
}

//! Fiber -> scheduler. Returns when the scheduler resumes this fiber.
inline void yieldToScheduler()
{
    BlockState& b = block();
    Fiber& f = current();
#if ROCKET_EMU_ASAN
    __sanitizer_start_switch_fiber(f.done ? nullptr : &f.fakeStack, b.mainStackBottom, b.mainStackSize);
#endif
    swapcontext(&f.ctx, &b.mainCtx);
#if ROCKET_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fakeStack, &b.mainStackBottom, &b.mainStackSize);
#endif
}

inline void fiberEntry(int index)
{
    BlockState& b = block();
#if ROCKET_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &b.mainStackBottom, &b.mainStackSize);
#endif
    (void) index;
    b.invoke(b.callable);
    Fiber& f = current();
    f.done = true;
    --b.live;
    WarpState& w = b.warps[f.warp];
    --w.live;
    if (w.arrived > 0)
    {
        fail("thread exited while %d lane(s) of its warp wait at %s", w.arrived, collectiveName(w.kind));
    }
    // An exited thread no longer counts at __syncthreads (as on sm_70+).
    if (b.blockArrived > 0 && b.blockArrived == b.live)
    {
        b.blockArrived = 0;
        for (Fiber& o : b.fibers)
        {
            if (o.wait == Wait::kBlock)
            {
                o.wait = Wait::kNone;
            }
        }
    }
    yieldToScheduler();  // never resumed
    fail("a finished fiber was resumed");
}

//! All live threads of the block at __syncthreads.
inline void blockBarrier()
{
    BlockState& b = block();
    Fiber& f = current();
    if (++b.blockArrived == b.live)
    {
        b.blockArrived = 0;
        for (Fiber& o : b.fibers)
        {
            if (o.wait == Wait::kBlock)
            {
                o.wait = Wait::kNone;
            }
        }
        return;
    }
    f.wait = Wait::kBlock;
    yieldToScheduler();
}

//! Enter a warp collective: every lane must reach the same kind; `ptr` (may be null) must agree across lanes.
inline void warpArrive(Collective kind, unsigned mask, int width, void const* ptr = nullptr)
{
    BlockState& b = block();
    Fiber& f = current();
    if (mask != 0xffffffffu || width != 32)
    {
        fail("%s with mask 0x%08x width %d: the kernels use full warps only", collectiveName(kind), mask, width);
    }
    WarpState& w = b.warps[f.warp];
    if (w.live != 32)
    {
        fail("%s in warp %d with %d live lanes (a lane exited)", collectiveName(kind), f.warp, w.live);
    }
    if (w.arrived == 0)
    {
        w.kind = kind;
    }
    else if (w.kind != kind)
    {
        fail("divergent warp: lane %d at %s while other lanes wait at %s", f.lane, collectiveName(kind),
            collectiveName(w.kind));
    }
    int const slot = static_cast<int>(f.warpSeq & 1u);  // same two-slot scheme as warpExchange
    w.ptrs[slot][f.lane] = ptr;
    ++f.warpSeq;
    if (++w.arrived == w.live)
    {
        w.arrived = 0;
        for (int l = 0; l < 32; ++l)
        {
            Fiber& o = b.fibers[f.warp * 32 + l];
            if (o.wait == Wait::kWarp)
            {
                o.wait = Wait::kNone;
            }
        }
    }
    else
    {
        f.wait = Wait::kWarp;
        yieldToScheduler();
    }
    if (ptr != nullptr || kind >= Collective::kWmmaLoad)
    {
        for (int l = 0; l < 32; ++l)
        {
            if (w.ptrs[slot][l] != ptr)
            {
                fail("%s: lane %d passes %p, lane %d passes %p (must be warp-uniform)", collectiveName(kind), f.lane,
                    ptr, l, w.ptrs[slot][l]);
            }
        }
    }
}

//! Shuffle: deposit `v`, wait for the warp, read lane `src`'s value (own value when src < 0).
template <typename T>
T warpExchange(Collective kind, unsigned mask, int width, T v, int src)
{
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of an unsupported type");
    BlockState& b = block();
    Fiber& f = current();
    int const slot = static_cast<int>(f.warpSeq & 1u);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    WarpState& w = b.warps[f.warp];
    w.slots[slot][f.lane] = bits;
    warpArrive(kind, mask, width);
    if (src < 0)
    {
        return v;
    }
    // Two slots suffice: no lane can enter the next-but-one collective before every lane has read this one.
    T out;
    uint64_t const got = w.slots[slot][src];
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

inline void* allocShared(size_t bytes, size_t align)
{
    void* p = nullptr;
    // Exact size (ASan flags the first byte past it); aligned at least as the hardware aligns shared arrays.
    if (posix_memalign(&p, align < 16 ? 16 : align, bytes == 0 ? 1 : bytes) != 0)
    {
        fail("out of memory for shared memory");
    }
    std::memset(p, 0xFF, bytes == 0 ? 1 : bytes);
    return p;
}

template <typename T>
T* dynamicShared()
{
    return static_cast<T*>(block().dynamicShared.ptr);
}

template <typename Arr, size_t Align>
Arr& staticShared(int site)
{
    BlockState& b = block();
    SharedBlock& s = b.staticShared[site];
    if (s.ptr == nullptr)
    {
        s.bytes = sizeof(Arr);
        s.ptr = allocShared(sizeof(Arr), Align);
        b.staticBytes += sizeof(Arr);
        if (b.staticBytes + b.dynamicShared.bytes > kMaxSharedBytes)
        {
            fail("%zu bytes of static + %zu of dynamic shared memory exceed 48 KiB", b.staticBytes,
                b.dynamicShared.bytes);
        }
    }
    else if (s.bytes != sizeof(Arr))
    {
        fail("__shared__ array at line %d has %zu bytes in one thread and %zu in another", site, sizeof(Arr), s.bytes);
    }
    return *static_cast<Arr*>(s.ptr);
}

struct StackPool
{
    std::vector<unsigned char*> stacks;

    unsigned char* get(size_t i)
    {
        while (stacks.size() <= i)
        {
            void* m = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED)
            {
                fail("cannot map a fiber stack");
            }
            mprotect(m, kPage, PROT_NONE);  // stack overflow -> SIGSEGV, not silent corruption
            stacks.push_back(static_cast<unsigned char*>(m) + kPage);
        }
        return stacks[i];
    }
};

inline StackPool& stackPool()
{
    static StackPool p;
    return p;
}

inline void runBlock()
{
    BlockState& b = block();
    int const n = static_cast<int>(b.fibers.size());
    for (;;)
    {
        bool ran = false;
        for (int k = 0; k < n; ++k)
        {
            Fiber& f = b.fibers[gReverseOrder ? n - 1 - k : k];
            if (f.done || f.wait != Wait::kNone)
            {
                continue;
            }
            ran = true;
            gCurrent = &f;
#if ROCKET_EMU_ASAN
            __sanitizer_start_switch_fiber(&b.mainFakeStack, f.stack, f.stackSize);
#endif
            swapcontext(&b.mainCtx, &f.ctx);
#if ROCKET_EMU_ASAN
            __sanitizer_finish_switch_fiber(b.mainFakeStack, nullptr, nullptr);
#endif
            gCurrent = nullptr;
        }
        if (b.live == 0)
        {
            return;
        }
        if (!ran)
        {
            std::string who;
            for (Fiber const& f : b.fibers)
            {
                if (!f.done && who.size() < 600)
                {
                    who += " t" + std::to_string(f.tid.x) + (f.wait == Wait::kBlock ? ":__syncthreads" : ":warp-op");
                }
            }
            fail("deadlock in block (%u,%u): no thread can run; waiting:%s", gBlockIdx.x, gBlockIdx.y, who.c_str());
        }
    }
}

//! A fresh context for thread `i` on its pooled stack (kept out of launch(): getcontext "returns twice").
[[gnu::noinline]] inline void initFiber(Fiber& f, int i)
{
    f.tid = uint3{static_cast<unsigned>(i), 0, 0};
    f.lane = i & 31;
    f.warp = i / 32;
    f.stack = stackPool().get(static_cast<size_t>(i));
    f.stackSize = kStackBytes;
#if ROCKET_EMU_ASAN
    __asan_unpoison_memory_region(f.stack, f.stackSize);  // frames of the fiber that used it last
#endif
    if (getcontext(&f.ctx) != 0)
    {
        fail("getcontext failed");
    }
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = f.stackSize;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiberEntry), 1, i);
}

template <typename F>
void invokeCallable(void* p)
{
    (*static_cast<F*>(p))();
}

/*
 * kernel<<<grid, block, dynamicSmem, stream>>>(args) == launch("kernel", grid, block, dynamicSmem, stream,
 * [&] { kernel(args); }, launchBoundsThreads): runs every block now (the "stream" is synchronous).
 */
template <typename F>
void launch(char const* name, dim3 grid, dim3 blockDim, size_t dynamicSmem, cudaStream_t, F&& body, int maxThreads)
{
    gLaunchLog.emplace_back(name);
    gKernelName = name;
    if (blockDim.y != 1 || blockDim.z != 1 || blockDim.x == 0 || static_cast<int>(blockDim.x) > maxThreads
        || blockDim.x > 1024 || grid.x == 0 || grid.y == 0 || grid.z != 1 || grid.y > 65535
        || dynamicSmem > kMaxSharedBytes)
    {
        std::fprintf(stderr, "emu: invalid launch of %s: grid (%u,%u,%u) block (%u,%u,%u) (bound %d) smem %zu\n", name,
            grid.x, grid.y, grid.z, blockDim.x, blockDim.y, blockDim.z, maxThreads, dynamicSmem);
        gLastError = cudaErrorInvalidConfiguration;
        return;
    }
    using Fn = typename std::remove_reference<F>::type;
    BlockState& b = block();
    b.invoke = &invokeCallable<Fn>;
    b.callable = const_cast<void*>(static_cast<void const*>(&body));
    gGridDim = grid;
    gBlockDim = blockDim;
    int const threads = static_cast<int>(blockDim.x);
    for (unsigned by = 0; by < grid.y; ++by)
    {
        for (unsigned bx = 0; bx < grid.x; ++bx)
        {
            gBlockIdx = uint3{bx, by, 0};
            b.fibers.assign(threads, Fiber{});
            b.warps.assign((threads + 31) / 32, WarpState{});
            for (int w = 0; w < (threads + 31) / 32; ++w)
            {
                b.warps[w].live = threads - w * 32 < 32 ? threads - w * 32 : 32;
            }
            b.live = threads;
            b.blockArrived = 0;
            b.dynamicShared.bytes = dynamicSmem;
            b.dynamicShared.ptr = dynamicSmem > 0 ? allocShared(dynamicSmem, 16) : nullptr;
            b.staticShared.clear();
            b.staticBytes = 0;
            for (int i = 0; i < threads; ++i)
            {
                initFiber(b.fibers[i], i);
            }
            runBlock();
            std::free(b.dynamicShared.ptr);
            b.dynamicShared = SharedBlock{};
            for (auto& kv : b.staticShared)
            {
                std::free(kv.second.ptr);
            }
            b.staticShared.clear();
        }
    }
    gKernelName.clear();
}

// ---- Emulated devices (compute capability per device id: currentDeviceCC caches per device) --------------------------
inline int gDevice = 0;
inline int const kDeviceCC[] = {90, 75, 61, 80, 89};

} // namespace rocket_emu

// ---- Built-in variables and functions --------------------------------------------------------------------------------
#define threadIdx (::rocket_emu::current().tid)
#define blockIdx (::rocket_emu::gBlockIdx)
#define blockDim (::rocket_emu::gBlockDim)
#define gridDim (::rocket_emu::gGridDim)

inline void __syncthreads()
{
    ::rocket_emu::blockBarrier();
}

inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    ::rocket_emu::warpArrive(::rocket_emu::Collective::kSyncWarp, mask, 32);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int srcLane, int width = 32)
{
    return ::rocket_emu::warpExchange(::rocket_emu::Collective::kShfl, mask, width, v, srcLane & 31);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    int const src = ::rocket_emu::current().lane - static_cast<int>(delta);
    return ::rocket_emu::warpExchange(::rocket_emu::Collective::kShflUp, mask, width, v, src);  // src < 0: own value
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int laneMask, int width = 32)
{
    int const src = (::rocket_emu::current().lane ^ laneMask) & 31;
    return ::rocket_emu::warpExchange(::rocket_emu::Collective::kShflXor, mask, width, v, src);
}

template <typename T>
T __ldg(T const* p)
{
    if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    {
        ::rocket_emu::fail("__ldg of a %zu-byte type at %p: not %zu-byte aligned", sizeof(T), static_cast<void const*>(p),
            alignof(T));
    }
    return *p;
}

inline int __popc(unsigned x)
{
    return __builtin_popcount(x);
}

inline int min(int a, int b)
{
    return a < b ? a : b;
}

inline int atomicAdd(int* p, int v)
{
    int const old = *p;  // one host thread: atomic by construction
    *p = old + v;
    return old;
}

// ---- CUDA runtime entry points the launcher calls ----------------------------------------------------------------------
extern "C" cudaError_t cudaGetLastError(void)
{
    cudaError_t const e = ::rocket_emu::gLastError;
    ::rocket_emu::gLastError = cudaSuccess;
    return e;
}

extern "C" cudaError_t cudaGetDevice(int* device)
{
    *device = ::rocket_emu::gDevice;
    return cudaSuccess;
}

extern "C" cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device)
{
    int const n = static_cast<int>(sizeof(::rocket_emu::kDeviceCC) / sizeof(int));
    if (device < 0 || device >= n)
    {
        return cudaErrorInvalidDevice;
    }
    int const cc = ::rocket_emu::kDeviceCC[device];
    if (attr == cudaDevAttrComputeCapabilityMajor)
        *value = cc / 10;
    else if (attr == cudaDevAttrComputeCapabilityMinor)
        *value = cc % 10;
    else
        return cudaErrorInvalidValue;
    return cudaSuccess;
}

extern "C" char const* cudaGetErrorString(cudaError_t error)
{
    return error == cudaSuccess ? "no error" : "emulated CUDA error";
}
