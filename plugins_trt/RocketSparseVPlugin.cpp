/*
 * TensorRT 10 IPluginV3 implementation of RocketSparseVMatMul (namespace "rocket", version "1").
 *
 * No exception crosses the library boundary: every entry point TensorRT calls is noexcept and catches everything.
 */
#include "RocketSparseVPlugin.h"

#include "kernels/rocketSparseVKernel.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <sstream>

#if !defined(_WIN32)
#include <dlfcn.h>
#endif

using namespace nvinfer1;

namespace rocket
{
namespace trt
{
namespace
{

// Field names (ONNX attribute names; the ONNX parser hands the node's attributes to createPlugin as fields).
constexpr char const* kFIELD_RANK{"rank"};
constexpr char const* kFIELD_KEEP{"keep"};
constexpr char const* kFIELD_OUT_FEATURES{"out_features"};
constexpr char const* kFIELD_VALUE_TYPE{"value_type"};
constexpr char const* kFIELD_PLUGIN_VERSION{"plugin_version"};
constexpr char const* kFIELD_PLUGIN_NAMESPACE{"plugin_namespace"};

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};
std::atomic<ILogger*> gExplicitLogger{nullptr};  //!< from initRocketTrtPlugins, used when no finder was set

char const* severityTag(ILogger::Severity s)
{
    switch (s)
    {
    case ILogger::Severity::kINTERNAL_ERROR: return "internal error";
    case ILogger::Severity::kERROR: return "error";
    case ILogger::Severity::kWARNING: return "warning";
    case ILogger::Severity::kINFO: return "info";
    case ILogger::Severity::kVERBOSE: return "verbose";
    }
    return "log";
}

std::string prefixed(std::string const& msg)
{
    return std::string("[") + kPLUGIN_NAMESPACE + "::" + kPLUGIN_NAME + "] " + msg;
}

//! Report to an error recorder when there is one, and always to the logger.
void reportTo(IErrorRecorder* recorder, ErrorCode code, std::string const& msg) noexcept
{
    try
    {
        std::string const text = prefixed(msg);
        if (recorder != nullptr)
        {
            recorder->reportError(code, text.c_str());
        }
        logMessage(ILogger::Severity::kERROR, msg);
    }
    catch (...)
    {
    }
}

DataType valuesDataType(int32_t valueType, DataType act) noexcept
{
    switch (static_cast<ValueType>(valueType))
    {
    case ValueType::kINT8: return DataType::kINT8;
    case ValueType::kFP8E4M3: return DataType::kFP8;
    case ValueType::kSAME: break;
    }
    return act;
}

//! Product of all but the last dimension (the flattened rows); -1 when a dimension is unknown (< 0).
int64_t leadingRows(Dims const& d) noexcept
{
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i)
    {
        if (d.d[i] < 0)
        {
            return -1;
        }
        rows *= d.d[i];
    }
    return rows;
}

//! Read one integer field of any integer type (the ONNX parser gives INT32; INT64 / INT16 / INT8 are accepted).
bool readIntField(PluginField const& f, int64_t& out, std::string& error)
{
    if (f.data == nullptr || f.length != 1)
    {
        error = std::string("field '") + f.name + "' must hold exactly one integer (length " + std::to_string(f.length)
            + ")";
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT64: out = *static_cast<int64_t const*>(f.data); return true;
    case PluginFieldType::kINT16: out = *static_cast<int16_t const*>(f.data); return true;
    case PluginFieldType::kINT8: out = *static_cast<int8_t const*>(f.data); return true;
    default: break;
    }
    error = std::string("field '") + f.name + "' must be an integer (INT32), got PluginFieldType "
        + std::to_string(static_cast<int32_t>(f.type));
    return false;
}

std::string readStringField(PluginField const& f)
{
    if (f.data == nullptr || f.length <= 0)
    {
        return {};
    }
    char const* p = static_cast<char const*>(f.data);
    // length may or may not count a terminating NUL.
    size_t n = static_cast<size_t>(f.length);
    while (n > 0 && p[n - 1] == '\0')
    {
        --n;
    }
    return std::string(p, n);
}

} // namespace

// ================================================================================================================
// Logging
// ================================================================================================================
void logMessage(ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        ILoggerFinder* finder = gLoggerFinder.load();
        ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
        if (logger == nullptr)
        {
            logger = gExplicitLogger.load();
        }
        std::string const text = prefixed(msg);
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else if (severity <= ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s: %s\n", severityTag(severity), text.c_str());
        }
    }
    catch (...)
    {
    }
}

int32_t toKernelActType(DataType t) noexcept
{
    switch (t)
    {
    case DataType::kFLOAT: return kROCKET_ACT_FP32;
    case DataType::kHALF: return kROCKET_ACT_FP16;
    case DataType::kBF16: return kROCKET_ACT_BF16;
    default: return -1;
    }
}

std::string SparseVParams::validate() const
{
    char msg[256] = {};
    if (valueType < 0 || valueType > 2)
    {
        return "value_type must be 0 (values in the activation type), 1 (int8 + scales) or 2 (fp8 e4m3 + scales), "
               "got "
            + std::to_string(valueType);
    }
    if (rocketSparseVValidate(0, rank, keep, outFeatures, kROCKET_ACT_FP32, valueType, msg, sizeof(msg)) != 0)
    {
        return std::string(msg) + " (rank=" + std::to_string(rank) + ", keep=" + std::to_string(keep)
            + ", out_features=" + std::to_string(outFeatures) + ")";
    }
    return {};
}

// ================================================================================================================
// RocketSparseVPlugin
// ================================================================================================================
RocketSparseVPlugin::RocketSparseVPlugin(std::string const& name, SparseVParams const& params)
    : mName(name)
    , mParams(params)
{
    buildFieldsToSerialize();
}

RocketSparseVPlugin::RocketSparseVPlugin(RocketSparseVPlugin const& other)
    : IPluginV3()
    , IPluginV3OneCore()
    , IPluginV3OneBuild()
    , IPluginV3OneRuntime()
    , mName(other.mName)
    , mParams(other.mParams)
    , mErrorRecorder(other.mErrorRecorder)
{
    buildFieldsToSerialize();  // fields point at this object's members, never at other's
}

void RocketSparseVPlugin::buildFieldsToSerialize()
{
    mFieldsToSerialize.clear();
    mFieldsToSerialize.emplace_back(kFIELD_RANK, &mParams.rank, PluginFieldType::kINT32, 1);
    mFieldsToSerialize.emplace_back(kFIELD_KEEP, &mParams.keep, PluginFieldType::kINT32, 1);
    mFieldsToSerialize.emplace_back(kFIELD_OUT_FEATURES, &mParams.outFeatures, PluginFieldType::kINT32, 1);
    mFieldsToSerialize.emplace_back(kFIELD_VALUE_TYPE, &mParams.valueType, PluginFieldType::kINT32, 1);
    mFCToSerialize.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
    mFCToSerialize.fields = mFieldsToSerialize.data();
}

void RocketSparseVPlugin::reportError(char const* what) const noexcept
{
    try
    {
        reportTo(mErrorRecorder, ErrorCode::kINVALID_ARGUMENT, std::string("'") + mName + "': " + what);
    }
    catch (...)
    {
    }
}

bool RocketSparseVPlugin::checkIO(int32_t nbInputs, int32_t nbOutputs, char const* where) const noexcept
{
    if (nbInputs == mParams.nbInputs() && nbOutputs == kNB_OUTPUTS)
    {
        return true;
    }
    try
    {
        std::ostringstream s;
        s << where << ": expected " << mParams.nbInputs() << " inputs (t, values, mask"
          << (mParams.nbInputs() == 4 ? ", scales" : "") << ") and 1 output for value_type=" << mParams.valueType
          << ", got " << nbInputs << " inputs and " << nbOutputs << " outputs";
        reportError(s.str().c_str());
    }
    catch (...)
    {
    }
    return false;
}

IPluginCapability* RocketSparseVPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    try
    {
        switch (type)
        {
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        }
    }
    catch (...)
    {
    }
    return nullptr;
}

IPluginV3* RocketSparseVPlugin::clone() noexcept
{
    try
    {
        return new RocketSparseVPlugin(*this);
    }
    catch (std::exception const& e)
    {
        reportError(e.what());
    }
    catch (...)
    {
        reportError("clone failed");
    }
    return nullptr;
}

char const* RocketSparseVPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* RocketSparseVPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* RocketSparseVPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t RocketSparseVPlugin::getNbOutputs() const noexcept
{
    return kNB_OUTPUTS;
}

int32_t RocketSparseVPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        if (!checkIO(nbInputs, nbOutputs, "getOutputDataTypes") || outputTypes == nullptr || inputTypes == nullptr)
        {
            return -1;
        }
        outputTypes[kOUT_Y] = inputTypes[kIN_T];  // y has the activation dtype
        return 0;
    }
    catch (...)
    {
    }
    return -1;
}

int32_t RocketSparseVPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    try
    {
        if (!checkIO(nbInputs, nbOutputs, "getOutputShapes") || inputs == nullptr || outputs == nullptr)
        {
            return -1;
        }
        DimsExprs const& t = inputs[kIN_T];
        if (t.nbDims < 1)
        {
            reportError("input t must have at least one dimension [..., rank]");
            return -1;
        }
        // Every leading dimension passes through (symbolic: batch, sequence, ... may be dynamic); the last one,
        // rank, becomes out_features.
        DimsExprs& y = outputs[kOUT_Y];
        y.nbDims = t.nbDims;
        for (int32_t i = 0; i + 1 < t.nbDims; ++i)
        {
            y.d[i] = t.d[i];
        }
        y.d[t.nbDims - 1] = exprBuilder.constant(mParams.outFeatures);
        return y.d[t.nbDims - 1] != nullptr ? 0 : -1;
    }
    catch (...)
    {
        reportError("getOutputShapes failed");
    }
    return -1;
}

bool RocketSparseVPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    try
    {
        if (inOut == nullptr || nbInputs != mParams.nbInputs() || nbOutputs != kNB_OUTPUTS || pos < 0
            || pos >= nbInputs + nbOutputs)
        {
            return false;
        }
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        // TensorRT asks position by position with the earlier ones already chosen, so later positions follow t.
        DataType const act = inOut[kIN_T].desc.type;
        if (pos == kIN_T)
        {
            return toKernelActType(desc.type) >= 0;
        }
        if (pos == kIN_VALUES)
        {
            return desc.type == valuesDataType(mParams.valueType, act);
        }
        if (pos == kIN_MASK)
        {
            // uint8 by the format; a parser that maps the initializer to INT8 gives the same bytes.
            return desc.type == DataType::kUINT8 || desc.type == DataType::kINT8;
        }
        if (pos == kIN_SCALES && nbInputs == 4)
        {
            return desc.type == DataType::kFLOAT;
        }
        // The output.
        return desc.type == act;
    }
    catch (...)
    {
    }
    return false;
}

int32_t RocketSparseVPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        if (!checkIO(nbInputs, nbOutputs, "configurePlugin") || in == nullptr || out == nullptr)
        {
            return -1;
        }
        auto fail = [&](std::string const& what) {
            reportError(what.c_str());
            return -1;
        };
        Dims const& t = in[kIN_T].desc.dims;
        if (t.nbDims < 1)
        {
            return fail("input t must have at least one dimension [..., rank]");
        }
        int64_t const lastT = t.d[t.nbDims - 1];
        if (lastT >= 0 && lastT != mParams.rank)
        {
            return fail("the last dimension of t is " + std::to_string(lastT) + ", expected rank="
                + std::to_string(mParams.rank));
        }
        Dims const& v = in[kIN_VALUES].desc.dims;
        if (v.nbDims != 2 || (v.d[0] >= 0 && v.d[0] != mParams.outFeatures) || (v.d[1] >= 0 && v.d[1] != mParams.keep))
        {
            return fail("values must be [out_features=" + std::to_string(mParams.outFeatures)
                + ", keep=" + std::to_string(mParams.keep) + "]");
        }
        Dims const& m = in[kIN_MASK].desc.dims;
        if (m.nbDims != 2 || (m.d[0] >= 0 && m.d[0] != mParams.outFeatures)
            || (m.d[1] >= 0 && m.d[1] != mParams.maskBytes()))
        {
            return fail("mask must be uint8 [out_features=" + std::to_string(mParams.outFeatures)
                + ", ceil(rank/8)=" + std::to_string(mParams.maskBytes()) + "]");
        }
        if (nbInputs == 4)
        {
            Dims const& s = in[kIN_SCALES].desc.dims;
            int64_t n = 1;
            for (int32_t i = 0; i < s.nbDims; ++i)
            {
                n = s.d[i] < 0 ? -1 : n * s.d[i];
                if (n < 0)
                {
                    break;
                }
            }
            if (n >= 0 && n != mParams.outFeatures)
            {
                return fail("scales must hold out_features=" + std::to_string(mParams.outFeatures) + " floats");
            }
        }
        return 0;
    }
    catch (...)
    {
        reportError("configurePlugin failed");
    }
    return -1;
}

size_t RocketSparseVPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const* /*outputs*/,
    int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        if (inputs == nullptr || nbInputs < 1)
        {
            return 0;
        }
        int32_t const act = toKernelActType(inputs[kIN_T].desc.type);
        int64_t const rowsMax = leadingRows(inputs[kIN_T].max);
        if (act < 0 || rowsMax < 0)
        {
            return 0;
        }
        // The size is monotone in rows: the profile's max covers every shape the engine runs.
        return rocketSparseVWorkspaceSize(rowsMax, mParams.rank, mParams.keep, mParams.outFeatures, act,
            mParams.valueType, kROCKET_PATH_AUTO);
    }
    catch (...)
    {
    }
    return 0;
}

int32_t RocketSparseVPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    try
    {
        if (!checkIO(nbInputs, nbOutputs, "onShapeChange") || in == nullptr)
        {
            return -1;
        }
        Dims const& t = in[kIN_T].dims;
        if (t.nbDims < 1 || t.d[t.nbDims - 1] != mParams.rank)
        {
            reportError("the last dimension of t must equal rank");
            return -1;
        }
        return 0;
    }
    catch (...)
    {
    }
    return -1;
}

int32_t RocketSparseVPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
        {
            reportError("enqueue: null tensor arrays");
            return -1;
        }
        int32_t const act = toKernelActType(inputDesc[kIN_T].type);
        int64_t const rows = leadingRows(inputDesc[kIN_T].dims);
        if (act < 0 || rows < 0)
        {
            reportError("enqueue: unsupported activation type or unknown shape");
            return -1;
        }
        float const* scales
            = mParams.nbInputs() == 4 ? static_cast<float const*>(inputs[kIN_SCALES]) : nullptr;
        // TensorRT provides at least getWorkspaceSize() for the profile's max shape, i.e. >= what this shape needs.
        size_t const wsBytes = workspace != nullptr ? rocketSparseVWorkspaceSize(rows, mParams.rank, mParams.keep,
                                   mParams.outFeatures, act, mParams.valueType, kROCKET_PATH_AUTO)
                                                    : 0;
        int const status = rocketSparseVMatMul(inputs[kIN_T], inputs[kIN_VALUES],
            static_cast<uint8_t const*>(inputs[kIN_MASK]), scales, outputs[kOUT_Y], rows, mParams.rank, mParams.keep,
            mParams.outFeatures, act, mParams.valueType, workspace, wsBytes, kROCKET_PATH_AUTO, stream);
        if (status != 0)
        {
            reportError((std::string("kernel launch failed: ") + rocketSparseVStatusString(status)).c_str());
            return -1;
        }
        return 0;
    }
    catch (...)
    {
        reportError("enqueue failed");
    }
    return -1;
}

IPluginV3* RocketSparseVPlugin::attachToContext(IPluginResourceContext* context) noexcept
{
    try
    {
        auto* p = new RocketSparseVPlugin(*this);
        p->mErrorRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
        return p;
    }
    catch (...)
    {
        reportError("attachToContext failed");
    }
    return nullptr;
}

PluginFieldCollection const* RocketSparseVPlugin::getFieldsToSerialize() noexcept
{
    return &mFCToSerialize;
}

// ================================================================================================================
// RocketSparseVPluginCreator
// ================================================================================================================
namespace
{
//! The kernel launcher's one-time fallback notes (small / misaligned workspace, no tensor cores) -> TensorRT's log.
void kernelLog(int severity, char const* msg, void* /*user*/)
{
    logMessage(severity == kROCKET_LOG_WARNING ? ILogger::Severity::kWARNING : ILogger::Severity::kINFO, msg);
}
} // namespace

RocketSparseVPluginCreator::RocketSparseVPluginCreator()
{
    rocketSparseVSetLogger(&kernelLog, nullptr);
    mFieldNames.emplace_back(kFIELD_RANK, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kFIELD_KEEP, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kFIELD_OUT_FEATURES, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kFIELD_VALUE_TYPE, nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFC.fields = mFieldNames.data();
}

char const* RocketSparseVPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* RocketSparseVPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* RocketSparseVPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* RocketSparseVPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

bool RocketSparseVPluginCreator::parseFields(
    PluginFieldCollection const* fc, SparseVParams& params, std::string& error, std::vector<std::string>* warnings)
{
    if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr) || fc->nbFields < 0)
    {
        error = "no plugin fields given (need rank, keep, out_features, value_type)";
        return false;
    }
    bool haveRank = false, haveKeep = false, haveOut = false, haveValueType = false;
    params = SparseVParams{};
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr)
        {
            continue;
        }
        std::string const name(f.name);
        int64_t v = 0;
        int32_t* target = nullptr;
        bool* seen = nullptr;
        if (name == kFIELD_RANK)
        {
            target = &params.rank;
            seen = &haveRank;
        }
        else if (name == kFIELD_KEEP)
        {
            target = &params.keep;
            seen = &haveKeep;
        }
        else if (name == kFIELD_OUT_FEATURES)
        {
            target = &params.outFeatures;
            seen = &haveOut;
        }
        else if (name == kFIELD_VALUE_TYPE)
        {
            target = &params.valueType;
            seen = &haveValueType;
        }
        else if (name == kFIELD_PLUGIN_VERSION || name == kFIELD_PLUGIN_NAMESPACE)
        {
            // The ONNX parser may forward the lookup attributes too; they must name this plugin if present.
            std::string const s = readStringField(f);
            char const* expect = name == kFIELD_PLUGIN_VERSION ? kPLUGIN_VERSION : kPLUGIN_NAMESPACE;
            if (f.type == PluginFieldType::kCHAR && !s.empty() && s != expect)
            {
                error = "field '" + name + "' is '" + s + "', this plugin is '" + expect + "'";
                return false;
            }
            continue;
        }
        else
        {
            if (warnings != nullptr)
            {
                warnings->push_back("ignoring unknown field '" + name + "'");
            }
            continue;
        }
        if (!readIntField(f, v, error))
        {
            return false;
        }
        if (v < INT32_MIN || v > INT32_MAX)
        {
            error = "field '" + name + "' = " + std::to_string(v) + " is out of the int32 range";
            return false;
        }
        *target = static_cast<int32_t>(v);
        *seen = true;
    }
    std::string missing;
    if (!haveRank)
        missing += " rank";
    if (!haveKeep)
        missing += " keep";
    if (!haveOut)
        missing += " out_features";
    if (!missing.empty())
    {
        error = "missing required field(s):" + missing;
        return false;
    }
    if (!haveValueType)
    {
        params.valueType = 0;  // the ONNX schema's default
    }
    error = params.validate();
    return error.empty();
}

IPluginV3* RocketSparseVPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        SparseVParams params;
        std::string error;
        std::vector<std::string> warnings;
        std::string const pluginName = name != nullptr ? name : "";
        if (!parseFields(fc, params, error, &warnings))
        {
            reportTo(nullptr, ErrorCode::kINVALID_ARGUMENT, "cannot create '" + pluginName + "': " + error);
            return nullptr;
        }
        for (auto const& w : warnings)
        {
            logMessage(ILogger::Severity::kWARNING, "'" + pluginName + "': " + w);
        }
        return new RocketSparseVPlugin(pluginName, params);
    }
    catch (std::exception const& e)
    {
        reportTo(nullptr, ErrorCode::kINTERNAL_ERROR, std::string("createPlugin failed: ") + e.what());
    }
    catch (...)
    {
        reportTo(nullptr, ErrorCode::kINTERNAL_ERROR, "createPlugin failed");
    }
    return nullptr;
}

// ================================================================================================================
// Registration
// ================================================================================================================
namespace
{

RocketSparseVPluginCreator& creatorInstance()
{
    static RocketSparseVPluginCreator sCreator;
    return sCreator;
}

#define ROCKET_STR2(x) #x
#define ROCKET_STR(x) ROCKET_STR2(x)

//! TensorRT's global registry, looked up at run time so that the library has no link-time dependency on libnvinfer
//! (header-only builds) and never aborts on a missing symbol: the process must already have libnvinfer loaded.
IPluginRegistry* findGlobalRegistry() noexcept
{
#if defined(_WIN32)
    return getPluginRegistry();
#else
    using GetRegistryFn = IPluginRegistry* (*) ();
    void* sym = dlsym(RTLD_DEFAULT, "getPluginRegistry");
    if (sym == nullptr)
    {
        // libnvinfer loaded with RTLD_LOCAL (e.g. by the tensorrt Python module): find it without loading it.
        void* handle = dlopen("libnvinfer.so." ROCKET_STR(NV_TENSORRT_MAJOR), RTLD_LAZY | RTLD_NOLOAD);
        if (handle != nullptr)
        {
            sym = dlsym(handle, "getPluginRegistry");
            dlclose(handle);  // drops only the reference that RTLD_NOLOAD took
        }
    }
    return sym != nullptr ? reinterpret_cast<GetRegistryFn>(sym)() : nullptr;
#endif
}

std::mutex gRegistrationMutex;
IPluginRegistry* gStaticRegistry{nullptr};  //!< where a load-time / explicit registration went (nullptr: none)

//! Register the creator with `registry` unless a creator of this name is there already (another copy of the
//! library, or an earlier call). Returns false when the registry refuses it.
bool registerWith(IPluginRegistry* registry) noexcept
{
    std::lock_guard<std::mutex> lock(gRegistrationMutex);
    if (registry->getCreator(kPLUGIN_NAME, kPLUGIN_VERSION, kPLUGIN_NAMESPACE) != nullptr)
    {
        return true;
    }
    if (!registry->registerCreator(creatorInstance(), kPLUGIN_NAMESPACE))
    {
        return false;
    }
    gStaticRegistry = registry;
    return true;
}

#if defined(ROCKET_ENABLE_STATIC_REGISTRATION)
/*
 * Opt-in (-DROCKET_STATIC_REGISTRATION=ON) load-time registration, the REGISTER_TENSORRT_PLUGIN mechanism, for loaders
 * that only dlopen (trtexec --staticPlugins, LD_PRELOAD, linking). Off by default: it runs inside dlopen, under the
 * dynamic loader's lock, and calls into TensorRT's registry, which IPluginRegistry::loadLibrary / trtexec
 * --dynamicPlugins may hold while they dlopen this library; the documented dynamic path is getCreators(), and plain
 * dlopen users call initRocketTrtPlugins() afterwards. TensorRT's own macro is not used: it calls
 * getPluginRegistry() directly (a hard libnvinfer dependency) and keeps its creator private, so getCreators() could
 * not hand the registration over to loadLibrary. ROCKET_TRT_NO_STATIC_REGISTRATION=1 skips it at run time.
 */
class StaticRegistrar
{
public:
    StaticRegistrar() noexcept
    {
        try
        {
            char const* off = std::getenv("ROCKET_TRT_NO_STATIC_REGISTRATION");
            if (off != nullptr && off[0] != '\0' && off[0] != '0')
            {
                return;
            }
            IPluginRegistry* registry = findGlobalRegistry();
            if (registry != nullptr)
            {
                registerWith(registry);  // no TensorRT in the process: loadLibrary / initRocketTrtPlugins will do it
            }
        }
        catch (...)
        {
        }
    }
};

StaticRegistrar gStaticRegistrar;
#endif

} // namespace
} // namespace trt
} // namespace rocket

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    rocket::trt::gLoggerFinder.store(finder);
}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    using namespace rocket::trt;
    try
    {
        static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&creatorInstance()};
        {
            // loadLibrary registers what we return and refuses names that are already registered: hand the
            // load-time registration over so that the loader's is the only one.
            std::lock_guard<std::mutex> lock(gRegistrationMutex);
            if (gStaticRegistry != nullptr)
            {
                gStaticRegistry->deregisterCreator(creatorInstance());
                gStaticRegistry = nullptr;
            }
        }
        nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
        return kCreators;
    }
    catch (...)
    {
    }
    nbCreators = 0;
    return nullptr;
}

extern "C" nvinfer1::IPluginCreatorInterface* const* getPluginCreators(int32_t& nbCreators)
{
    return getCreators(nbCreators);
}

extern "C" bool initRocketTrtPlugins(void* logger, char const* libNamespace)
{
    using namespace rocket::trt;
    try
    {
        if (logger != nullptr)
        {
            gExplicitLogger.store(static_cast<nvinfer1::ILogger*>(logger));
        }
        if (libNamespace != nullptr && libNamespace[0] != '\0' && std::strcmp(libNamespace, kPLUGIN_NAMESPACE) != 0)
        {
            logMessage(nvinfer1::ILogger::Severity::kERROR,
                std::string("initRocketTrtPlugins: namespace '") + libNamespace + "' requested; the exported ONNX "
                    "nodes name '" + kPLUGIN_NAMESPACE + "': pass \"" + kPLUGIN_NAMESPACE + "\" or \"\"");
            return false;
        }
        nvinfer1::IPluginRegistry* registry = findGlobalRegistry();
        if (registry == nullptr)
        {
            logMessage(nvinfer1::ILogger::Severity::kERROR,
                "initRocketTrtPlugins: TensorRT (libnvinfer) is not loaded in this process: load TensorRT first, or "
                "load this library with IPluginRegistry::loadLibrary / trtexec --dynamicPlugins");
            return false;
        }
        if (!registerWith(registry))
        {
            logMessage(nvinfer1::ILogger::Severity::kERROR, "initRocketTrtPlugins: the plugin registry refused the "
                                                           "RocketSparseVMatMul creator");
            return false;
        }
        return true;
    }
    catch (...)
    {
    }
    return false;
}
