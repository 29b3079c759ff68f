// Torch binding of the ROCKET sparse V kernels (plugins_trt/kernels/rocketSparseVKernel.cu, the same file the
// TensorRT plugin compiles). Built on first use by rocket_deploy/runtime/kernel_ext.py.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "rocketSparseVKernel.h"

#include <optional>

namespace
{

int32_t actTypeOf(torch::ScalarType t)
{
    switch (t)
    {
    case torch::kFloat32: return kROCKET_ACT_FP32;
    case torch::kFloat16: return kROCKET_ACT_FP16;
    case torch::kBFloat16: return kROCKET_ACT_BF16;
    default: TORCH_CHECK(false, "rocket sparse_v_matmul: t must be float32, float16 or bfloat16, got ", t);
    }
    return -1;
}

//! value_type from the dtype of the packed values: the activation dtype (0), int8 (1) or float8_e4m3fn (2).
int32_t valueTypeOf(torch::ScalarType values, torch::ScalarType act)
{
    if (values == act)
        return kROCKET_VALUES_SAME;
    if (values == torch::kInt8)
        return kROCKET_VALUES_INT8;
    if (values == torch::kFloat8_e4m3fn)
        return kROCKET_VALUES_FP8E4M3;
    TORCH_CHECK(false, "rocket sparse_v_matmul: values must have t's dtype (", act,
        "), int8 or float8_e4m3fn (with scales), got ", values);
    return -1;
}

//! The launcher's one-time notes (prefill fell back to the decode kernel: workspace, no tensor cores) -> Python
//! warnings. Called from inside sparse_v_matmul, i.e. on the calling Python thread.
void kernelLog(int /*severity*/, char const* msg, void* /*user*/)
{
    TORCH_WARN("rocket sparse V kernel: ", msg);
}

} // namespace

// y[..., d_out] = t[..., rank] @ V, V packed as (values [d_out, keep], mask uint8 [d_out, ceil(rank/8)]).
// scales: float32 [d_out], required for int8 / fp8 values. path: 0 auto, 1 decode kernel, 2 prefill (expand + GEMM).
torch::Tensor sparse_v_matmul(torch::Tensor t, torch::Tensor values, torch::Tensor mask, int64_t rank,
    std::optional<torch::Tensor> scales, int64_t path)
{
    TORCH_CHECK(t.is_cuda(), "rocket sparse_v_matmul: t must be a CUDA tensor");
    TORCH_CHECK(values.device() == t.device(), "rocket sparse_v_matmul: values are on ", values.device(),
        ", t on ", t.device());
    TORCH_CHECK(t.dim() >= 1 && t.size(-1) == rank, "rocket sparse_v_matmul: t must be [..., rank=", rank,
        "], got ", t.sizes());
    TORCH_CHECK(values.dim() == 2, "rocket sparse_v_matmul: values must be [out_features, keep], got ",
        values.sizes());
    int32_t const act = actTypeOf(t.scalar_type());
    int32_t const valueType = valueTypeOf(values.scalar_type(), t.scalar_type());
    int64_t const outFeatures = values.size(0);
    int64_t const keep = values.size(1);
    TORCH_CHECK(keep >= 1 && keep <= rank, "rocket sparse_v_matmul: keep=", keep, " must be in [1, rank=", rank, "]");
    TORCH_CHECK(path >= 0 && path <= 2, "rocket sparse_v_matmul: path must be 0 (auto), 1 (decode) or 2 (prefill)");

    bool const dense = keep == rank;
    uint8_t const* maskPtr = nullptr;
    torch::Tensor maskC;
    if (!dense || mask.numel() > 0)
    {
        TORCH_CHECK(mask.device() == t.device(), "rocket sparse_v_matmul: mask is on ", mask.device(), ", t on ",
            t.device());
        TORCH_CHECK(mask.scalar_type() == torch::kUInt8 || mask.scalar_type() == torch::kInt8,
            "rocket sparse_v_matmul: mask must be uint8, got ", mask.scalar_type());
        TORCH_CHECK(mask.dim() == 2 && mask.size(0) == outFeatures && mask.size(1) == (rank + 7) / 8,
            "rocket sparse_v_matmul: mask must be [out_features=", outFeatures, ", ceil(rank/8)=", (rank + 7) / 8,
            "], got ", mask.sizes());
        maskC = mask.contiguous();
        maskPtr = static_cast<uint8_t const*>(maskC.data_ptr());
    }

    torch::Tensor scalesC;
    float const* scalesPtr = nullptr;
    if (valueType != kROCKET_VALUES_SAME)
    {
        TORCH_CHECK(scales.has_value() && scales->defined(), "rocket sparse_v_matmul: ", values.scalar_type(),
            " values need float32 scales [out_features]");
        TORCH_CHECK(scales->device() == t.device() && scales->scalar_type() == torch::kFloat32
                && scales->numel() == outFeatures,
            "rocket sparse_v_matmul: scales must be float32 [", outFeatures, "] on ", t.device());
        scalesC = scales->contiguous();
        scalesPtr = scalesC.data_ptr<float>();
    }

    c10::cuda::CUDAGuard guard(t.device());
    torch::Tensor tC = t.contiguous();
    torch::Tensor valuesC = values.contiguous();
    int64_t const rows = tC.numel() / rank;
    std::vector<int64_t> outShape(t.sizes().begin(), t.sizes().end());
    outShape.back() = outFeatures;
    torch::Tensor y = torch::empty(outShape, t.options());
    if (rows == 0 || outFeatures == 0)
    {
        return y;
    }

    size_t const wsBytes = rocketSparseVWorkspaceSize(rows, static_cast<int32_t>(rank), static_cast<int32_t>(keep),
        static_cast<int32_t>(outFeatures), act, valueType, static_cast<int32_t>(path));
    torch::Tensor ws;
    if (wsBytes > 0)
    {
        ws = torch::empty({static_cast<int64_t>(wsBytes)}, t.options().dtype(torch::kUInt8));  // caching allocator
    }
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(t.device().index()).stream();
    int const status = rocketSparseVMatMul(tC.data_ptr(), valuesC.data_ptr(), maskPtr, scalesPtr, y.data_ptr(), rows,
        static_cast<int32_t>(rank), static_cast<int32_t>(keep), static_cast<int32_t>(outFeatures), act, valueType,
        wsBytes > 0 ? ws.data_ptr() : nullptr, wsBytes, static_cast<int32_t>(path), stream);
    TORCH_CHECK(status == 0, "rocket sparse_v_matmul failed: ", rocketSparseVStatusString(status));
    return y;
}

int64_t workspace_size(int64_t rows, int64_t rank, int64_t keep, int64_t outFeatures, int64_t actType,
    int64_t valueType, int64_t path)
{
    return static_cast<int64_t>(rocketSparseVWorkspaceSize(rows, static_cast<int32_t>(rank),
        static_cast<int32_t>(keep), static_cast<int32_t>(outFeatures), static_cast<int32_t>(actType),
        static_cast<int32_t>(valueType), static_cast<int32_t>(path)));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "ROCKET sparse V product (packed bitmask + values) on CUDA";
    rocketSparseVSetLogger(&kernelLog, nullptr);
    m.def("sparse_v_matmul", &sparse_v_matmul, "y = t @ V from the packed V", py::arg("t"), py::arg("values"),
        py::arg("mask"), py::arg("rank"), py::arg("scales") = py::none(), py::arg("path") = 0);
    m.def("workspace_size", &workspace_size, "bytes of workspace for a shape", py::arg("rows"), py::arg("rank"),
        py::arg("keep"), py::arg("out_features"), py::arg("act_type"), py::arg("value_type"), py::arg("path") = 0);
    m.def("decode_max_rows", &rocketSparseVDecodeMaxRows);
}
