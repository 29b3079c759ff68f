/*
 * TensorRT 10 plugin (IPluginV3) for the ROCKET sparse V product: op "RocketSparseVMatMul", namespace "rocket",
 * version "1" (see README.md in this folder for fields, inputs and formats).
 */
#ifndef ROCKET_SPARSE_V_PLUGIN_H
#define ROCKET_SPARSE_V_PLUGIN_H

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <string>
#include <vector>

#if !defined(NV_TENSORRT_MAJOR) || NV_TENSORRT_MAJOR < 10
#error "RocketSparseVPlugin needs the TensorRT 10 (or newer) headers: IPluginV3 / IPluginCreatorV3One"
#endif

#if defined(_WIN32)
#define ROCKET_TRT_EXPORT __declspec(dllexport)
#else
#define ROCKET_TRT_EXPORT __attribute__((visibility("default")))
#endif

namespace rocket
{
namespace trt
{

constexpr char const* kPLUGIN_NAME{"RocketSparseVMatMul"};
constexpr char const* kPLUGIN_VERSION{"1"};
constexpr char const* kPLUGIN_NAMESPACE{"rocket"};

// Tensor positions (inputs, then outputs, as in supportsFormatCombination's inOut array).
constexpr int32_t kIN_T{0};      //!< activations t [..., rank] (fp32 / fp16 / bf16)
constexpr int32_t kIN_VALUES{1}; //!< packed values [out_features, keep]
constexpr int32_t kIN_MASK{2};   //!< bitmask uint8 [out_features, ceil(rank / 8)]
constexpr int32_t kIN_SCALES{3}; //!< float32 [out_features], only when value_type != 0
constexpr int32_t kOUT_Y{0};     //!< y [..., out_features], activation dtype
constexpr int32_t kNB_OUTPUTS{1};

//! ONNX attribute value_type.
enum class ValueType : int32_t
{
    kSAME = 0,   //!< values in the activation type
    kINT8 = 1,   //!< int8 + float32 scale per output column
    kFP8E4M3 = 2 //!< fp8 e4m3 + float32 scale per output column
};

//! The plugin's attributes (= its serialized fields).
struct SparseVParams
{
    int32_t rank{0};
    int32_t keep{0};
    int32_t outFeatures{0};
    int32_t valueType{0};

    int32_t nbInputs() const noexcept
    {
        return valueType == static_cast<int32_t>(ValueType::kSAME) ? 3 : 4;
    }
    int32_t maskBytes() const noexcept
    {
        return (rank + 7) / 8;
    }
    //! Empty when valid, else why not.
    std::string validate() const;
    bool operator==(SparseVParams const& o) const noexcept
    {
        return rank == o.rank && keep == o.keep && outFeatures == o.outFeatures && valueType == o.valueType;
    }
};

class RocketSparseVPlugin : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime
{
public:
    RocketSparseVPlugin(std::string const& name, SparseVParams const& params);
    RocketSparseVPlugin(RocketSparseVPlugin const& other);
    RocketSparseVPlugin& operator=(RocketSparseVPlugin const&) = delete;
    ~RocketSparseVPlugin() override = default;

    SparseVParams const& params() const noexcept
    {
        return mParams;
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void buildFieldsToSerialize();
    void reportError(char const* what) const noexcept;
    bool checkIO(int32_t nbInputs, int32_t nbOutputs, char const* where) const noexcept;

    std::string mName;
    SparseVParams mParams;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
    nvinfer1::IErrorRecorder* mErrorRecorder{nullptr}; //!< from attachToContext; not owned
};

class RocketSparseVPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    RocketSparseVPluginCreator();
    ~RocketSparseVPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

    //! Parse and validate a field collection (exposed for tests). Returns false and sets `error` when invalid.
    static bool parseFields(nvinfer1::PluginFieldCollection const* fc, SparseVParams& params, std::string& error,
        std::vector<std::string>* warnings = nullptr);

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFC{};
};

//! Activation DataType -> kernel enum (-1 when unsupported).
int32_t toKernelActType(nvinfer1::DataType t) noexcept;

//! Logging through the ILogger that TensorRT handed to setLoggerFinder (stderr for errors when there is none).
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept;

} // namespace trt
} // namespace rocket

// Dynamic-loading entry points (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins, Python
// trt.get_plugin_registry().load_library): the registry calls setLoggerFinder and getCreators and registers what
// getCreators returns.
extern "C"
{
    ROCKET_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
    ROCKET_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
    //! Deprecated name of getCreators, kept for loaders that only look for it.
    ROCKET_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getPluginCreators(int32_t& nbCreators);
    //! Explicit registration for a library opened with plain dlopen / ctypes / linking, in the manner of
    //! initLibNvInferPlugins: registers the creator with TensorRT's global registry (TensorRT must be loaded).
    //! `logger` (an nvinfer1::ILogger*, may be null) receives the plugin's messages when no ILoggerFinder was set;
    //! `libNamespace` must be null, "" or "rocket". Idempotent; a later loadLibrary takes the registration over.
    ROCKET_TRT_EXPORT bool initRocketTrtPlugins(void* logger, char const* libNamespace);
}

#endif // ROCKET_SPARSE_V_PLUGIN_H
