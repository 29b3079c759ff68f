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

#include <stdio.h>

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
    int const rowsLeft = rank - word * 32;
    if (rowsLeft < 32)
    {
        bits &= rowsLeft <= 0 ? 0u : ((1u << rowsLeft) - 1u);
    }
    return bits;
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
 * Shared memory: float ts[rows][sliceWords * 32] (dynamic).
 */
// minBlocks 4 (<= 128 registers): without it ptxas for sm_90 picks ~48 registers and spills the accumulators.
template <typename T, typename VT, int MAXR, bool DENSE>
__global__ void __launch_bounds__(kDecodeWarps* kWarpSize, 4) sparseVDecodeKernel(T const* __restrict__ t,
    VT const* __restrict__ values, uint8_t const* __restrict__ mask, float const* __restrict__ scales,
    T* __restrict__ y, int rows, int rank, int keep, int outFeatures, int maskBytes, int sliceWords, bool maskAligned4)
{
    constexpr int CPW = DecodeCols<MAXR>::kValue;
    extern __shared__ float ts[];

    int const lane = threadIdx.x & (kWarpSize - 1);
    int const warp = threadIdx.x / kWarpSize;
    int const col0 = (blockIdx.x * kDecodeWarps + warp) * CPW;
    int const sliceRows = sliceWords * kWarpSize;
    uint32_t const lanesBelow = (1u << lane) - 1u;

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
            ts[e] = base + i < rank ? toFloat(t[static_cast<int64_t>(m) * rank + base + i]) : 0.f;
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
                        idx = pre + __popc(word & lanesBelow);
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
                    y[static_cast<int64_t>(m) * outFeatures + j] = fromFloat<T>(s * scale);
                }
            }
        }
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
//! unscaled (exact in fp16 / bf16 / fp32); the GEMM epilogue applies the column scale.
template <typename VT, typename CT, bool DENSE>
__global__ void __launch_bounds__(kExpandWarps* kWarpSize) expandVKernel(VT const* __restrict__ values,
    uint8_t const* __restrict__ mask, CT* __restrict__ dense, int ldDense, int rank, int keep, int outFeatures,
    int maskBytes, bool maskAligned4)
{
    int const lane = threadIdx.x & (kWarpSize - 1);
    int const j = blockIdx.x * kExpandWarps + threadIdx.x / kWarpSize;
    if (j >= outFeatures)
    {
        return;  // whole warp: no block-level synchronisation below
    }
    uint32_t const lanesBelow = (1u << lane) - 1u;
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
                int const idx = pre + __popc(word & lanesBelow);
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
constexpr int kGemmSmemLd = kGemmBK + 8;  // +8 halves (16 B): rows stay 32 B aligned for wmma, banks rotate

//! Global -> register staging of one BM x BK (A) or BN x BK (B) tile; 8-element (16 B) vectors when VEC.
template <typename T, int ROWS, bool VEC>
struct TileLoader
{
    static constexpr int kElemsPerLoad = VEC ? 8 : 1;
    static constexpr int kLoads = ROWS * kGemmBK / kElemsPerLoad / kGemmThreads;
    static_assert(kLoads >= 1, "tile too small for the block");
    using Vec = typename std::conditional<VEC, uint4, T>::type;

    Vec regs[kLoads];

    __device__ __forceinline__ void load(T const* src, int64_t ld, int row0, int rowsTotal, int k0, int K)
    {
#pragma unroll
        for (int l = 0; l < kLoads; ++l)
        {
            int const e = (threadIdx.x + l * kGemmThreads) * kElemsPerLoad;
            int const r = e / kGemmBK;
            int const kk = e - r * kGemmBK;
            int64_t const gr = row0 + r;
            int const gk = k0 + kk;
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

    __device__ __forceinline__ void store(T* smem) const
    {
#pragma unroll
        for (int l = 0; l < kLoads; ++l)
        {
            int const e = (threadIdx.x + l * kGemmThreads) * kElemsPerLoad;
            int const r = e / kGemmBK;
            int const kk = e - r * kGemmBK;
            if (VEC)
            {
                *reinterpret_cast<uint4*>(smem + r * kGemmSmemLd + kk) = reinterpret_cast<uint4 const&>(regs[l]);
            }
            else
            {
                smem[r * kGemmSmemLd + kk] = reinterpret_cast<T const&>(regs[l]);
            }
        }
    }
};

template <typename T, int BM, bool VECA, bool VECB>
__device__ __forceinline__ void gemmWmmaBody(T const* __restrict__ A, T const* __restrict__ Bt, int ldb,
    float const* __restrict__ scales, T* __restrict__ C, int M, int N, int K)
{
    using namespace nvcuda;
    constexpr int kWarpM = BM / 2;  // rows of C per warp
    constexpr int kWarpN = kGemmBN / 4;
    constexpr int FM = kWarpM / 16;
    constexpr int FN = kWarpN / 16;

    __shared__ __align__(128) T As[BM * kGemmSmemLd];
    __shared__ __align__(128) T Bs[kGemmBN * kGemmSmemLd];
    __shared__ __align__(128) float stage[kGemmThreads / kWarpSize][16 * 16];

    int const warp = threadIdx.x / kWarpSize;
    int const lane = threadIdx.x & (kWarpSize - 1);
    int const warpM = warp / 4;
    int const warpN = warp % 4;
    int const m0 = blockIdx.y * BM;
    int const n0 = blockIdx.x * kGemmBN;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
            wmma::fill_fragment(acc[i][j], 0.f);

    TileLoader<T, BM, VECA> aLoad;
    TileLoader<T, kGemmBN, VECB> bLoad;
    int const kTiles = (K + kGemmBK - 1) / kGemmBK;

    aLoad.load(A, K, m0, M, 0, K);
    bLoad.load(Bt, ldb, n0, N, 0, K);
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

    // Epilogue: through a per-warp 16x16 fp32 staging tile so that bounds, scale and conversion are per element.
    float* st = stage[warp];
#pragma unroll
    for (int i = 0; i < FM; ++i)
    {
#pragma unroll
        for (int j = 0; j < FN; ++j)
        {
            wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            int const rowBase = m0 + warpM * kWarpM + i * 16;
            int const colBase = n0 + warpN * kWarpN + j * 16;
#pragma unroll
            for (int e = lane * 8; e < lane * 8 + 8; ++e)
            {
                int const gm = rowBase + e / 16;
                int const gn = colBase + e % 16;
                if (gm < M && gn < N)
                {
                    float const s = scales != nullptr ? __ldg(scales + gn) : 1.f;
                    C[static_cast<int64_t>(gm) * N + gn] = fromFloat<T>(st[e] * s);
                }
            }
            __syncwarp();
        }
    }
}

template <typename T, int BM, bool VECA, bool VECB>
__global__ void __launch_bounds__(kGemmThreads) gemmWmmaKernel(T const* __restrict__ A, T const* __restrict__ Bt,
    int ldb, float const* __restrict__ scales, T* __restrict__ C, int M, int N, int K)
{
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
    {
#if __CUDA_ARCH__ >= 800
        gemmWmmaBody<T, BM, VECA, VECB>(A, Bt, ldb, scales, C, M, N, K);
#endif  // bf16 WMMA needs sm_80; the host never launches this below sm_80
    }
    else
    {
#if __CUDA_ARCH__ >= 700
        gemmWmmaBody<T, BM, VECA, VECB>(A, Bt, ldb, scales, C, M, N, K);
#endif
    }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Prefill path, step 2b: fp32 SIMT GEMM (exact fp32; 64x64 block tile, 4x4 outputs per thread)
// ---------------------------------------------------------------------------------------------------------------
constexpr int kSimtTile = 64;
constexpr int kSimtBK = 16;

__global__ void __launch_bounds__(256) gemmSimtF32Kernel(float const* __restrict__ A, float const* __restrict__ Bt,
    int ldb, float const* __restrict__ scales, float* __restrict__ C, int M, int N, int K)
{
    // Transposed tiles (k-major) so that the inner product reads 4 consecutive rows / columns per thread.
    __shared__ float As[kSimtBK][kSimtTile + 4];
    __shared__ float Bs[kSimtBK][kSimtTile + 4];

    int const tx = threadIdx.x % 16;  // 4 columns each
    int const ty = threadIdx.x / 16;  // 4 rows each
    int const m0 = blockIdx.y * kSimtTile;
    int const n0 = blockIdx.x * kSimtTile;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += kSimtBK)
    {
        // 64 x 16 elements per tile, 4 per thread; consecutive threads read consecutive k (coalesced 64 B runs).
#pragma unroll
        for (int l = 0; l < 4; ++l)
        {
            int const e = threadIdx.x + l * 256;
            int const r = e / kSimtBK;
            int const kk = e % kSimtBK;
            int const gk = k0 + kk;
            As[kk][r] = (m0 + r < M && gk < K) ? A[static_cast<int64_t>(m0 + r) * K + gk] : 0.f;
            Bs[kk][r] = (n0 + r < N && gk < K) ? Bt[static_cast<int64_t>(n0 + r) * ldb + gk] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kSimtBK; ++kk)
        {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                a[i] = As[kk][ty * 4 + i];
                b[i] = Bs[kk][tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
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
                float const s = scales != nullptr ? __ldg(scales + gn) : 1.f;
                C[static_cast<int64_t>(gm) * N + gn] = acc[i][j] * s;
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
    cudaStream_t stream)
{
    dim3 const grid((N + kGemmBN - 1) / kGemmBN, (M + BM - 1) / BM);
    if (vecB)
        gemmWmmaKernel<T, BM, VECA, true><<<grid, kGemmThreads, 0, stream>>>(A, Bt, ldb, scales, C, M, N, K);
    else
        gemmWmmaKernel<T, BM, VECA, false><<<grid, kGemmThreads, 0, stream>>>(A, Bt, ldb, scales, C, M, N, K);
}

template <typename T>
cudaError_t launchGemmTc(T const* A, T const* Bt, int ldb, float const* scales, T* C, int M, int N, int K,
    cudaStream_t stream)
{
    bool const vecA = K % 8 == 0 && (reinterpret_cast<uintptr_t>(A) & 15u) == 0;
    bool const vecB = ldb % 8 == 0 && (reinterpret_cast<uintptr_t>(Bt) & 15u) == 0;
    // Scalar A tiles need 8x the staging registers: keep those to the 64-row tile (no spills).
    if (vecA && M > 64)
        launchGemmTcB<T, 128, true>(A, Bt, ldb, vecB, scales, C, M, N, K, stream);
    else if (vecA)
        launchGemmTcB<T, 64, true>(A, Bt, ldb, vecB, scales, C, M, N, K, stream);
    else
        launchGemmTcB<T, 64, false>(A, Bt, ldb, vecB, scales, C, M, N, K, stream);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launchGemm(T const* A, T const* Bt, int ldb, float const* scales, T* C, int64_t M, int N, int K,
    cudaStream_t stream)
{
    // grid.y is limited to 65535 blocks: split very tall problems.
    constexpr int64_t kMaxRowsPerLaunch = int64_t{65535} * 64;
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRowsPerLaunch)
    {
        int const m = static_cast<int>(M - r0 < kMaxRowsPerLaunch ? M - r0 : kMaxRowsPerLaunch);
        T const* a = A + r0 * K;
        T* c = C + r0 * N;
        cudaError_t err;
        if constexpr (std::is_same<T, float>::value)
        {
            dim3 const grid((N + kSimtTile - 1) / kSimtTile, (m + kSimtTile - 1) / kSimtTile);
            gemmSimtF32Kernel<<<grid, 256, 0, stream>>>(a, Bt, ldb, scales, c, m, N, K);
            err = cudaGetLastError();
        }
        else
        {
            err = launchGemmTc<T>(a, Bt, ldb, scales, c, m, N, K, stream);
        }
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return cudaSuccess;
}

template <typename T, typename VT>
cudaError_t launchPrefill(T const* t, VT const* values, uint8_t const* mask, float const* scales, T* y, int64_t rows,
    int rank, int keep, int outFeatures, int valueType, void* workspace, cudaStream_t stream)
{
    T const* bt = nullptr;
    int ldb = rank;
    if (prefillNeedsExpansion(rank, keep, valueType))
    {
        T* dense = static_cast<T*>(workspace);
        ldb = expandedLd(rank);
        int const maskBytes = (rank + 7) / 8;
        bool const aligned4 = maskBytes % 4 == 0 && (reinterpret_cast<uintptr_t>(mask) & 3u) == 0;
        dim3 const grid((outFeatures + kExpandWarps - 1) / kExpandWarps);
        if (keep == rank)
            expandVKernel<VT, T, true><<<grid, kExpandWarps * kWarpSize, 0, stream>>>(
                values, mask, dense, ldb, rank, keep, outFeatures, maskBytes, aligned4);
        else
            expandVKernel<VT, T, false><<<grid, kExpandWarps * kWarpSize, 0, stream>>>(
                values, mask, dense, ldb, rank, keep, outFeatures, maskBytes, aligned4);
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
    return launchGemm<T>(t, bt, ldb, valueType == kROCKET_VALUES_SAME ? nullptr : scales, y, rows, outFeatures, rank,
        stream);
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
    return alignUp(static_cast<size_t>(outFeatures) * static_cast<size_t>(expandedLd(rank)) * actBytes(actType),
        kWorkspaceAlign);
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
            size_t const need = rocketSparseVWorkspaceSize(rows, rank, keep, outFeatures, actType, valueType,
                kROCKET_PATH_PREFILL);
            bool const wsOk = need == 0
                || (workspace != nullptr && workspaceBytes >= need
                    && (reinterpret_cast<uintptr_t>(workspace) & (kWorkspaceAlign - 1)) == 0);
            // Without room for the expanded V (or without tensor cores for this type) the decode kernel is the
            // always-correct fallback.
            prefill = wsOk && tensorCoresAvailable<T>(currentDeviceCC());
        }
        cudaError_t const err = prefill
            ? launchPrefill<T, VT>(tt, vv, mask, colScales, yy, rows, rank, keep, outFeatures, valueType, workspace,
                stream)
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
