/*
 * Sparse V product of a ROCKET-compressed linear layer:  y[rows, d_out] = t[rows, r] @ V[r, d_out]
 *
 * V is stored column by column in the packed ROCKET format (rocket_deploy/sparse_format.py):
 *   mask   uint8 [d_out, ceil(r/8)]   bit i of column j = byte i/8, bit i%8 (LSB first); exactly k bits per column
 *   values       [d_out, k]           kept values of column j in increasing row order (contiguous per column)
 *   scales float [d_out]              only for quantized values (int8 / fp8 e4m3): V[i, j] = q * scales[j]
 * When k == r ("dense V") values is V^T and the mask (all ones) is not read.
 *
 * Non-finite activations: y[m, j] sums only the basis rows that column j keeps, on every path. An inf / nan in t at a
 * row that column j does not keep never reaches y[:, j]; one at a kept row propagates as IEEE arithmetic says (inf,
 * or nan for inf * 0, inf - inf, nan). The prefill GEMM multiplies the zeros of the expanded V, so it flags the rows
 * of t that hold a non-finite value and recomputes exactly those rows with the decode kernel (same stream).
 *
 * Plain C interface: no TensorRT and no torch types, so the TensorRT plugin and the torch extension compile the
 * same .cu file. All functions are thread-safe; launches go to the given stream and never synchronize.
 */
#ifndef ROCKET_SPARSE_V_KERNEL_H
#define ROCKET_SPARSE_V_KERNEL_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Activation (and output) element type. */
typedef enum RocketActType
{
    kROCKET_ACT_FP32 = 0,
    kROCKET_ACT_FP16 = 1,
    kROCKET_ACT_BF16 = 2
} RocketActType;

/* Element type of the packed values: the ONNX attribute value_type. */
typedef enum RocketValueType
{
    kROCKET_VALUES_SAME = 0,   /* same float type as the activations, no scales */
    kROCKET_VALUES_INT8 = 1,   /* int8 + float32 scale per output column */
    kROCKET_VALUES_FP8E4M3 = 2 /* fp8 e4m3 (OCP "fn" variant, as torch.float8_e4m3fn) + float32 scale per column */
} RocketValueType;

/* Kernel path: auto picks decode for rows <= rocketSparseVDecodeMaxRows(), prefill otherwise. */
typedef enum RocketSparseVPath
{
    kROCKET_PATH_AUTO = 0,
    kROCKET_PATH_DECODE = 1, /* warp per column, straight from the packed form; any rows (chunked by 16) */
    kROCKET_PATH_PREFILL = 2 /* expand V into the workspace, then a tiled tensor-core (fp16/bf16) or SIMT (fp32) GEMM */
} RocketSparseVPath;

/* Status codes besides cudaError_t values (which are returned as they are, all < 10000). */
enum
{
    kROCKET_STATUS_SUCCESS = 0,
    kROCKET_STATUS_INVALID_ARGUMENT = 10001,
    kROCKET_STATUS_UNSUPPORTED = 10002
};

/* Severity of a message handed to the log callback. */
enum
{
    kROCKET_LOG_WARNING = 1,
    kROCKET_LOG_INFO = 2
};

/* Where the launcher reports a fallback (each reason once per process): fn(severity, message, user). NULL restores
 * the default, a line on stderr. The TensorRT plugin routes it to TensorRT's logger, the torch extension to Python
 * warnings. */
typedef void (*RocketSparseVLogFn)(int severity, char const* message, void* user);
void rocketSparseVSetLogger(RocketSparseVLogFn fn, void* user);

/* Rows up to which the auto path uses the decode kernel. */
int rocketSparseVDecodeMaxRows(void);

/* Bytes of device workspace the launch needs for this shape on `path` (0 for the decode path, and for a dense
 * V whose values are already in the activation type): the expanded V, plus (keep < rank) a list of rows that hold
 * non-finite activations, 4 * (rows + 1) bytes. Monotone in rows, so the size for the largest rows of a range covers
 * every smaller row count. The workspace pointer must be 256-byte aligned. */
size_t rocketSparseVWorkspaceSize(int64_t rows, int32_t rank, int32_t keep, int32_t outFeatures, int32_t actType,
    int32_t valueType, int32_t path);

/* Check the arguments that do not need the device (ranks, types); returns kROCKET_STATUS_* and, on error, writes a
 * message to msg (msgLen bytes, may be NULL). */
int rocketSparseVValidate(int64_t rows, int32_t rank, int32_t keep, int32_t outFeatures, int32_t actType,
    int32_t valueType, char* msg, size_t msgLen);

/* y[rows, outFeatures] = t[rows, rank] @ V.  All pointers are device pointers to contiguous row-major tensors;
 * scales may be NULL only for kROCKET_VALUES_SAME; mask may be NULL when keep == rank. If the workspace is smaller
 * than rocketSparseVWorkspaceSize(..., path) or not 256-byte aligned (or the device has no tensor cores for the
 * type), the prefill path falls back to the (slower, same results) decode kernel and logs the reason once.
 * Returns 0, a cudaError_t value from the launch, or kROCKET_STATUS_*. */
int rocketSparseVMatMul(void const* t, void const* values, uint8_t const* mask, float const* scales, void* y,
    int64_t rows, int32_t rank, int32_t keep, int32_t outFeatures, int32_t actType, int32_t valueType,
    void* workspace, size_t workspaceBytes, int32_t path, cudaStream_t stream);

/* Text for a status code returned above (cudaGetErrorString for CUDA errors). */
char const* rocketSparseVStatusString(int status);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ROCKET_SPARSE_V_KERNEL_H */
