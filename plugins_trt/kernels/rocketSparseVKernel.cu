/*
 * Kernels for the ROCKET sparse V product y = t @ V (see rocketSparseVKernel.h for the storage format).
 *
 * Two paths, picked by the number of activation rows:
 *
 *  decode  (rows <= 16)  The product is memory-bound: every packed byte of V is used once per row. One warp owns
 *          one output column (or a few); the block stages t (converted to fp32) in shared memory, in slices of
 *          512 / 1024 basis rows. Per slice each lane loads one 32-bit mask word, a warp prefix sum of the word
 *          popcounts gives each word's first index into the column's packed values, and then the warp walks the
 *          words: lane l looks at bit l of the broadcast word, and when it is set reads value
 *          prefix + popc(word & lanes_below). The set bits of one word map to consecutive packed values, so each
 *          warp load reads one contiguous run of the column's values (coalesced), every mask / value byte is read
 *          exactly once, and the loop is unrolled so that several loads are in flight per warp. A dense V
 *          (k == r) skips the mask. fp32 accumulation, warp-shuffle reduction, per-column scale at the end.
 *
 *  prefill (rows > 16)   Expand V once per call into a dense [d_out, r] workspace in the compute type (fp16 / bf16
 *          / fp32; int8 and fp8 values are integers / short floats and convert exactly, their scale is applied in
 *          the GEMM epilogue), then a tiled GEMM: WMMA tensor cores (m16n16k16, fp32 accumulate) for fp16 / bf16,
 *          a register-tiled SIMT kernel for fp32. A dense V in the activation type is used in place (no workspace).
 *          The GEMM multiplies the zeros of unkept rows too (inf * 0 = nan), so while it loads t the first column
 *          tile flags the rows that hold an inf / nan, and a fix-up launch of the decode kernel recomputes exactly
 *          those rows (read from a list in the workspace): both paths sum only the kept rows of each column.
 *
 * The per-lane index math (mask words, packed value indices, tile and epilogue coordinates) is in small
 * __host__ __device__ helpers so that the CPU emulation test (plugins_trt/tests/emu) can check it directly.
 *
 * Plain C entry points only (no TensorRT / torch types) so that the TensorRT plugin and the torch extension build
 * this same file.
 */
#include "rocketSparseVKernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdarg.h>
#include <stdio.h>

#include <atomic>
#include <type_traits>

namespace rocket
{
namespace
{

// ---------------------------------------------------------------------------------------------------------------
// Tunables and small helpers
// ---------------------------------------------------------------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr int kDecodeMaxRows = 16;  // decode kernel handles up to this many rows per launch (accumulators in regs)
constexpr int kDecodeWarps = 4;     // warps per decode block: small blocks spread narrow layers over more SMs
constexpr int kDecodeUnroll = 8;    // mask words processed per step: 8 independent value loads in flight per warp
constexpr int kExpandWarps = 8;     // warps per expansion block (one column per warp)
constexpr size_t kWorkspaceAlign = 256;

//! fp8 e4m3 values are carried as raw bytes; a distinct type keeps the templates apart from int8.
struct Fp8E4M3
{
    uint8_t bits;
};

template <typename T>
struct TypeTag
{
    using type = T;
};

__device__ __forceinline__ float toFloat(float x)
{
    return x;
}
__device__ __forceinline__ float toFloat(__half x)
{
    return __half2float(x);
}
__device__ __forceinline__ float toFloat(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}
__device__ __forceinline__ float toFloat(int8_t x)
{
    return static_cast<float>(x);
}
__device__ __forceinline__ float toFloat(Fp8E4M3 x)
{
    // Hardware conversion on sm_89+, exact software emulation in cuda_fp8.hpp elsewhere.
    __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(x.bits), __NV_E4M3);
    return __half2float(__half(h));
}

template <typename T>
__device__ __forceinline__ T fromFloat(float x);
template <>
__device__ __forceinline__ float fromFloat<float>(float x)
{
    return x;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float x)
{
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ bool isNonFinite(T x)
{
    float const f = toFloat(x);
    return !(f - f == 0.f);  // inf - inf and nan - nan are nan; every finite f gives 0
}

// ---- Per-lane mask / index math (host and device) --------------------------------------------------------------------
//! Bits of mask word `word` (basis rows 32*word .. 32*word+31) that lie below `rank`.
__host__ __device__ __forceinline__ uint32_t maskWordValidBits(int rank, int word)
{
    int const rowsLeft = rank - word * 32;
    return rowsLeft >= 32 ? 0xffffffffu : (rowsLeft <= 0 ? 0u : ((1u << rowsLeft) - 1u));
}

//! Lanes below `lane` (the bits of a word that come before the lane's own bit).
__host__ __device__ __forceinline__ uint32_t lanesBelowMask(int lane)
{
    return (1u << lane) - 1u;
}

__host__ __device__ __forceinline__ int popcount32(uint32_t x)
{
#if defined(__CUDA_ARCH__)
    return __popc(x);
#else
    x = x - ((x >> 1) & 0x55555555u);
    x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
    return static_cast<int>((((x + (x >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24);
#endif
}

//! Index into the column's packed values of basis row 32*w + lane, given the number of kept rows before word w.
__host__ __device__ __forceinline__ int packedIndex(int wordPrefix, uint32_t word, int lane)
{
    return wordPrefix + popcount32(word & lanesBelowMask(lane));
}

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

//! Inclusive warp prefix sum.
__device__ __forceinline__ int warpInclusiveScan(int v, int lane)
{
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset <<= 1)
    {
        int const n = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset)
        {
            v += n;
        }
    }
    return v;
}

//! Mask word `word` (basis rows 32*word .. 32*word+31) of one column; bits at or past `rank` are cleared so that a
//! padded last byte with stray bits cannot select values. `aligned4`: the column's bytes start 4-byte aligned and the
//! row length is a multiple of 4, so one 32-bit load reads the word (little-endian = the format's bit order).
__device__ __forceinline__ uint32_t loadMaskWord(
    uint8_t const* col, int maskBytes, int word, int rank, bool aligned4)
{
    uint32_t bits = 0;
    int const byte0 = word * 4;
    if (aligned4)
    {
        bits = __ldg(reinterpret_cast<uint32_t const*>(col + byte0));
    }
    else
    {
#pragma unroll
        for (int b = 0; b < 4; ++b)
        {
            if (byte0 + b < maskBytes)
            {
                bits |= static_cast<uint32_t>(__ldg(col + byte0 + b)) << (8 * b);
            }
        }
    }
    return bits & maskWordValidBits(rank, word);
}

template <typename VT>
__device__ __forceinline__ VT loadValue(VT const* p)
{
    return __ldg(p);
}
template <>
__device__ __forceinline__ Fp8E4M3 loadValue<Fp8E4M3>(Fp8E4M3 const* p)
{
    return Fp8E4M3{__ldg(reinterpret_cast<uint8_t const*>(p))};
}
template <>
__device__ __forceinline__ __half loadValue<__half>(__half const* p)
{
    return __ldg(p);
}

// ---------------------------------------------------------------------------------------------------------------
// Decode path
// ---------------------------------------------------------------------------------------------------------------
//! Columns per warp: more rows make the staged t slice more expensive per block, so give each warp more columns.
template <int MAXR>
struct DecodeCols
{
    static constexpr int kValue = MAXR >= 16 ? 4 : (MAXR >= 4 ? 2 : 1);
};

//! Basis rows of t staged per slice: 1024 (one mask word per lane) while MAXR * 1024 floats fit in 32 KiB, else 512.
template <int MAXR>
struct DecodeSlice
{
    static constexpr int kWords = MAXR <= 8 ? 32 : 16;
};

/*
 * y[m, j] = scale[j] * sum_{kept i} t[m, i] * values[j, idx(i)]   for m < rows (<= MAXR), CPW columns per warp.
 * Shared memory: float ts[rows][sliceWords * 32] (dynamic). GATHER: activation / output row m is rowIdx[m] (the
 * prefill fix-up), else m.
 */
template <typename T, typename VT, int MAXR, bool DENSE, bool GATHER>
__device__ __forceinline__ void sparseVDecodeBody(float* ts, T const* __restrict__ t, VT const* __restrict__ values,
    uint8_t const* __restrict__ mask, float const* __restrict__ scales, T* __restrict__ y, int rows,
    int const* __restrict__ rowIdx, int rank, int keep, int outFeatures, int maskBytes, int sliceWords,
    bool maskAligned4)
{
    constexpr int CPW = DecodeCols<MAXR>::kValue;

    int const lane = threadIdx.x & (kWarpSize - 1);
    int const warp = threadIdx.x / kWarpSize;
    int const col0 = (blockIdx.x * kDecodeWarps + warp) * CPW;
    int const sliceRows = sliceWords * kWarpSize;

    float acc[CPW][MAXR];
    int carry[CPW];  // packed values of the column consumed by earlier slices
#pragma unroll
    for (int c = 0; c < CPW; ++c)
    {
        carry[c] = 0;
#pragma unroll
        for (int m = 0; m < MAXR; ++m)
        {
            acc[c][m] = 0.f;
        }
    }

    for (int base = 0; base < rank; base += sliceRows)
    {
        // Stage t[:, base : base + sliceRows) as fp32; zero past rank so the padded tail contributes nothing.
        __syncthreads();  // the previous slice is consumed
        for (int e = threadIdx.x; e < rows * sliceRows; e += blockDim.x)
        {
            int const m = e / sliceRows;
            int const i = e - m * sliceRows;
            int64_t const row = GATHER ? static_cast<int64_t>(rowIdx[m]) : static_cast<int64_t>(m);
            ts[e] = base + i < rank ? toFloat(t[row * rank + base + i]) : 0.f;
        }
        __syncthreads();
        int const words = min(sliceWords, (rank - base + kWarpSize - 1) / kWarpSize);
        int const word0 = base / kWarpSize;

#pragma unroll
        for (int c = 0; c < CPW; ++c)
        {
            // Past the last column: clamp to a valid column and drop the result at the end; keeping the loop free
            // of early exits lets the compiler keep acc[][] in registers (warp-uniform either way).
            int const j = min(col0 + c, outFeatures - 1);
            VT const* colValues = values + static_cast<int64_t>(j) * keep;

            // Each lane owns mask word `lane` of the slice; exclusive prefix of the popcounts = its first value index.
            uint32_t myWord = 0;
            int myPrefix = 0;
            int sliceCount = 0;
            if (!DENSE)
            {
                if (lane < words)
                {
                    myWord = loadMaskWord(mask + static_cast<int64_t>(j) * maskBytes, maskBytes, word0 + lane, rank,
                        maskAligned4);
                }
                int const cnt = __popc(myWord);
                int const incl = warpInclusiveScan(cnt, lane);
                myPrefix = carry[c] + incl - cnt;
                sliceCount = __shfl_sync(0xffffffffu, incl, kWarpSize - 1);
            }

            for (int w0 = 0; w0 < words; w0 += kDecodeUnroll)
            {
                float v[kDecodeUnroll];
                bool on[kDecodeUnroll];
                // Issue all loads of the step first (independent), then the FMAs.
#pragma unroll
                for (int u = 0; u < kDecodeUnroll; ++u)
                {
                    int const w = w0 + u;
                    int idx;
                    if (DENSE)
                    {
                        idx = base + w * kWarpSize + lane;
                        on[u] = w < words && idx < rank;
                    }
                    else
                    {
                        uint32_t const word = __shfl_sync(0xffffffffu, myWord, w & (kWarpSize - 1));
                        int const pre = __shfl_sync(0xffffffffu, myPrefix, w & (kWarpSize - 1));
                        idx = packedIndex(pre, word, lane);
                        // idx < keep guards against a malformed mask (more than k bits): never read past the column.
                        on[u] = w < words && ((word >> lane) & 1u) && idx < keep;
                    }
                    v[u] = on[u] ? toFloat(loadValue(colValues + idx)) : 0.f;
                }
#pragma unroll
                for (int u = 0; u < kDecodeUnroll; ++u)
                {
                    // Clamped: the padded steps past `words` (on[u] false) must not even form an index past the slice.
                    int const i = min((w0 + u) * kWarpSize + lane, sliceRows - 1);
#pragma unroll
                    for (int m = 0; m < MAXR; ++m)
                    {
                        // Select instead of v * t: an unkept t entry that is inf / nan must not leak into the sum.
                        if (m < rows && on[u])
                        {
                            acc[c][m] = fmaf(v[u], ts[m * sliceRows + i], acc[c][m]);
                        }
                    }
                }
            }
            carry[c] += sliceCount;
        }
    }

#pragma unroll
    for (int c = 0; c < CPW; ++c)
    {
        int const j = col0 + c;
        if (j >= outFeatures)
        {
            break;
        }
        float const scale = scales != nullptr ? __ldg(scales + j) : 1.f;
#pragma unroll
        for (int m = 0; m < MAXR; ++m)
        {
            if (m < rows)
            {
                float const s = warpSum(acc[c][m]);
                if (lane == m)
                {
                    int64_t const row = GATHER ? static_cast<int64_t>(rowIdx[m]) : static_cast<int64_t>(m);
                    y[row * outFeatures + j] = fromFloat<T>(s * scale);
                }
            }
        }
    }
}


// minBlocks 4 (<= 128 registers): without it ptxas for sm_90 picks ~48 registers and spills the accumulators.
template <typename T, typename VT, int MAXR, bool DENSE>
__global__ void __launch_bounds__(kDecodeWarps* kWarpSize, 4) sparseVDecodeKernel(T const* __restrict__ t,
    VT const* __restrict__ values, uint8_t const* __restrict__ mask, float const* __restrict__ scales,
    T* __restrict__ y, int rows, int rank, int keep, int outFeatures, int maskBytes, int sliceWords, bool maskAligned4)
{
    extern __shared__ float ts[];
    sparseVDecodeBody<T, VT, MAXR, DENSE, false>(
        ts, t, values, mask, scales, y, rows, nullptr, rank, keep, outFeatures, maskBytes, sliceWords, maskAligned4);
}

/*
 * Prefill fix-up: the decode product for the rows listed in `flagged` ([0] = count, then row indices, written by
 * the GEMM), in chunks of kDecodeMaxRows. The count is read on the device, so the launch costs one empty pass
 * over the column blocks when no row was flagged.
 */
template <typename T, typename VT>
__global__ void __launch_bounds__(kDecodeWarps* kWarpSize, 4) sparseVFixupKernel(T const* __restrict__ t,
    VT const* __restrict__ values, uint8_t const* __restrict__ mask, float const* __restrict__ scales,
    T* __restrict__ y, int const* __restrict__ flagged, int rank, int keep, int outFeatures, int maskBytes,
    int sliceWords, bool maskAligned4)
{
    extern __shared__ float ts[];
    int const count = flagged[0];
    for (int r0 = 0; r0 < count; r0 += kDecodeMaxRows)
    {
        int const n = min(kDecodeMaxRows, count - r0);
        sparseVDecodeBody<T, VT, kDecodeMaxRows, false, true>(ts, t, values, mask, scales, y, n, flagged + 1 + r0,
            rank, keep, outFeatures, maskBytes, sliceWords, maskAligned4);
    }
}

template <typename T, typename VT, int MAXR>
cudaError_t launchDecodeChunk(T const* t, VT const* values, uint8_t const* mask, float const* scales, T* y, int rows,
    int rank, int keep, int outFeatures, cudaStream_t stream)
{
    constexpr int CPW = DecodeCols<MAXR>::kValue;
    int const maskBytes = (rank + 7) / 8;
    int const sliceWords = min(DecodeSlice<MAXR>::kWords, (rank + kWarpSize - 1) / kWarpSize);
    size_t const smem = static_cast<size_t>(rows) * sliceWords * kWarpSize * sizeof(float);
    int const colsPerBlock = kDecodeWarps * CPW;
    dim3 const grid((outFeatures + colsPerBlock - 1) / colsPerBlock);
    dim3 const block(kDecodeWarps * kWarpSize);
    bool const dense = keep == rank;
    bool const aligned4 = !dense && maskBytes % 4 == 0 && (reinterpret_cast<uintptr_t>(mask) & 3u) == 0;
    if (dense)
    {
        sparseVDecodeKernel<T, VT, MAXR, true><<<grid, block, smem, stream>>>(
            t, values, mask, scales, y, rows, rank, keep, outFeatures, maskBytes, sliceWords, aligned4);
    }
    else
    {
        sparseVDecodeKernel<T, VT, MAXR, false><<<grid, block, smem, stream>>>(
            t, values, mask, scales, y, rows, rank, keep, outFeatures, maskBytes, sliceWords, aligned4);
    }
    return cudaGetLastError();
}

template <typename T, typename VT>
cudaError_t launchDecode(T const* t, VT const* values, uint8_t const* mask, float const* scales, T* y, int64_t rows,
    int rank, int keep, int outFeatures, cudaStream_t stream)
{
    for (int64_t r0 = 0; r0 < rows; r0 += kDecodeMaxRows)
    {
        int const n = static_cast<int>(rows - r0 < kDecodeMaxRows ? rows - r0 : kDecodeMaxRows);
        T const* tc = t + r0 * rank;
        T* yc = y + r0 * outFeatures;
        cudaError_t err;
        if (n <= 1)
            err = launchDecodeChunk<T, VT, 1>(tc, values, mask, scales, yc, n, rank, keep, outFeatures, stream);
        else if (n <= 2)
            err = launchDecodeChunk<T, VT, 2>(tc, values, mask, scales, yc, n, rank, keep, outFeatures, stream);
        else if (n <= 4)
            err = launchDecodeChunk<T, VT, 4>(tc, values, mask, scales, yc, n, rank, keep, outFeatures, stream);
        else if (n <= 8)
            err = launchDecodeChunk<T, VT, 8>(tc, values, mask, scales, yc, n, rank, keep, outFeatures, stream);
        else
            err = launchDecodeChunk<T, VT, 16>(tc, values, mask, scales, yc, n, rank, keep, outFeatures, stream);
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------------
// Prefill path, step 1: expand V into dense [d_out, r] (= column-major r x d_out) in the compute type CT
// ---------------------------------------------------------------------------------------------------------------
//! One warp per column; writes all r entries (zeros for unkept rows), coalesced. Quantized values are written
//! unscaled (exact in fp16 / bf16 / fp32); the GEMM epilogue applies the column scale. `flagged` (may be null):
//! the GEMM's list of rows with non-finite activations, emptied here (this kernel runs first on the stream).
template <typename VT, typename CT, bool DENSE>
__global__ void __launch_bounds__(kExpandWarps* kWarpSize) expandVKernel(VT const* __restrict__ values,
    uint8_t const* __restrict__ mask, CT* __restrict__ dense, int ldDense, int rank, int keep, int outFeatures,
    int maskBytes, bool maskAligned4, int* __restrict__ flagged)
{
    int const lane = threadIdx.x & (kWarpSize - 1);
    int const j = blockIdx.x * kExpandWarps + threadIdx.x / kWarpSize;
    if (flagged != nullptr && blockIdx.x == 0 && threadIdx.x == 0)
    {
        flagged[0] = 0;
    }
    if (j >= outFeatures)
    {
        return;  // whole warp: no block-level synchronisation below
    }
    VT const* colValues = values + static_cast<int64_t>(j) * keep;
    CT* out = dense + static_cast<int64_t>(j) * ldDense;
    uint8_t const* colMask = mask + static_cast<int64_t>(j) * maskBytes;
    int const totalWords = (rank + kWarpSize - 1) / kWarpSize;

    int carry = 0;
    for (int word0 = 0; word0 < totalWords; word0 += kWarpSize)
    {
        int const words = min(kWarpSize, totalWords - word0);
        uint32_t myWord = 0;
        int myPrefix = 0;
        int sliceCount = 0;
        if (!DENSE)
        {
            if (lane < words)
            {
                myWord = loadMaskWord(colMask, maskBytes, word0 + lane, rank, maskAligned4);
            }
            int const cnt = __popc(myWord);
            int const incl = warpInclusiveScan(cnt, lane);
            myPrefix = carry + incl - cnt;
            sliceCount = __shfl_sync(0xffffffffu, incl, kWarpSize - 1);
        }
        for (int w = 0; w < words; ++w)
        {
            int const i = (word0 + w) * kWarpSize + lane;
            float v = 0.f;
            if (DENSE)
            {
                if (i < rank)
                {
                    v = toFloat(loadValue(colValues + i));
                }
            }
            else
            {
                uint32_t const word = __shfl_sync(0xffffffffu, myWord, w);
                int const pre = __shfl_sync(0xffffffffu, myPrefix, w);
                int const idx = packedIndex(pre, word, lane);
                if (((word >> lane) & 1u) && idx < keep)
                {
                    v = toFloat(loadValue(colValues + idx));
                }
            }
            if (i < rank)
            {
                out[i] = fromFloat<CT>(v);
            }
        }
        carry += sliceCount;
    }
    // Zero the padding up to the (multiple of 8) leading dimension: the GEMM reads whole 16-byte vectors.
    for (int i = rank + lane; i < ldDense; i += kWarpSize)
    {
        out[i] = fromFloat<CT>(0.f);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Prefill path, step 2a: WMMA tensor-core GEMM for fp16 / bf16
//   C[M, N] = scale[n] * A[M, K] @ B,   A row-major (lda = K), B given as Bt[N, ldb] row-major (= K x N column-major)
//   with ldb >= K; an expanded B has ldb = K rounded up to 8 and zero padding, so its rows load as 16 B vectors.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kGemmThreads = 256;  // 8 warps: 2 (M) x 4 (N)
constexpr int kGemmBN = 128;
constexpr int kGemmBK = 32;
constexpr int kGemmSmemLd = kGemmBK + 8;  // +8 halves (80 B rows): 32 B aligned for wmma, 16 B slots rotate
constexpr int kStageLd = 16 + 8;          // fp32 epilogue staging rows: 96 B, see epilogueRow

//! Element (row, k) of a BK-wide tile that load `v` (= threadIdx.x + l * kGemmThreads) covers. 16-byte vectors
//! (VEC): a warp takes 8 rows x 4 vectors (64 contiguous bytes of each row in global memory), and each 8-lane phase
//! of its 16-byte shared-memory store writes the same k-slot of 8 consecutive rows, which the 80-byte row pitch
//! spreads over all 32 banks. Scalars: a warp takes 32 consecutive k of one row.
template <bool VEC>
__host__ __device__ __forceinline__ int2 tileCoord(int v)
{
    return VEC ? make_int2((v & 7) + (v >> 5) * 8, ((v >> 3) & 3) * 8) : make_int2(v / kGemmBK, v % kGemmBK);
}

//! Row (within the warp's 16 x 16 fp32 staging tile) that `lane` converts and stores in epilogue step `step`
//! (0..7); its column is epilogueCol(lane). Half-warp h takes row 4 * (step / 2) + step % 2 + 2 * h: with the
//! 24-float pitch the two rows of one step start 48 floats (16 banks) apart, so a step reads 32 distinct banks, and
//! each half-warp writes 16 consecutive elements of one row of C.
__host__ __device__ __forceinline__ int epilogueRow(int step, int lane)
{
    return (step >> 1) * 4 + (step & 1) + (lane >> 4) * 2;
}
__host__ __device__ __forceinline__ int epilogueCol(int lane)
{
    return lane & 15;
}

//! Global -> register staging of one BM x BK (A) or BN x BK (B) tile; 8-element (16 B) vectors when VEC.
template <typename T, int ROWS, bool VEC>
struct TileLoader
{
    static constexpr int kElemsPerLoad = VEC ? 8 : 1;
    static constexpr int kLoads = ROWS * kGemmBK / kElemsPerLoad / kGemmThreads;
    static_assert(kLoads >= 1, "tile too small for the block");
    static_assert(!VEC || ROWS % 8 == 0, "vector tiles are loaded 8 rows per warp");
    using Vec = typename std::conditional<VEC, uint4, T>::type;

    Vec regs[kLoads];

    //! Tile row of load l (fixed across the k tiles).
    __device__ __forceinline__ static int row(int l)
    {
        return tileCoord<VEC>(threadIdx.x + l * kGemmThreads).x;
    }

    __device__ __forceinline__ void load(T const* src, int64_t ld, int row0, int rowsTotal, int k0, int K)
    {
#pragma unroll
        for (int l = 0; l < kLoads; ++l)
        {
            int2 const rk = tileCoord<VEC>(threadIdx.x + l * kGemmThreads);
            int64_t const gr = row0 + rk.x;
            int const gk = k0 + rk.y;
            if (VEC)
            {
                // ld % 8 == 0 and the row is zero-padded up to ld (or K % 8 == 0): a vector that starts inside K
                // lies inside the row, and its part past K multiplies zeros of the other operand.
                uint4 v = make_uint4(0u, 0u, 0u, 0u);
                if (gr < rowsTotal && gk < K)
                {
                    v = __ldg(reinterpret_cast<uint4 const*>(src + gr * ld + gk));
                }
                reinterpret_cast<uint4&>(regs[l]) = v;
            }
            else
            {
                T v = fromFloat<T>(0.f);
                if (gr < rowsTotal && gk < K)
                {
                    v = src[gr * ld + gk];
                }
                reinterpret_cast<T&>(regs[l]) = v;
            }
        }
    }

    //! bad[l] |= load l holds an inf / nan (rows past M and k past K were loaded as zeros). Integer tests on the
    //! raw 16-bit lanes: an all-ones exponent field.
    __device__ __forceinline__ void markNonFinite(bool (&bad)[kLoads]) const
    {
        constexpr uint32_t kExp = std::is_same<T, __half>::value ? 0x7C00u : 0x7F80u;
        constexpr uint32_t kExp2 = kExp | (kExp << 16);
#pragma unroll
        for (int l = 0; l < kLoads; ++l)
        {
            if (VEC)
            {
                uint4 const v = reinterpret_cast<uint4 const&>(regs[l]);
                uint32_t const words[4] = {v.x, v.y, v.z, v.w};
                uint32_t zeroLane = 0;
#pragma unroll
                for (int q = 0; q < 4; ++q)
                {
                    uint32_t const x = (words[q] & kExp2) ^ kExp2;  // a 16-bit lane is 0 iff inf / nan
                    zeroLane |= (x - 0x00010001u) & ~x & 0x80008000u;
                }
                bad[l] = bad[l] || zeroLane != 0;
            }
            else
            {
                uint32_t const h = reinterpret_cast<uint16_t const&>(regs[l]);
                bad[l] = bad[l] || (h & kExp) == kExp;
            }
        }
    }

    __device__ __forceinline__ void store(T* smem) const
    {
#pragma unroll
        for (int l = 0; l < kLoads; ++l)
        {
            int2 const rk = tileCoord<VEC>(threadIdx.x + l * kGemmThreads);
            if (VEC)
            {
                *reinterpret_cast<uint4*>(smem + rk.x * kGemmSmemLd + rk.y) = reinterpret_cast<uint4 const&>(regs[l]);
            }
            else
            {
                smem[rk.x * kGemmSmemLd + rk.y] = reinterpret_cast<T const&>(regs[l]);
            }
        }
    }
};

//! End of a GEMM block of the first column tile: append the rows (of this block's BM) that some thread saw a
//! non-finite activation in to the fix-up list flagged = [count, rows...]. rowFlag was zeroed at the start.
template <int BM, int LOADS>
__device__ __forceinline__ void appendFlaggedRows(int* rowFlag, bool const (&bad)[LOADS], int const (&rowOf)[LOADS],
    int m0, int M, int rowBase, int* flagged)
{
#pragma unroll
    for (int l = 0; l < LOADS; ++l)
    {
        if (bad[l])
        {
            rowFlag[rowOf[l]] = 1;  // same value from every writer
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < BM; i += blockDim.x)
    {
        if (rowFlag[i] != 0 && m0 + i < M)
        {
            int const slot = atomicAdd(flagged, 1);
            flagged[1 + slot] = rowBase + m0 + i;
        }
    }
}

template <typename T, int BM, bool VECA, bool VECB>
__device__ __forceinline__ void gemmWmmaBody(T const* __restrict__ A, T const* __restrict__ Bt, int ldb,
    float const* __restrict__ scales, T* __restrict__ C, int M, int N, int K, int* __restrict__ flagged, int rowBase)
{
    using namespace nvcuda;
    constexpr int kWarpM = BM / 2;  // rows of C per warp
    constexpr int kWarpN = kGemmBN / 4;
    constexpr int FM = kWarpM / 16;
    constexpr int FN = kWarpN / 16;
    using ALoader = TileLoader<T, BM, VECA>;

    __shared__ __align__(128) T As[BM * kGemmSmemLd];
    __shared__ __align__(128) T Bs[kGemmBN * kGemmSmemLd];
    __shared__ __align__(128) float stage[kGemmThreads / kWarpSize][16 * kStageLd];
    __shared__ int rowFlag[BM];

    int const warp = threadIdx.x / kWarpSize;
    int const lane = threadIdx.x & (kWarpSize - 1);
    int const warpM = warp / 4;
    int const warpN = warp % 4;
    int const m0 = blockIdx.y * BM;
    int const n0 = blockIdx.x * kGemmBN;
    // The first column tile reads every k of its rows: it flags the rows with inf / nan for the decode fix-up.
    bool const detect = flagged != nullptr && blockIdx.x == 0;
    bool bad[ALoader::kLoads] = {};
    if (detect)
    {
        for (int i = threadIdx.x; i < BM; i += kGemmThreads)
        {
            rowFlag[i] = 0;
        }
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
            wmma::fill_fragment(acc[i][j], 0.f);

    ALoader aLoad;
    TileLoader<T, kGemmBN, VECB> bLoad;
    int const kTiles = (K + kGemmBK - 1) / kGemmBK;

    aLoad.load(A, K, m0, M, 0, K);
    bLoad.load(Bt, ldb, n0, N, 0, K);
    if (detect)
        aLoad.markNonFinite(bad);
    aLoad.store(As);
    bLoad.store(Bs);
    __syncthreads();

    for (int kt = 0; kt < kTiles; ++kt)
    {
        // Prefetch the next tile into registers while the tensor cores work on this one.
        if (kt + 1 < kTiles)
        {
            aLoad.load(A, K, m0, M, (kt + 1) * kGemmBK, K);
            bLoad.load(Bt, ldb, n0, N, (kt + 1) * kGemmBK, K);
            if (detect)
                aLoad.markNonFinite(bad);
        }
#pragma unroll
        for (int kk = 0; kk < kGemmBK; kk += 16)
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[FN];
#pragma unroll
            for (int i = 0; i < FM; ++i)
                wmma::load_matrix_sync(a[i], As + (warpM * kWarpM + i * 16) * kGemmSmemLd + kk, kGemmSmemLd);
#pragma unroll
            for (int j = 0; j < FN; ++j)
                wmma::load_matrix_sync(b[j], Bs + (warpN * kWarpN + j * 16) * kGemmSmemLd + kk, kGemmSmemLd);
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j)
                    wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();
        if (kt + 1 < kTiles)
        {
            aLoad.store(As);
            bLoad.store(Bs);
        }
        __syncthreads();
    }
    if (detect)
    {
        int rowOf[ALoader::kLoads];
#pragma unroll
        for (int l = 0; l < ALoader::kLoads; ++l)
            rowOf[l] = ALoader::row(l);
        appendFlaggedRows<BM>(rowFlag, bad, rowOf, m0, M, rowBase, flagged);
    }

    // Epilogue: through a per-warp 16 x 16 fp32 staging tile so that bounds, scale and conversion are per element;
    // each step of a warp reads 32 banks and writes two 16-element runs of C (epilogueRow).
    float* st = stage[warp];
    int const col = epilogueCol(lane);
#pragma unroll
    for (int i = 0; i < FM; ++i)
    {
#pragma unroll
        for (int j = 0; j < FN; ++j)
        {
            wmma::store_matrix_sync(st, acc[i][j], kStageLd, wmma::mem_row_major);
            __syncwarp();
            int const rowBase0 = m0 + warpM * kWarpM + i * 16;
            int const gn = n0 + warpN * kWarpN + j * 16 + col;
            // (i outer, scale read here: keeps the 128-row fp16 / bf16 kernels at <= 128 registers, 2 blocks / SM)
            float const s = scales != nullptr && gn < N ? __ldg(scales + gn) : 1.f;
#pragma unroll
            for (int step = 0; step < 8; ++step)
            {
                int const r = epilogueRow(step, lane);
                int const gm = rowBase0 + r;
                if (gm < M && gn < N)
                {
                    C[static_cast<int64_t>(gm) * N + gn] = fromFloat<T>(st[r * kStageLd + col] * s);
                }
            }
            __syncwarp();
        }
    }
}

template <typename T, int BM, bool VECA, bool VECB>
__global__ void __launch_bounds__(kGemmThreads) gemmWmmaKernel(T const* __restrict__ A, T const* __restrict__ Bt,
    int ldb, float const* __restrict__ scales, T* __restrict__ C, int M, int N, int K, int* __restrict__ flagged,
    int rowBase)
{
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
    {
#if __CUDA_ARCH__ >= 800
        gemmWmmaBody<T, BM, VECA, VECB>(A, Bt, ldb, scales, C, M, N, K, flagged, rowBase);
#endif  // bf16 WMMA needs sm_80; the host never launches this below sm_80
    }
    else
    {
#if __CUDA_ARCH__ >= 700
        gemmWmmaBody<T, BM, VECA, VECB>(A, Bt, ldb, scales, C, M, N, K, flagged, rowBase);
#endif
    }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Prefill path, step 2b: fp32 SIMT GEMM (exact fp32; 64x64 block tile, 4x4 outputs per thread)
// ---------------------------------------------------------------------------------------------------------------
constexpr int kSimtTile = 64;
constexpr int kSimtBK = 16;
constexpr int kSimtLd = kSimtTile + 4;  // 272-byte rows: 16-byte aligned for the float4 reads

//! Element (row, k) of a 64 x 16 tile that load `e` (= threadIdx.x + l * 256) covers: a warp takes 4 rows x 8
//! consecutive k (32-byte runs in global memory), so its transposed store tile[k][row] (bank 4k + row mod 32) hits
//! 32 distinct banks.
__host__ __device__ __forceinline__ int2 simtTileCoord(int e)
{
    return make_int2((e >> 6) * 4 + ((e >> 3) & 3), ((e >> 5) & 1) * 8 + (e & 7));
}

__global__ void __launch_bounds__(256) gemmSimtF32Kernel(float const* __restrict__ A, float const* __restrict__ Bt,
    int ldb, float const* __restrict__ scales, float* __restrict__ C, int M, int N, int K, int* __restrict__ flagged,
    int rowBase)
{
    // Transposed tiles (k-major): the inner product reads 4 consecutive rows / columns per thread as one float4
    // (a quarter-warp reads 8 distinct 16-byte slots of Bs, one slot of As).
    __shared__ __align__(16) float As[kSimtBK][kSimtLd];
    __shared__ __align__(16) float Bs[kSimtBK][kSimtLd];
    __shared__ int rowFlag[kSimtTile];

    int const tx = threadIdx.x % 16;  // 4 columns each
    int const ty = threadIdx.x / 16;  // 4 rows each
    int const m0 = blockIdx.y * kSimtTile;
    int const n0 = blockIdx.x * kSimtTile;
    bool const detect = flagged != nullptr && blockIdx.x == 0;
    bool bad[4] = {};
    if (detect && threadIdx.x < kSimtTile)
    {
        rowFlag[threadIdx.x] = 0;
    }

    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += kSimtBK)
    {
#pragma unroll
        for (int l = 0; l < 4; ++l)
        {
            int2 const rk = simtTileCoord(threadIdx.x + l * 256);
            int const gk = k0 + rk.y;
            float const a = (m0 + rk.x < M && gk < K) ? A[static_cast<int64_t>(m0 + rk.x) * K + gk] : 0.f;
            bad[l] = bad[l] || (detect && isNonFinite(a));
            As[rk.y][rk.x] = a;
            Bs[rk.y][rk.x] = (n0 + rk.x < N && gk < K) ? Bt[static_cast<int64_t>(n0 + rk.x) * ldb + gk] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kSimtBK; ++kk)
        {
            float4 const av = *reinterpret_cast<float4 const*>(&As[kk][ty * 4]);
            float4 const bv = *reinterpret_cast<float4 const*>(&Bs[kk][tx * 4]);
            float const a[4] = {av.x, av.y, av.z, av.w};
            float const b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    if (detect)
    {
        int rowOf[4];
#pragma unroll
        for (int l = 0; l < 4; ++l)
            rowOf[l] = simtTileCoord(threadIdx.x + l * 256).x;
        appendFlaggedRows<kSimtTile>(rowFlag, bad, rowOf, m0, M, rowBase, flagged);
    }
    float s[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
    {
        int const gn = n0 + tx * 4 + j;
        s[j] = scales != nullptr && gn < N ? __ldg(scales + gn) : 1.f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        int const gm = m0 + ty * 4 + i;
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            int const gn = n0 + tx * 4 + j;
            if (gm < M && gn < N)
            {
                C[static_cast<int64_t>(gm) * N + gn] = acc[i][j] * s[j];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------
size_t actBytes(int actType)
{
    return actType == kROCKET_ACT_FP32 ? 4 : 2;
}

size_t alignUp(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

//! Leading dimension of the expanded V: rank rounded up to 8 elements so that its rows are 16-byte vectors.
int expandedLd(int rank)
{
    return (rank + 7) / 8 * 8;
}

bool prefillNeedsExpansion(int rank, int keep, int valueType)
{
    return !(keep == rank && valueType == kROCKET_VALUES_SAME);
}

//! Workspace bytes of the expanded V (the fix-up row list follows it when keep < rank).
size_t expandedBytes(int rank, int outFeatures, int actType)
{
    return alignUp(static_cast<size_t>(outFeatures) * static_cast<size_t>(expandedLd(rank)) * actBytes(actType),
        kWorkspaceAlign);
}

//! Bytes of the list [count, rows...] of rows with non-finite activations (only needed when some rows are unkept).
size_t flaggedBytes(int64_t rows, int rank, int keep)
{
    return keep < rank ? alignUp(sizeof(int) * static_cast<size_t>(rows + 1), kWorkspaceAlign) : 0;
}

// ---- Logging (each fallback reason once per process) ------------------------------------------------------------
std::atomic<RocketSparseVLogFn> gLogFn{nullptr};
std::atomic<void*> gLogUser{nullptr};

enum LogOnce : unsigned
{
    kLOG_WS_SMALL = 1u,
    kLOG_WS_MISALIGNED = 2u,
    kLOG_NO_TENSOR_CORES = 4u,
    kLOG_ROWS_TOO_MANY = 8u
};
std::atomic<unsigned> gLogged{0};

void logOnce(unsigned reason, int severity, char const* fmt, ...)
{
    if (gLogged.fetch_or(reason) & reason)
    {
        return;
    }
    char msg[400];
    va_list args;
    va_start(args, fmt);
    vsnprintf(msg, sizeof(msg), fmt, args);
    va_end(args);
    RocketSparseVLogFn const fn = gLogFn.load();
    if (fn != nullptr)
    {
        fn(severity, msg, gLogUser.load());
    }
    else
    {
        fprintf(stderr, "rocket sparse V kernel %s: %s\n", severity == kROCKET_LOG_WARNING ? "warning" : "info", msg);
    }
}

//! Compute capability (major * 10 + minor) of the current device, cached per device.
int currentDeviceCC()
{
    constexpr int kMaxDevices = 64;
    static int cache[kMaxDevices] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0)
    {
        return 0;
    }
    if (dev < kMaxDevices && cache[dev] != 0)
    {
        return cache[dev];
    }
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    int const cc = major * 10 + minor;
    if (dev < kMaxDevices)
    {
        cache[dev] = cc;  // benign race: every writer stores the same value
    }
    return cc;
}

template <typename T>
bool tensorCoresAvailable(int cc)
{
    if (std::is_same<T, float>::value)
    {
        return true;  // SIMT path
    }
    return std::is_same<T, __nv_bfloat16>::value ? cc >= 80 : cc >= 70;
}

template <typename T, int BM, bool VECA>
void launchGemmTcB(T const* A, T const* Bt, int ldb, bool vecB, float const* scales, T* C, int M, int N, int K,
    int* flagged, int rowBase, cudaStream_t stream)
{
    dim3 const grid((N + kGemmBN - 1) / kGemmBN, (M + BM - 1) / BM);
    if (vecB)
        gemmWmmaKernel<T, BM, VECA, true><<<grid, kGemmThreads, 0, stream>>>(
            A, Bt, ldb, scales, C, M, N, K, flagged, rowBase);
    else
        gemmWmmaKernel<T, BM, VECA, false><<<grid, kGemmThreads, 0, stream>>>(
            A, Bt, ldb, scales, C, M, N, K, flagged, rowBase);
}

template <typename T>
cudaError_t launchGemmTc(T const* A, T const* Bt, int ldb, float const* scales, T* C, int M, int N, int K,
    int* flagged, int rowBase, cudaStream_t stream)
{
    bool const vecA = K % 8 == 0 && (reinterpret_cast<uintptr_t>(A) & 15u) == 0;
    bool const vecB = ldb % 8 == 0 && (reinterpret_cast<uintptr_t>(Bt) & 15u) == 0;
    // Scalar A tiles need 8x the staging registers: keep those to the 64-row tile (no spills).
    if (vecA && M > 64)
        launchGemmTcB<T, 128, true>(A, Bt, ldb, vecB, scales, C, M, N, K, flagged, rowBase, stream);
    else if (vecA)
        launchGemmTcB<T, 64, true>(A, Bt, ldb, vecB, scales, C, M, N, K, flagged, rowBase, stream);
    else
        launchGemmTcB<T, 64, false>(A, Bt, ldb, vecB, scales, C, M, N, K, flagged, rowBase, stream);
    return cudaGetLastError();
}

//! C = A @ B (+ column scales); `flagged` (may be null): the fix-up list the GEMM appends rows with inf / nan to.
template <typename T>
cudaError_t launchGemm(T const* A, T const* Bt, int ldb, float const* scales, T* C, int64_t M, int N, int K,
    int* flagged, cudaStream_t stream)
{
    // grid.y is limited to 65535 blocks: split very tall problems.
    constexpr int64_t kMaxRowsPerLaunch = int64_t{65535} * 64;
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRowsPerLaunch)
    {
        int const m = static_cast<int>(M - r0 < kMaxRowsPerLaunch ? M - r0 : kMaxRowsPerLaunch);
        T const* a = A + r0 * K;
        T* c = C + r0 * N;
        int const rowBase = static_cast<int>(r0);  // the caller keeps M <= INT32_MAX when flagging
        cudaError_t err;
        if constexpr (std::is_same<T, float>::value)
        {
            dim3 const grid((N + kSimtTile - 1) / kSimtTile, (m + kSimtTile - 1) / kSimtTile);
            gemmSimtF32Kernel<<<grid, 256, 0, stream>>>(a, Bt, ldb, scales, c, m, N, K, flagged, rowBase);
            err = cudaGetLastError();
        }
        else
        {
            err = launchGemmTc<T>(a, Bt, ldb, scales, c, m, N, K, flagged, rowBase, stream);
        }
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

//! Recompute the flagged rows with the decode kernel (see sparseVFixupKernel).
template <typename T, typename VT>
cudaError_t launchFixup(T const* t, VT const* values, uint8_t const* mask, float const* scales, T* y, int const* flagged,
    int rank, int keep, int outFeatures, cudaStream_t stream)
{
    constexpr int MAXR = kDecodeMaxRows;
    constexpr int CPW = DecodeCols<MAXR>::kValue;
    int const maskBytes = (rank + 7) / 8;
    int const sliceWords = min(DecodeSlice<MAXR>::kWords, (rank + kWarpSize - 1) / kWarpSize);
    size_t const smem = static_cast<size_t>(MAXR) * sliceWords * kWarpSize * sizeof(float);
    int const colsPerBlock = kDecodeWarps * CPW;
    dim3 const grid((outFeatures + colsPerBlock - 1) / colsPerBlock);
    bool const aligned4 = maskBytes % 4 == 0 && (reinterpret_cast<uintptr_t>(mask) & 3u) == 0;
    sparseVFixupKernel<T, VT><<<grid, kDecodeWarps * kWarpSize, smem, stream>>>(
        t, values, mask, scales, y, flagged, rank, keep, outFeatures, maskBytes, sliceWords, aligned4);
    return cudaGetLastError();
}

template <typename T, typename VT>
cudaError_t launchPrefill(T const* t, VT const* values, uint8_t const* mask, float const* scales, T* y, int64_t rows,
    int rank, int keep, int outFeatures, int actType, int valueType, void* workspace, cudaStream_t stream)
{
    T const* bt = nullptr;
    int ldb = rank;
    // Some rows unkept: the GEMM's zeros would turn an unkept inf / nan into nan, so flag and fix up those rows.
    int* flagged = keep < rank
        ? reinterpret_cast<int*>(static_cast<char*>(workspace) + expandedBytes(rank, outFeatures, actType))
        : nullptr;
    if (prefillNeedsExpansion(rank, keep, valueType))
    {
        T* dense = static_cast<T*>(workspace);
        ldb = expandedLd(rank);
        int const maskBytes = (rank + 7) / 8;
        bool const aligned4 = maskBytes % 4 == 0 && (reinterpret_cast<uintptr_t>(mask) & 3u) == 0;
        dim3 const grid((outFeatures + kExpandWarps - 1) / kExpandWarps);
        if (keep == rank)
            expandVKernel<VT, T, true><<<grid, kExpandWarps * kWarpSize, 0, stream>>>(
                values, mask, dense, ldb, rank, keep, outFeatures, maskBytes, aligned4, flagged);
        else
            expandVKernel<VT, T, false><<<grid, kExpandWarps * kWarpSize, 0, stream>>>(
                values, mask, dense, ldb, rank, keep, outFeatures, maskBytes, aligned4, flagged);
        cudaError_t const err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
        bt = dense;
    }
    else
    {
        bt = reinterpret_cast<T const*>(values);  // dense V^T already in the activation type
    }
    cudaError_t const err = launchGemm<T>(t, bt, ldb, valueType == kROCKET_VALUES_SAME ? nullptr : scales, y, rows,
        outFeatures, rank, flagged, stream);
    if (err != cudaSuccess || flagged == nullptr)
    {
        return err;
    }
    return launchFixup<T, VT>(t, values, mask, scales, y, flagged, rank, keep, outFeatures, stream);
}

template <typename F>
int dispatchTypes(int actType, int valueType, F&& f)
{
    auto byValue = [&](auto actTag) -> int {
        using T = typename decltype(actTag)::type;
        switch (valueType)
        {
        case kROCKET_VALUES_SAME: return f(actTag, TypeTag<T>{});
        case kROCKET_VALUES_INT8: return f(actTag, TypeTag<int8_t>{});
        case kROCKET_VALUES_FP8E4M3: return f(actTag, TypeTag<Fp8E4M3>{});
        default: return kROCKET_STATUS_INVALID_ARGUMENT;
        }
    };
    switch (actType)
    {
    case kROCKET_ACT_FP32: return byValue(TypeTag<float>{});
    case kROCKET_ACT_FP16: return byValue(TypeTag<__half>{});
    case kROCKET_ACT_BF16: return byValue(TypeTag<__nv_bfloat16>{});
    default: return kROCKET_STATUS_INVALID_ARGUMENT;
    }
}

} // namespace
} // namespace rocket

// =================================================================================================================
// C entry points
// =================================================================================================================
extern "C" void rocketSparseVSetLogger(RocketSparseVLogFn fn, void* user)
{
    rocket::gLogUser.store(user);
    rocket::gLogFn.store(fn);
}

extern "C" int rocketSparseVDecodeMaxRows(void)
{
    return rocket::kDecodeMaxRows;
}

extern "C" int rocketSparseVValidate(int64_t rows, int32_t rank, int32_t keep, int32_t outFeatures, int32_t actType,
    int32_t valueType, char* msg, size_t msgLen)
{
    char const* why = nullptr;
    char buf[160];
    if (rows < 0)
        why = "rows must be >= 0";
    else if (rank <= 0)
        why = "rank must be > 0";
    else if (keep <= 0 || keep > rank)
    {
        snprintf(buf, sizeof(buf), "keep must be in [1, rank=%d], got %d", rank, keep);
        why = buf;
    }
    else if (outFeatures <= 0)
        why = "out_features must be > 0";
    else if (actType < kROCKET_ACT_FP32 || actType > kROCKET_ACT_BF16)
        why = "activation type must be fp32, fp16 or bf16";
    else if (valueType < kROCKET_VALUES_SAME || valueType > kROCKET_VALUES_FP8E4M3)
        why = "value_type must be 0 (same as activations), 1 (int8 + scales) or 2 (fp8 e4m3 + scales)";
    else if (static_cast<int64_t>(outFeatures) * rank > (int64_t{1} << 40))
        why = "layer too large";
    if (why == nullptr)
    {
        return kROCKET_STATUS_SUCCESS;
    }
    if (msg != nullptr && msgLen > 0)
    {
        snprintf(msg, msgLen, "%s", why);
    }
    return kROCKET_STATUS_INVALID_ARGUMENT;
}

extern "C" size_t rocketSparseVWorkspaceSize(int64_t rows, int32_t rank, int32_t keep, int32_t outFeatures,
    int32_t actType, int32_t valueType, int32_t path)
{
    using namespace rocket;
    if (rocketSparseVValidate(rows, rank, keep, outFeatures, actType, valueType, nullptr, 0) != 0)
    {
        return 0;
    }
    bool const prefill = path == kROCKET_PATH_PREFILL || (path == kROCKET_PATH_AUTO && rows > kDecodeMaxRows);
    if (!prefill || !prefillNeedsExpansion(rank, keep, valueType))
    {
        return 0;
    }
    return expandedBytes(rank, outFeatures, actType) + flaggedBytes(rows, rank, keep);
}

extern "C" int rocketSparseVMatMul(void const* t, void const* values, uint8_t const* mask, float const* scales, void* y,
    int64_t rows, int32_t rank, int32_t keep, int32_t outFeatures, int32_t actType, int32_t valueType,
    void* workspace, size_t workspaceBytes, int32_t path, cudaStream_t stream)
{
    using namespace rocket;
    int const status = rocketSparseVValidate(rows, rank, keep, outFeatures, actType, valueType, nullptr, 0);
    if (status != kROCKET_STATUS_SUCCESS)
    {
        return status;
    }
    if (rows == 0)
    {
        return kROCKET_STATUS_SUCCESS;
    }
    if (t == nullptr || values == nullptr || y == nullptr || (keep < rank && mask == nullptr)
        || (valueType != kROCKET_VALUES_SAME && scales == nullptr))
    {
        return kROCKET_STATUS_INVALID_ARGUMENT;
    }
    if (path < kROCKET_PATH_AUTO || path > kROCKET_PATH_PREFILL)
    {
        return kROCKET_STATUS_INVALID_ARGUMENT;
    }
    float const* colScales = valueType == kROCKET_VALUES_SAME ? nullptr : scales;

    return dispatchTypes(actType, valueType, [&](auto actTag, auto valTag) -> int {
        using T = typename decltype(actTag)::type;
        using VT = typename decltype(valTag)::type;
        T const* tt = static_cast<T const*>(t);
        VT const* vv = static_cast<VT const*>(values);
        T* yy = static_cast<T*>(y);

        bool prefill = path == kROCKET_PATH_PREFILL || (path == kROCKET_PATH_AUTO && rows > kDecodeMaxRows);
        if (prefill)
        {
            // Without room for the expanded V (or without tensor cores for this type) the decode kernel is the
            // always-correct fallback: say so once, since it is much slower for many rows.
            size_t const need = rocketSparseVWorkspaceSize(rows, rank, keep, outFeatures, actType, valueType,
                kROCKET_PATH_PREFILL);
            int const cc = currentDeviceCC();
            if (need > 0 && (workspace == nullptr || workspaceBytes < need))
            {
                logOnce(kLOG_WS_SMALL, kROCKET_LOG_WARNING,
                    "prefill needs %zu bytes of workspace (rocketSparseVWorkspaceSize) for %lld rows x rank %d -> %d, "
                    "got %zu: using the slower decode kernel; pass the workspace size for the largest row count",
                    need, static_cast<long long>(rows), rank, outFeatures, workspace == nullptr ? size_t{0} : workspaceBytes);
                prefill = false;
            }
            else if (need > 0 && (reinterpret_cast<uintptr_t>(workspace) & (kWorkspaceAlign - 1)) != 0)
            {
                logOnce(kLOG_WS_MISALIGNED, kROCKET_LOG_WARNING,
                    "prefill workspace %p is not 256-byte aligned: using the slower decode kernel; pass an aligned "
                    "workspace (cudaMalloc / the framework allocator return aligned blocks)", workspace);
                prefill = false;
            }
            else if (!tensorCoresAvailable<T>(cc))
            {
                logOnce(kLOG_NO_TENSOR_CORES, kROCKET_LOG_INFO,
                    "no %s tensor cores on sm_%d: prefill uses the decode kernel", actType == kROCKET_ACT_BF16
                        ? "bf16" : "fp16", cc);
                prefill = false;
            }
            else if (keep < rank && rows > INT32_MAX)
            {
                logOnce(kLOG_ROWS_TOO_MANY, kROCKET_LOG_WARNING,
                    "%lld rows exceed the prefill fix-up list (int32): using the decode kernel",
                    static_cast<long long>(rows));
                prefill = false;
            }
        }
        cudaError_t const err = prefill
            ? launchPrefill<T, VT>(tt, vv, mask, colScales, yy, rows, rank, keep, outFeatures, actType, valueType,
                workspace, stream)
            : launchDecode<T, VT>(tt, vv, mask, colScales, yy, rows, rank, keep, outFeatures, stream);
        return static_cast<int>(err);
    });
}

extern "C" char const* rocketSparseVStatusString(int status)
{
    switch (status)
    {
    case kROCKET_STATUS_SUCCESS: return "success";
    case kROCKET_STATUS_INVALID_ARGUMENT: return "invalid argument to the ROCKET sparse V kernel";
    case kROCKET_STATUS_UNSUPPORTED: return "unsupported configuration for the ROCKET sparse V kernel";
    default: return cudaGetErrorString(static_cast<cudaError_t>(status));
    }
}
