/*
 * CPU test driver of the sparse V kernels (plugins_trt/kernels/rocketSparseVKernel.cu) under emulation (emu_cuda.h).
 *
 * Every case goes through the public entry point rocketSparseVMatMul exactly as the plugin / torch extension call
 * it, with exact-size host buffers (ASan sees every byte past an input or output), y pre-filled with NaN bytes (an
 * output the kernels forget stays NaN), and compares y with a float64 reference computed from the same quantized
 * inputs: y[m, j] = scale[j] * sum over the rows i that column j keeps of t[m, i] * value. Finite results must be
 * within the dtype's rounding (fp32 accumulation bound), non-finite ones must match the reference exactly (nan /
 * +inf / -inf). The kernels that ran are checked against the path the case must take (decode, expand + GEMM +
 * fix-up, fallbacks). Groups:
 *
 *   helpers   per-lane index helpers against brute force; shared-memory bank conflicts of the GEMM tiles and the
 *             WMMA epilogue; coverage of the tile / epilogue mappings
 *   decode    decode kernel over odd shapes, all 9 activation x value types (rank 1, k = 1, d_out = 1, several
 *             slices, chunks of 16 rows)
 *   prefill   expand + WMMA (fp16 / bf16) or SIMT (fp32) GEMM, odd shapes and both tile heights, dense V in place
 *   edge      misaligned pointers, stray padding bits, no mask for a dense V, reverse thread order, the auto path
 *   nonfinite inf / nan in t: unkept rows never reach a column, kept ones propagate, on both paths
 *   fallback  no / small / misaligned workspace and devices without tensor cores: decode kernel, logged once
 *   all       every group (fallback first: its messages are once per process)
 *
 * Prints one line per case and "ALL PASSED" at the end; exit status 1 on a mismatch (an emulation or sanitizer error
 * aborts earlier).
 */
#include "emu_cuda.h"

#define __CUDA_ARCH__ 900  // device-side code paths as compiled for sm_90 (the host side asks cudaDeviceGetAttribute)
#include ROCKET_EMU_KERNEL_INC
#undef __CUDA_ARCH__

#include <algorithm>
#include <chrono>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace
{

int gFailures = 0;
int gCases = 0;

#define EXPECT(cond, ...)                                                                                              \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                                                \
            std::printf(__VA_ARGS__);                                                                                  \
            std::printf("\n");                                                                                         \
        }                                                                                                              \
    } while (0)

char const* kActName[] = {"fp32", "fp16", "bf16"};
char const* kValName[] = {"same", "int8", "fp8"};

size_t actBytesOf(int act)
{
    return act == kROCKET_ACT_FP32 ? 4 : 2;
}

double loadAct(unsigned char const* p, size_t i, int act)
{
    if (act == kROCKET_ACT_FP32)
        return reinterpret_cast<float const*>(p)[i];
    if (act == kROCKET_ACT_FP16)
        return __half2float(reinterpret_cast<__half const*>(p)[i]);
    return __bfloat162float(reinterpret_cast<__nv_bfloat16 const*>(p)[i]);
}

void storeAct(unsigned char* p, size_t i, int act, float v)
{
    if (act == kROCKET_ACT_FP32)
        reinterpret_cast<float*>(p)[i] = v;
    else if (act == kROCKET_ACT_FP16)
        reinterpret_cast<__half*>(p)[i] = __float2half_rn(v);
    else
        reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

//! fp8 e4m3 "fn" (bias 7, no inf, S.1111.111 = nan), decoded independently of cuda_fp8.h.
double fp8ToDouble(uint8_t b)
{
    int const e = (b >> 3) & 15, m = b & 7;
    double const mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, e - 10);
    return (b & 0x80) ? -mag : mag;
}

//! Exact-size host allocation at `offset` bytes from a malloc'ed base (misaligned pointers on request).
struct HostBuf
{
    unsigned char* base = nullptr;
    unsigned char* p = nullptr;
    size_t bytes = 0;
    HostBuf(size_t n, size_t offset, unsigned char fill)
        : bytes(n)
    {
        base = static_cast<unsigned char*>(std::malloc(n + offset + (n + offset == 0 ? 1 : 0)));
        std::memset(base, fill, n + offset);
        p = base + offset;
    }
    ~HostBuf()
    {
        std::free(base);
    }
    HostBuf(HostBuf const&) = delete;
    HostBuf& operator=(HostBuf const&) = delete;
};

enum class Ws
{
    kExact,
    kNone,
    kSmall,
    kMisaligned
};

struct Case
{
    int rank, keep, dout;
    int64_t rows;
    int act, vt, path;
    int device = 0;  // index into rocket_emu::kDeviceCC (0: sm_90)
    size_t tOff = 0, maskOff = 0, valOff = 0, yOff = 0;  // elements (bytes for the mask)
    Ws ws = Ws::kExact;
    bool stray = false;     // set the padding bits past rank in the last mask byte
    bool nullMask = false;  // keep == rank: pass no mask
    int nonFinite = 0;      // 0 none; 1 a few rows get inf / -inf / nan; 2 every row gets one inf
    bool reverse = false;   // schedule the highest thread first
};

std::string describe(Case const& c)
{
    char buf[256];
    std::snprintf(buf, sizeof(buf), "%s/%s r=%d k=%d d=%d rows=%lld path=%d cc=%d%s%s%s%s%s%s%s", kActName[c.act],
        kValName[c.vt], c.rank, c.keep, c.dout, static_cast<long long>(c.rows), c.path,
        rocket_emu::kDeviceCC[c.device], c.tOff || c.maskOff || c.valOff || c.yOff ? " misaligned" : "",
        c.ws == Ws::kNone ? " no-ws" : c.ws == Ws::kSmall ? " small-ws" : c.ws == Ws::kMisaligned ? " misaligned-ws" : "",
        c.stray ? " stray-bits" : "", c.nullMask ? " no-mask" : "", c.nonFinite == 1 ? " inf/nan" : "",
        c.nonFinite == 2 ? " inf-every-row" : "", c.reverse ? " reverse-order" : "");
    return buf;
}

//! The kernels the launcher must run for this case.
std::vector<std::string> expectedKernels(Case const& c)
{
    int const cc = rocket_emu::kDeviceCC[c.device];
    bool const wantPrefill = c.path == kROCKET_PATH_PREFILL || (c.path == kROCKET_PATH_AUTO && c.rows > 16);
    bool const expand = !(c.keep == c.rank && c.vt == kROCKET_VALUES_SAME);
    bool const wsOk = !expand || c.ws == Ws::kExact;
    bool const tc = c.act == kROCKET_ACT_FP32 || (c.act == kROCKET_ACT_BF16 ? cc >= 80 : cc >= 70);
    std::vector<std::string> k;
    if (c.rows == 0)
        return k;
    if (wantPrefill && wsOk && tc)
    {
        if (expand)
            k.emplace_back("expandVKernel");
        k.emplace_back(c.act == kROCKET_ACT_FP32 ? "gemmSimtF32Kernel" : "gemmWmmaKernel");
        if (c.keep < c.rank)
            k.emplace_back("sparseVFixupKernel");
    }
    else
    {
        for (int64_t r = 0; r < c.rows; r += 16)
            k.emplace_back("sparseVDecodeKernel");
    }
    return k;
}

std::string join(std::vector<std::string> const& v)
{
    std::string s;
    for (auto const& x : v)
        s += (s.empty() ? "" : "+") + x;
    return s.empty() ? "(none)" : s;
}

void runCase(Case const& c, uint64_t seed)
{
    ++gCases;
    rocket_emu::gDevice = c.device;
    rocket_emu::gReverseOrder = c.reverse;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    int const maskBytes = (c.rank + 7) / 8;
    size_t const ab = actBytesOf(c.act);
    size_t const vb = c.vt == kROCKET_VALUES_SAME ? ab : 1;

    // Mask: exactly `keep` rows per column, LSB first (sparse_format.pack_bits); kept rows in increasing order.
    HostBuf mask(static_cast<size_t>(c.dout) * maskBytes, c.maskOff, 0);
    std::vector<std::vector<int>> kept(c.dout);
    std::vector<int> perm(c.rank);
    for (int j = 0; j < c.dout; ++j)
    {
        for (int i = 0; i < c.rank; ++i)
            perm[i] = i;
        for (int q = 0; q < c.keep; ++q)
            std::swap(perm[q], perm[q + static_cast<int>(rng() % static_cast<uint64_t>(c.rank - q))]);
        kept[j].assign(perm.begin(), perm.begin() + c.keep);
        std::sort(kept[j].begin(), kept[j].end());
        for (int i : kept[j])
            mask.p[static_cast<size_t>(j) * maskBytes + i / 8] |= static_cast<uint8_t>(1u << (i % 8));
        if (c.stray && c.rank % 8 != 0)
            mask.p[static_cast<size_t>(j) * maskBytes + maskBytes - 1] |= static_cast<uint8_t>(0xFFu << (c.rank % 8));
    }

    // Values (+ scales): the reference uses exactly the stored codes.
    HostBuf values(static_cast<size_t>(c.dout) * c.keep * vb, c.valOff * vb, 0);
    std::vector<double> value(static_cast<size_t>(c.dout) * c.keep);
    std::vector<float> scales(c.dout, 1.f);
    for (int j = 0; j < c.dout; ++j)
    {
        if (c.vt != kROCKET_VALUES_SAME)
            scales[j] = (0.5f + static_cast<float>(rng() % 1000) / 1000.f) / (c.vt == kROCKET_VALUES_INT8 ? 127.f : 448.f);
        for (int q = 0; q < c.keep; ++q)
        {
            size_t const e = static_cast<size_t>(j) * c.keep + q;
            if (c.vt == kROCKET_VALUES_SAME)
            {
                storeAct(values.p, e, c.act, normal(rng));
                value[e] = loadAct(values.p, e, c.act);
            }
            else if (c.vt == kROCKET_VALUES_INT8)
            {
                int8_t const v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
                values.p[e] = static_cast<uint8_t>(v);
                value[e] = v;
            }
            else
            {
                uint8_t b;
                do
                    b = static_cast<uint8_t>(rng());
                while ((b & 0x7F) == 0x7F);  // nan codes
                values.p[e] = b;
                value[e] = fp8ToDouble(b);
            }
        }
    }
    HostBuf scl(static_cast<size_t>(c.dout) * 4, 0, 0);
    std::memcpy(scl.p, scales.data(), scl.bytes);

    HostBuf t(static_cast<size_t>(c.rows) * c.rank * ab, c.tOff * ab, 0);
    for (size_t e = 0; e < static_cast<size_t>(c.rows) * c.rank; ++e)
        storeAct(t.p, e, c.act, normal(rng));
    if (c.nonFinite != 0 && c.rows > 0)
    {
        float const inf = std::numeric_limits<float>::infinity();
        auto put = [&](int64_t m, int i, float v) { storeAct(t.p, static_cast<size_t>(m) * c.rank + i, c.act, v); };
        if (c.nonFinite == 2)
        {
            for (int64_t m = 0; m < c.rows; ++m)
                put(m, static_cast<int>(rng() % c.rank), (m & 1) ? -inf : inf);
        }
        else
        {
            put(0, static_cast<int>(rng() % c.rank), inf);
            put(c.rows / 2, static_cast<int>(rng() % c.rank), -inf);
            put(c.rows / 2, static_cast<int>(rng() % c.rank), inf);  // same row: inf - inf where both are kept
            put(c.rows - 1, static_cast<int>(rng() % c.rank), std::numeric_limits<float>::quiet_NaN());
        }
    }
    HostBuf y(static_cast<size_t>(c.rows) * c.dout * ab, c.yOff * ab, 0xFF);

    size_t const need = rocketSparseVWorkspaceSize(c.rows, c.rank, c.keep, c.dout, c.act, c.vt, c.path);
    void* wsBase = nullptr;
    size_t wsBytes = 0;
    unsigned char* ws = nullptr;
    if (c.ws != Ws::kNone && need > 0)
    {
        size_t const extra = c.ws == Ws::kMisaligned ? 16 : 0;
        wsBytes = c.ws == Ws::kSmall ? need - 1 : need;
        if (posix_memalign(&wsBase, 256, wsBytes + extra) != 0)
            rocket_emu::fail("out of memory");
        std::memset(wsBase, 0xFF, wsBytes + extra);
        ws = static_cast<unsigned char*>(wsBase) + extra;
    }

    rocket_emu::gLaunchLog.clear();
    auto const t0 = std::chrono::steady_clock::now();
    int const status = rocketSparseVMatMul(t.p, values.p, c.nullMask ? nullptr : mask.p,
        c.vt == kROCKET_VALUES_SAME ? nullptr : reinterpret_cast<float const*>(scl.p), y.p, c.rows, c.rank, c.keep,
        c.dout, c.act, c.vt, ws, wsBytes, c.path, nullptr);
    double const secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::free(wsBase);

    std::string const name = describe(c);
    EXPECT(status == 0, "%s: status %d (%s)", name.c_str(), status, rocketSparseVStatusString(status));
    std::vector<std::string> const want = expectedKernels(c);
    EXPECT(rocket_emu::gLaunchLog == want, "%s: ran %s, expected %s", name.c_str(), join(rocket_emu::gLaunchLog).c_str(),
        join(want).c_str());

    // Reference and comparison.
    double const u = c.act == kROCKET_ACT_FP32 ? 0x1p-24 : c.act == kROCKET_ACT_FP16 ? 0x1p-11 : 0x1p-8;
    double const floor = c.act == kROCKET_ACT_FP16 ? 0x1p-24 : 1e-37;  // fp16 subnormal spacing
    double worst = 0;
    int bad = 0;
    for (int64_t m = 0; m < c.rows; ++m)
    {
        for (int j = 0; j < c.dout; ++j)
        {
            double ref = 0, absSum = 0;
            for (int q = 0; q < c.keep; ++q)
            {
                double const term = loadAct(t.p, static_cast<size_t>(m) * c.rank + kept[j][q], c.act)
                    * value[static_cast<size_t>(j) * c.keep + q];
                ref += term;
                absSum += std::fabs(term);
            }
            ref *= scales[j];
            absSum *= std::fabs(scales[j]);
            double const got = loadAct(y.p, static_cast<size_t>(m) * c.dout + j, c.act);
            bool ok;
            if (!std::isfinite(ref))
            {
                ok = std::isnan(ref) ? std::isnan(got) : got == ref;
            }
            else
            {
                double const bound = 2 * u * std::fabs(ref) + (c.keep + 8) * 0x1p-23 * absSum + floor;
                double const err = std::fabs(got - ref);
                ok = err <= bound;  // false for a nan
                if (ok)
                    worst = std::max(worst, err / bound);
            }
            if (!ok && ++bad <= 5)
            {
                std::printf("  y[%lld, %d] = %.9g, reference %.9g\n", static_cast<long long>(m), j, got, ref);
            }
        }
    }
    EXPECT(bad == 0, "%s: %d wrong outputs", name.c_str(), bad);
    std::printf("%s %-90s err/bound %.3f  %.2fs\n", bad == 0 ? "ok  " : "FAIL", name.c_str(), worst, secs);
    std::fflush(stdout);
}

// ---- helpers: per-lane math and shared-memory banks -----------------------------------------------------------------
//! Bank-conflict degree of one warp-wide shared-memory access: lane byte addresses (-1: inactive) of `bytes` each.
//! 4-byte accesses are served per 32 lanes, 8-byte per 16, 16-byte per 8; the degree is the largest number of
//! distinct 4-byte words that fall in one of the 32 banks within one phase (1: conflict-free).
int conflictWays(std::vector<int64_t> const& addr, int bytes)
{
    int const perPhase = 32 / std::max(1, bytes / 4);
    int ways = 1;
    for (int p0 = 0; p0 < 32; p0 += perPhase)
    {
        std::set<int64_t> words[32];
        for (int l = p0; l < p0 + perPhase; ++l)
        {
            if (addr[l] < 0)
                continue;
            for (int64_t w = addr[l] / 4; w < (addr[l] + bytes + 3) / 4; ++w)
                words[w % 32].insert(w);
        }
        for (auto const& s : words)
            ways = std::max(ways, static_cast<int>(s.size()));
    }
    return ways;
}

void testHelpers()
{
    using namespace rocket;
    std::mt19937 rng(1);
    // Mask word bits below rank.
    for (int rank = 1; rank <= 100; ++rank)
        for (int word = 0; word < 5; ++word)
        {
            uint32_t want = 0;
            for (int b = 0; b < 32; ++b)
                if (word * 32 + b < rank)
                    want |= 1u << b;
            EXPECT(maskWordValidBits(rank, word) == want, "maskWordValidBits(%d, %d)", rank, word);
        }
    // Packed index = prefix + set bits below the lane.
    for (int n = 0; n < 2000; ++n)
    {
        uint32_t const word = static_cast<uint32_t>(rng()) & static_cast<uint32_t>(rng());
        int const lane = static_cast<int>(rng() % 32), pre = static_cast<int>(rng() % 1000);
        int below = 0;
        for (int b = 0; b < lane; ++b)
            below += (word >> b) & 1u;
        EXPECT(packedIndex(pre, word, lane) == pre + below, "packedIndex(%d, 0x%08x, %d)", pre, word, lane);
        EXPECT(lanesBelowMask(lane) == (lane == 0 ? 0u : (0xffffffffu >> (32 - lane))), "lanesBelowMask(%d)", lane);
    }
    // Tile mappings are bijections onto their tiles.
    auto checkTile = [&](int rows, bool vec) {
        int const per = vec ? 8 : 1;
        std::set<std::pair<int, int>> seen;
        for (int v = 0; v < rows * kGemmBK / per; ++v)
        {
            int2 const rk = vec ? tileCoord<true>(v) : tileCoord<false>(v);
            EXPECT(rk.x >= 0 && rk.x < rows && rk.y >= 0 && rk.y + per <= kGemmBK && rk.y % per == 0,
                "tileCoord<%d>(%d) = (%d, %d) for %d rows", vec, v, rk.x, rk.y, rows);
            seen.insert({rk.x, rk.y});
        }
        EXPECT(static_cast<int>(seen.size()) == rows * kGemmBK / per, "tileCoord<%d> not one-to-one (%d rows)", vec, rows);
    };
    for (int rows : {64, 128})
    {
        checkTile(rows, true);
        checkTile(rows, false);
    }
    {
        std::set<std::pair<int, int>> seen;
        for (int e = 0; e < kSimtTile * kSimtBK; ++e)
        {
            int2 const rk = simtTileCoord(e);
            EXPECT(rk.x >= 0 && rk.x < kSimtTile && rk.y >= 0 && rk.y < kSimtBK, "simtTileCoord(%d)", e);
            seen.insert({rk.x, rk.y});
        }
        EXPECT(static_cast<int>(seen.size()) == kSimtTile * kSimtBK, "simtTileCoord not one-to-one");
    }
    {
        std::set<std::pair<int, int>> seen;
        for (int step = 0; step < 8; ++step)
            for (int lane = 0; lane < 32; ++lane)
                seen.insert({epilogueRow(step, lane), epilogueCol(lane)});
        EXPECT(seen.size() == 256 && seen.begin()->first == 0 && seen.rbegin()->first == 15,
            "the epilogue steps must cover the 16 x 16 tile once");
    }

    // Bank conflicts, warp by warp.
    std::vector<int64_t> addr(32);
    int worstTileVec = 1, worstTileScalar = 1, worstEpilogue = 1, worstAccStore = 1, worstFragLoad = 1;
    int worstSimtStore = 1, worstSimtRead = 1;
    for (int rows : {64, 128})
    {
        for (int v0 = 0; v0 < rows * kGemmBK / 8; v0 += 32)
        {
            for (int l = 0; l < 32; ++l)
            {
                int2 const rk = tileCoord<true>(v0 + l);
                addr[l] = (static_cast<int64_t>(rk.x) * kGemmSmemLd + rk.y) * 2;
            }
            worstTileVec = std::max(worstTileVec, conflictWays(addr, 16));
        }
        for (int v0 = 0; v0 < rows * kGemmBK; v0 += 32)
        {
            for (int l = 0; l < 32; ++l)
            {
                int2 const rk = tileCoord<false>(v0 + l);
                addr[l] = (static_cast<int64_t>(rk.x) * kGemmSmemLd + rk.y) * 2;
            }
            worstTileScalar = std::max(worstTileScalar, conflictWays(addr, 2));
        }
    }
    // wmma::load_matrix_sync reads 8 rows x 16 bytes per phase (ldmatrix) from the kGemmSmemLd-pitch tiles.
    for (int r0 = 0; r0 < 16; r0 += 8)
        for (int c0 = 0; c0 < 16; c0 += 8)
        {
            for (int l = 0; l < 32; ++l)
                addr[l] = l < 8 ? (static_cast<int64_t>(r0 + l) * kGemmSmemLd + c0) * 2 : -1;
            worstFragLoad = std::max(worstFragLoad, conflictWays(addr, 16));
        }
    bool contiguous = true;
    for (int step = 0; step < 8; ++step)
    {
        for (int l = 0; l < 32; ++l)
            addr[l] = (static_cast<int64_t>(epilogueRow(step, l)) * kStageLd + epilogueCol(l)) * 4;
        worstEpilogue = std::max(worstEpilogue, conflictWays(addr, 4));
        for (int h = 0; h < 2; ++h)  // each half-warp: one row of C, 16 consecutive columns
            for (int l = 16 * h + 1; l < 16 * h + 16; ++l)
                contiguous = contiguous && epilogueRow(step, l) == epilogueRow(step, 16 * h)
                    && epilogueCol(l) == epilogueCol(l - 1) + 1;
    }
    // store_matrix_sync of the accumulator, as 8-byte (2 x fp32) stores of the sm_80 mma layout, at kStageLd.
    for (int part = 0; part < 4; ++part)
    {
        for (int l = 0; l < 32; ++l)
            addr[l] = (static_cast<int64_t>(l / 4 + 8 * (part & 1)) * kStageLd + 2 * (l % 4) + 8 * (part >> 1)) * 4;
        worstAccStore = std::max(worstAccStore, conflictWays(addr, 8));
    }
    for (int e0 = 0; e0 < kSimtTile * kSimtBK; e0 += 32)
    {
        for (int l = 0; l < 32; ++l)
        {
            int2 const rk = simtTileCoord(e0 + l);
            addr[l] = (static_cast<int64_t>(rk.y) * kSimtLd + rk.x) * 4;
        }
        worstSimtStore = std::max(worstSimtStore, conflictWays(addr, 4));
    }
    for (int warp = 0; warp < 8; ++warp)
        for (int kk = 0; kk < kSimtBK; ++kk)
        {
            for (int l = 0; l < 32; ++l)
                addr[l] = (static_cast<int64_t>(kk) * kSimtLd + ((warp * 32 + l) % 16) * 4) * 4;  // Bs[kk][tx * 4]
            worstSimtRead = std::max(worstSimtRead, conflictWays(addr, 16));
            for (int l = 0; l < 32; ++l)
                addr[l] = (static_cast<int64_t>(kk) * kSimtLd + ((warp * 32 + l) / 16) * 4) * 4;  // As[kk][ty * 4]
            worstSimtRead = std::max(worstSimtRead, conflictWays(addr, 16));
        }
    std::printf("bank conflicts (ways, 1 = none): GEMM tile store vec %d scalar %d, fragment load %d, accumulator "
                "store %d, epilogue read %d; SIMT tile store %d, float4 read %d; epilogue rows contiguous: %s\n",
        worstTileVec, worstTileScalar, worstFragLoad, worstAccStore, worstEpilogue, worstSimtStore, worstSimtRead,
        contiguous ? "yes" : "no");
    EXPECT(worstTileVec == 1 && worstTileScalar == 1 && worstFragLoad == 1, "GEMM tile shared-memory conflicts");
    EXPECT(worstAccStore == 1 && worstEpilogue == 1 && contiguous, "WMMA epilogue conflicts / non-contiguous rows");
    EXPECT(worstSimtStore == 1 && worstSimtRead == 1, "SIMT GEMM shared-memory conflicts");
    // The sizes the launcher reports.
    EXPECT(rocketSparseVWorkspaceSize(100, 64, 64, 10, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO) == 0, "dense in place");
    EXPECT(rocketSparseVWorkspaceSize(100, 60, 20, 10, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO) == 1280 + 512,
        "expanded V (10 x 64 fp16 = 1280 B) + list of 101 ints (-> 512 B)");
    EXPECT(rocketSparseVWorkspaceSize(100, 60, 60, 10, kROCKET_ACT_FP32, 1, kROCKET_PATH_AUTO) == 2560,
        "keep == rank: no list");
    ++gCases;
}

// ---- case groups ------------------------------------------------------------------------------------------------------
struct Shape
{
    int rank, keep, dout;
    int64_t rows;
};

void decodeGroup()
{
    // rank 1 / k 1 / d_out 1, byte and word tails, several slices (1024 rows of t per slice up to 8 rows, 512 above),
    // every MAXR (1, 2, 4, 8, 16) and chunking past 16 rows, dense V.
    Shape const shapes[] = {{1, 1, 1, 1}, {7, 3, 5, 2}, {8, 8, 9, 3}, {33, 1, 40, 4}, {100, 37, 77, 5},
        {100, 100, 17, 16}, {257, 100, 33, 8}, {1100, 367, 6, 9}, {1100, 550, 6, 1}, {64, 21, 70, 17},
        {2100, 700, 5, 12}};
    uint64_t seed = 100;
    int n = 0;
    for (Shape const& s : shapes)
    {
        // All 9 type combinations on the small shapes, three rotating ones on the larger.
        int const combos = s.rank * s.dout * s.rows <= 2000 ? 9 : 3;
        for (int q = 0; q < combos; ++q)
        {
            int const combo = (q + n) % 9;
            runCase({s.rank, s.keep, s.dout, s.rows, combo / 3, combo % 3, kROCKET_PATH_DECODE}, seed++);
        }
        n += 4;
    }
}

void prefillGroup()
{
    // Rows > 16 or forced: scalar / vector A (rank % 8, alignment), the 64- and 128-row tiles (M <= 64 / > 64), two
    // column tiles (d_out > 128), ragged K tiles, d_out 1, rank 1, dense V in place (odd ldb: scalar B).
    Shape const shapes[] = {{8, 1, 130, 40}, {100, 37, 77, 17}, {104, 52, 130, 130}, {33, 33, 5, 20},
        {1, 1, 1, 17}, {64, 21, 1, 70}, {48, 48, 40, 5}, {264, 90, 140, 150}};
    uint64_t seed = 200;
    int n = 0;
    for (Shape const& s : shapes)
    {
        int const combos = s.rank * s.dout * s.rows <= 8000 ? 9 : 3;
        for (int q = 0; q < combos; ++q)
        {
            int const combo = (q + n) % 9;
            runCase({s.rank, s.keep, s.dout, s.rows, combo / 3, combo % 3, kROCKET_PATH_PREFILL}, seed++);
        }
        n += 4;
    }
}

void edgeGroup()
{
    uint64_t seed = 300;
    for (int path : {kROCKET_PATH_DECODE, kROCKET_PATH_PREFILL})
    {
        for (int act = 0; act < 3; ++act)
        {
            Case c{100, 37, 77, 20, act, act == 2 ? 2 : 0, path};
            c.tOff = 1;
            c.maskOff = 1;
            c.valOff = 1;
            c.yOff = 1;
            runCase(c, seed++);
            Case d{104, 104, 40, 18, act, 0, path};  // dense V in place, misaligned: scalar B
            d.valOff = 1;
            d.tOff = 1;
            d.nullMask = true;
            runCase(d, seed++);
        }
        Case s{45, 20, 33, 19, kROCKET_ACT_FP16, 1, path};
        s.stray = true;
        runCase(s, seed++);
        Case r{72, 30, 40, 24, kROCKET_ACT_BF16, 0, path};
        r.reverse = true;
        runCase(r, seed++);
    }
    // The auto path: 16 rows decode, 17 prefill.
    runCase({100, 37, 77, 16, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO}, seed++);
    runCase({100, 37, 77, 17, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO}, seed++);
    runCase({100, 37, 77, 0, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO}, seed++);  // no rows: nothing runs
    // sm_75 (T4): fp16 tensor cores, no bf16 ones -> bf16 prefill falls back (logged once, see fallback group).
    Case t4{64, 30, 40, 33, kROCKET_ACT_FP16, 0, kROCKET_PATH_PREFILL};
    t4.device = 1;
    runCase(t4, seed++);
}

void nonFiniteGroup()
{
    uint64_t seed = 400;
    for (int path : {kROCKET_PATH_DECODE, kROCKET_PATH_PREFILL})
        for (int act = 0; act < 3; ++act)
            for (int vt : {0, 1})
            {
                runCase({96, 30, 70, 40, act, vt, path, 0, 0, 0, 0, 0, Ws::kExact, false, false, 1}, seed++);
                if (vt == 0)
                    runCase({40, 40, 20, 20, act, vt, path, 0, 0, 0, 0, 0, Ws::kExact, false, false, 1}, seed++);
            }
    // Every row flagged: the fix-up runs several chunks of 16 rows; both tile heights.
    runCase({104, 30, 50, 70, kROCKET_ACT_FP16, 0, kROCKET_PATH_PREFILL, 0, 0, 0, 0, 0, Ws::kExact, false, false, 2},
        seed++);
    runCase({64, 20, 30, 40, kROCKET_ACT_FP32, 2, kROCKET_PATH_PREFILL, 0, 0, 0, 0, 0, Ws::kExact, false, false, 2},
        seed++);
}

struct LogRecord
{
    std::vector<std::pair<int, std::string>> messages;
};

void recordLog(int severity, char const* msg, void* user)
{
    static_cast<LogRecord*>(user)->messages.emplace_back(severity, msg);
}

void fallbackGroup()
{
    LogRecord log;
    rocketSparseVSetLogger(&recordLog, &log);
    uint64_t seed = 500;
    auto count = [&](char const* needle) {
        int n = 0;
        for (auto const& m : log.messages)
            n += m.second.find(needle) != std::string::npos;
        return n;
    };
    for (int rep = 0; rep < 2; ++rep)
    {
        Case none{100, 37, 77, 40 + rep, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO};
        none.ws = Ws::kNone;
        runCase(none, seed++);
        Case small{64, 20, 30, 20, kROCKET_ACT_FP32, 1, kROCKET_PATH_PREFILL};
        small.ws = Ws::kSmall;
        runCase(small, seed++);
        Case mis{64, 20, 30, 20, kROCKET_ACT_BF16, 2, kROCKET_PATH_PREFILL};
        mis.ws = Ws::kMisaligned;
        runCase(mis, seed++);
        Case bf{64, 30, 40, 33, kROCKET_ACT_BF16, 0, kROCKET_PATH_PREFILL};
        bf.device = 1;  // sm_75
        runCase(bf, seed++);
        Case old{64, 30, 40, 33, kROCKET_ACT_FP16, 0, kROCKET_PATH_PREFILL};
        old.device = 2;  // sm_61: no tensor cores
        runCase(old, seed++);
    }
    for (auto const& m : log.messages)
        std::printf("  logged (%s): %s\n", m.first == kROCKET_LOG_WARNING ? "warning" : "info", m.second.c_str());
    EXPECT(count("bytes of workspace") == 1, "small / missing workspace logged %d times", count("bytes of workspace"));
    EXPECT(count("not 256-byte aligned") == 1, "misaligned workspace logged %d times", count("not 256-byte aligned"));
    // Once per reason and process: the first device without tensor cores for the type is the one named.
    EXPECT(count("tensor cores") == 1 && count("no bf16 tensor cores on sm_75") == 1,
        "missing tensor cores logged %d times", count("tensor cores"));
    EXPECT(log.messages.size() == 3, "%zu messages", log.messages.size());
    rocketSparseVSetLogger(nullptr, nullptr);
}

} // namespace

int main(int argc, char** argv)
{
    std::string const group = argc > 1 ? argv[1] : "all";
    std::vector<std::pair<std::string, std::function<void()>>> const groups = {{"fallback", fallbackGroup},
        {"helpers", testHelpers}, {"decode", decodeGroup}, {"prefill", prefillGroup}, {"edge", edgeGroup},
        {"nonfinite", nonFiniteGroup}};
    bool found = false;
    auto const t0 = std::chrono::steady_clock::now();
    for (auto const& g : groups)
    {
        if (group == "all" || group == g.first)
        {
            found = true;
            std::printf("== %s\n", g.first.c_str());
            g.second();
        }
    }
    if (!found)
    {
        std::fprintf(stderr, "unknown group '%s' (helpers, decode, prefill, edge, nonfinite, fallback, all)\n",
            group.c_str());
        return 2;
    }
    double const secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%d cases, %d failures, %.1fs\n", gCases, gFailures, secs);
    if (gFailures == 0)
        std::printf("ALL PASSED\n");
    return gFailures == 0 ? 0 : 1;
}
