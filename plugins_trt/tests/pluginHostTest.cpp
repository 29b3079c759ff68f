/*
 * Host-side test of librocket_trt_plugins.so: no GPU and no TensorRT library needed (headers only).
 *
 * Goes through the library's exported entry points exactly as TensorRT does: getCreators() -> IPluginCreatorV3One
 * -> createPlugin(PluginFieldCollection) -> capability interfaces. Checks field validation, the serialization
 * round trip, output shapes with dynamic dimensions (through a small fake IExprBuilder), output types, the
 * supportsFormatCombination answers and the workspace sizes.
 */
#include "RocketSparseVPlugin.h"
#include "kernels/rocketSparseVKernel.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;
int gChecks = 0;

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        ++gChecks;                                                                                                     \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);                                     \
        }                                                                                                              \
    } while (0)

// ---- A logger that records messages, handed to the library through setLoggerFinder -------------------------------
class RecordingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        messages.emplace_back(msg);
        if (severity <= Severity::kWARNING && verbose)
        {
            std::printf("  [logged] %s\n", msg);
        }
    }
    bool contains(char const* needle) const
    {
        for (auto const& m : messages)
        {
            if (m.find(needle) != std::string::npos)
            {
                return true;
            }
        }
        return false;
    }
    std::vector<std::string> messages;
    bool verbose{true};
};

class Finder : public ILoggerFinder
{
public:
    explicit Finder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};

// ---- Fake symbolic dimensions: either a constant or a named symbol (a dynamic dimension) --------------------------
class FakeDimImpl : public apiv::VDimensionExpr
{
public:
    FakeDimImpl(bool constant, int64_t value, std::string name)
        : mConstant(constant)
        , mValue(value)
        , mName(std::move(name))
    {
    }
    bool isConstant() const override
    {
        return mConstant;
    }
    int64_t getConstantValue() const override
    {
        return mConstant ? mValue : -1;
    }
    bool isSizeTensor() const override
    {
        return false;
    }
    std::string const& name() const
    {
        return mName;
    }

private:
    bool mConstant;
    int64_t mValue;
    std::string mName;
};

class FakeDim : public IDimensionExpr
{
public:
    explicit FakeDim(FakeDimImpl* impl)
    {
        mImpl = impl;
    }
    ~FakeDim() override = default;
    FakeDimImpl const* impl() const
    {
        return static_cast<FakeDimImpl const*>(mImpl);
    }
};

//! Owns every expression it creates (TensorRT's builder does the same).
class FakeExprPool
{
public:
    IDimensionExpr const* make(bool constant, int64_t value, std::string const& name)
    {
        mImpls.emplace_back(new FakeDimImpl(constant, value, name));
        mDims.emplace_back(new FakeDim(mImpls.back().get()));
        return mDims.back().get();
    }

private:
    std::vector<std::unique_ptr<FakeDimImpl>> mImpls;
    std::vector<std::unique_ptr<FakeDim>> mDims;
};

class FakeExprBuilderImpl : public apiv::VExprBuilder
{
public:
    explicit FakeExprBuilderImpl(FakeExprPool& pool)
        : mPool(pool)
    {
    }
    IDimensionExpr const* constant(int64_t value) override
    {
        return mPool.make(true, value, std::to_string(value));
    }
    IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return mPool.make(false, -1, "op");  // the plugin needs no arithmetic
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }

private:
    FakeExprPool& mPool;
};

class FakeExprBuilder : public IExprBuilder
{
public:
    explicit FakeExprBuilder(FakeExprBuilderImpl* impl)
    {
        mImpl = impl;
    }
    ~FakeExprBuilder() override = default;
};

// ---- Helpers ---------------------------------------------------------------------------------------------------------
//! A PluginFieldCollection that owns its data; copies stay valid (get() points the fields at this copy's data).
struct Fields
{
    struct Entry
    {
        std::string name;
        PluginFieldType type;
        int32_t i32{0};
        int64_t i64{0};
        float f32{0.f};
        std::string str;
    };
    std::deque<Entry> entries;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};

    Fields& i32(char const* name, int32_t v)
    {
        entries.push_back(Entry{name, PluginFieldType::kINT32, v, 0, 0.f, {}});
        return *this;
    }
    Fields& i64(char const* name, int64_t v)
    {
        entries.push_back(Entry{name, PluginFieldType::kINT64, 0, v, 0.f, {}});
        return *this;
    }
    Fields& f32(char const* name, float v)
    {
        entries.push_back(Entry{name, PluginFieldType::kFLOAT32, 0, 0, v, {}});
        return *this;
    }
    Fields& str(char const* name, std::string const& v)
    {
        entries.push_back(Entry{name, PluginFieldType::kCHAR, 0, 0, 0.f, v});
        return *this;
    }
    Entry& at(char const* name)
    {
        for (auto& e : entries)
        {
            if (e.name == name)
            {
                return e;
            }
        }
        std::fprintf(stderr, "test bug: no field %s\n", name);
        std::abort();
    }
    PluginFieldCollection const* get()
    {
        fields.clear();
        for (auto const& e : entries)
        {
            switch (e.type)
            {
            case PluginFieldType::kINT32: fields.emplace_back(e.name.c_str(), &e.i32, e.type, 1); break;
            case PluginFieldType::kINT64: fields.emplace_back(e.name.c_str(), &e.i64, e.type, 1); break;
            case PluginFieldType::kFLOAT32: fields.emplace_back(e.name.c_str(), &e.f32, e.type, 1); break;
            default:
                fields.emplace_back(
                    e.name.c_str(), e.str.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(e.str.size() + 1));
            }
        }
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return &fc;
    }
};

Fields layerFields(int32_t rank, int32_t keep, int32_t out, int32_t valueType)
{
    Fields f;
    f.str("plugin_version", "1").str("plugin_namespace", "rocket");
    f.i32("rank", rank).i32("keep", keep).i32("out_features", out).i32("value_type", valueType);
    return f;
}

// ---- A fake TensorRT plugin registry, exported by this executable as getPluginRegistry (the library finds it with
// dlsym(RTLD_DEFAULT) as it finds libnvinfer's): records what the library registers and when.
class FakeRegistry : public IPluginRegistry
{
public:
    struct Entry
    {
        IPluginCreatorInterface* creator;
        std::string ns;
    };
    std::vector<Entry> entries;
    int registerCalls{0};
    int deregisterCalls{0};

    static IPluginCreatorV3One* v3(IPluginCreatorInterface* c)
    {
        return std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0 ? static_cast<IPluginCreatorV3One*>(c)
                                                                                    : nullptr;
    }
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override
    {
        ++registerCalls;
        entries.push_back({&creator, ns != nullptr ? ns : ""});
        return true;
    }
    IPluginCreatorInterface* getCreator(
        AsciiChar const* const name, AsciiChar const* const version, AsciiChar const* const ns) noexcept override
    {
        for (auto const& e : entries)
        {
            IPluginCreatorV3One* c = v3(e.creator);
            if (c != nullptr && std::strcmp(c->getPluginName(), name) == 0 && std::strcmp(c->getPluginVersion(), version) == 0
                && e.ns == (ns != nullptr ? ns : ""))
            {
                return e.creator;
            }
        }
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const& creator) noexcept override
    {
        ++deregisterCalls;
        for (auto it = entries.begin(); it != entries.end(); ++it)
        {
            if (it->creator == &creator)
            {
                entries.erase(it);
                return true;
            }
        }
        return false;
    }
    // Not used by the library.
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override
    {
        return false;
    }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override
    {
        *n = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override
    {
        return false;
    }
    bool isParentSearchEnabled() const override
    {
        return false;
    }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override
    {
        return nullptr;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override
    {
        *n = 0;
        return nullptr;
    }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return 0;
    }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept
    {
        *n = 0;
        return nullptr;
    }
};

FakeRegistry& fakeRegistry()
{
    static FakeRegistry r;
    return r;
}

//! Load-time registration is opt-in; explicit registration goes through initRocketTrtPlugins; getCreators() (what
//! IPluginRegistry::loadLibrary calls) takes any earlier registration back so that the loader's is the only one.
void testRegistration(RecordingLogger& logger)
{
    std::printf("registration\n");
    FakeRegistry& r = fakeRegistry();
#if ROCKET_EXPECT_STATIC_REGISTRATION
    CHECK(r.registerCalls == 1 && r.entries.size() == 1);  // -DROCKET_STATIC_REGISTRATION=ON: registered in dlopen
#else
    CHECK(r.registerCalls == 0 && r.entries.empty());  // the default: nothing happens while the library loads
#endif
    logger.messages.clear();
    logger.verbose = false;
    CHECK(!initRocketTrtPlugins(nullptr, "other"));
    CHECK(logger.contains("namespace 'other'"));
    logger.verbose = true;
    CHECK(initRocketTrtPlugins(nullptr, "rocket"));
    CHECK(initRocketTrtPlugins(nullptr, nullptr));  // idempotent
    CHECK(r.entries.size() == 1 && r.entries[0].ns == "rocket");
    CHECK(r.getCreator("RocketSparseVMatMul", "1", "rocket") != nullptr);
    int32_t n = 0;
    getCreators(n);
    CHECK(n == 1 && r.entries.empty() && r.deregisterCalls >= 1);
    CHECK(initRocketTrtPlugins(nullptr, ""));  // after a hand-over an explicit call registers again
    getCreators(n);
    CHECK(r.entries.empty());
}

IPluginCreatorV3One* getRocketCreator()
{
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    if (creators == nullptr)
    {
        return nullptr;
    }
    for (int32_t i = 0; i < n; ++i)
    {
        InterfaceInfo const info = creators[i]->getInterfaceInfo();
        if (std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") != 0)
        {
            continue;
        }
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getPluginName(), "RocketSparseVMatMul") == 0)
        {
            return c;
        }
    }
    return nullptr;
}

struct PluginHandle
{
    std::unique_ptr<IPluginV3> plugin;
    IPluginV3OneCore* core{nullptr};
    IPluginV3OneBuild* build{nullptr};
    IPluginV3OneRuntime* runtime{nullptr};
};

PluginHandle wrap(IPluginV3* p)
{
    PluginHandle h;
    h.plugin.reset(p);
    if (p != nullptr)
    {
        h.core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
        h.build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
        h.runtime = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    }
    return h;
}

int32_t fieldInt(PluginFieldCollection const* fc, char const* name)
{
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        if (std::strcmp(fc->fields[i].name, name) == 0 && fc->fields[i].type == PluginFieldType::kINT32)
        {
            return *static_cast<int32_t const*>(fc->fields[i].data);
        }
    }
    return -999;
}

DynamicPluginTensorDesc tensorDesc(DataType type, std::vector<int64_t> const& dims, std::vector<int64_t> const& maxDims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.scale = 1.f;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    d.min.nbDims = d.max.nbDims = d.opt.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
        d.max.d[i] = maxDims[i];
        d.opt.d[i] = maxDims[i];
        d.min.d[i] = dims[i] < 0 ? 1 : dims[i];
    }
    return d;
}

// ---- Tests -----------------------------------------------------------------------------------------------------------
void testCreatorIdentity(IPluginCreatorV3One* creator)
{
    std::printf("creator identity\n");
    CHECK(std::strcmp(creator->getPluginName(), "RocketSparseVMatMul") == 0);
    CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), "rocket") == 0);
    PluginFieldCollection const* names = creator->getFieldNames();
    CHECK(names != nullptr && names->nbFields == 4);
    std::vector<std::string> expect{"rank", "keep", "out_features", "value_type"};
    for (int32_t i = 0; names != nullptr && i < names->nbFields && i < 4; ++i)
    {
        CHECK(expect[i] == names->fields[i].name);
        CHECK(names->fields[i].type == PluginFieldType::kINT32);
    }
    // getPluginCreators is the deprecated alias of getCreators.
    int32_t n1 = 0, n2 = 0;
    CHECK(getCreators(n1) == getPluginCreators(n2) && n1 == n2 && n1 == 1);
}

void testValidation(IPluginCreatorV3One* creator, RecordingLogger& logger)
{
    std::printf("field validation\n");
    struct Case
    {
        char const* what;
        Fields fields;
        char const* message;
    };
    std::vector<Case> bad;
    bad.push_back({"keep > rank", layerFields(64, 65, 32, 0), "keep must be in [1, rank=64]"});
    bad.push_back({"keep = 0", layerFields(64, 0, 32, 0), "keep must be in"});
    bad.push_back({"rank = 0", layerFields(0, 0, 32, 0), "rank must be > 0"});
    bad.push_back({"out_features < 0", layerFields(64, 32, -1, 0), "out_features must be > 0"});
    bad.push_back({"value_type = 3", layerFields(64, 32, 32, 3), "value_type must be 0"});
    {
        Fields f;
        f.i32("rank", 64).i32("out_features", 32);
        bad.push_back({"missing keep", f, "missing required field(s): keep"});
    }
    {
        Fields f = layerFields(64, 32, 32, 0);
        f.at("rank").type = PluginFieldType::kFLOAT32;
        f.at("rank").f32 = 64.f;
        bad.push_back({"float rank", f, "must be an integer"});
    }
    {
        Fields f = layerFields(64, 32, 32, 0);
        f.at("plugin_version").str = "2";
        bad.push_back({"wrong plugin_version", f, "this plugin is '1'"});
    }
    for (auto& c : bad)
    {
        logger.messages.clear();
        logger.verbose = false;
        IPluginV3* p = creator->createPlugin("bad", c.fields.get(), TensorRTPhase::kBUILD);
        logger.verbose = true;
        if (p != nullptr || !logger.contains(c.message))
        {
            std::fprintf(stderr, "  case '%s': plugin=%p, expected message '%s'; logged:\n", c.what,
                static_cast<void*>(p), c.message);
            for (auto const& m : logger.messages)
            {
                std::fprintf(stderr, "    %s\n", m.c_str());
            }
        }
        CHECK(p == nullptr);
        CHECK(logger.contains(c.message));
        delete p;
    }
    CHECK(creator->createPlugin("null", nullptr, TensorRTPhase::kBUILD) == nullptr);

    // Accepted variants: INT64 integers, no value_type (defaults to 0), an unknown extra field (warning only).
    {
        Fields f;
        f.i64("rank", 96).i64("keep", 40).i64("out_features", 17).i32("some_future_attribute", 7);
        logger.messages.clear();
        PluginHandle h = wrap(creator->createPlugin("int64", f.get(), TensorRTPhase::kBUILD));
        CHECK(h.plugin != nullptr);
        CHECK(logger.contains("ignoring unknown field 'some_future_attribute'"));
        if (h.runtime != nullptr)
        {
            PluginFieldCollection const* fc = h.runtime->getFieldsToSerialize();
            CHECK(fieldInt(fc, "rank") == 96 && fieldInt(fc, "keep") == 40 && fieldInt(fc, "out_features") == 17
                && fieldInt(fc, "value_type") == 0);
        }
    }
}

void testSerializationRoundTrip(IPluginCreatorV3One* creator)
{
    std::printf("serialization round trip\n");
    for (int32_t vt = 0; vt <= 2; ++vt)
    {
        Fields f = layerFields(576, 201, 1536, vt);
        PluginHandle a = wrap(creator->createPlugin("layer", f.get(), TensorRTPhase::kBUILD));
        CHECK(a.plugin && a.core && a.build && a.runtime);
        if (!a.runtime)
        {
            continue;
        }
        CHECK(std::strcmp(a.core->getPluginName(), "RocketSparseVMatMul") == 0);
        CHECK(std::strcmp(a.core->getPluginNamespace(), "rocket") == 0);
        CHECK(std::strcmp(a.core->getPluginVersion(), "1") == 0);
        PluginFieldCollection const* fc = a.runtime->getFieldsToSerialize();
        CHECK(fc != nullptr && fc->nbFields == 4);
        // What TensorRT stores in the engine is re-created at deserialization (runtime phase).
        PluginHandle b = wrap(creator->createPlugin("layer", fc, TensorRTPhase::kRUNTIME));
        CHECK(b.runtime != nullptr);
        if (!b.runtime)
        {
            continue;
        }
        PluginFieldCollection const* fc2 = b.runtime->getFieldsToSerialize();
        for (char const* name : {"rank", "keep", "out_features", "value_type"})
        {
            CHECK(fieldInt(fc, name) == fieldInt(fc2, name));
        }
        CHECK(fieldInt(fc2, "rank") == 576 && fieldInt(fc2, "keep") == 201 && fieldInt(fc2, "out_features") == 1536
            && fieldInt(fc2, "value_type") == vt);
        // clone() and attachToContext-style copies serialize the same and own their field storage.
        PluginHandle c = wrap(b.plugin->clone());
        CHECK(c.runtime != nullptr);
        if (c.runtime)
        {
            PluginFieldCollection const* fc3 = c.runtime->getFieldsToSerialize();
            CHECK(fc3 != fc2 && fc3->fields[0].data != fc2->fields[0].data);
            CHECK(fieldInt(fc3, "keep") == 201 && fieldInt(fc3, "value_type") == vt);
        }
        CHECK(a.build->getNbOutputs() == 1);
    }
}

void testOutputShapesAndTypes(IPluginCreatorV3One* creator)
{
    std::printf("output shapes and types\n");
    Fields f = layerFields(192, 64, 576, 0);
    PluginHandle h = wrap(creator->createPlugin("shapes", f.get(), TensorRTPhase::kBUILD));
    CHECK(h.build != nullptr);
    if (!h.build)
    {
        return;
    }
    FakeExprPool pool;
    FakeExprBuilderImpl builderImpl(pool);
    FakeExprBuilder builder(&builderImpl);

    // t [batch (dynamic), seq (dynamic), 192]; values, mask constant.
    DimsExprs in[3];
    in[0].nbDims = 3;
    in[0].d[0] = pool.make(false, -1, "batch");
    in[0].d[1] = pool.make(false, -1, "seq");
    in[0].d[2] = pool.make(true, 192, "192");
    in[1].nbDims = 2;
    in[1].d[0] = pool.make(true, 576, "576");
    in[1].d[1] = pool.make(true, 64, "64");
    in[2].nbDims = 2;
    in[2].d[0] = pool.make(true, 576, "576");
    in[2].d[1] = pool.make(true, 24, "24");
    DimsExprs out[1];
    CHECK(h.build->getOutputShapes(in, 3, nullptr, 0, out, 1, builder) == 0);
    CHECK(out[0].nbDims == 3);
    CHECK(out[0].d[0] == in[0].d[0] && out[0].d[1] == in[0].d[1]);  // dynamic dims pass through unchanged
    CHECK(out[0].d[2] != nullptr && out[0].d[2]->isConstant() && out[0].d[2]->getConstantValue() == 576);

    // 2-D and 1-D activations.
    DimsExprs in2[3] = {in[0], in[1], in[2]};
    in2[0].nbDims = 2;
    in2[0].d[0] = pool.make(false, -1, "rows");
    in2[0].d[1] = pool.make(true, 192, "192");
    CHECK(h.build->getOutputShapes(in2, 3, nullptr, 0, out, 1, builder) == 0);
    CHECK(out[0].nbDims == 2 && out[0].d[0] == in2[0].d[0] && out[0].d[1]->getConstantValue() == 576);
    in2[0].nbDims = 1;
    in2[0].d[0] = pool.make(true, 192, "192");
    CHECK(h.build->getOutputShapes(in2, 3, nullptr, 0, out, 1, builder) == 0);
    CHECK(out[0].nbDims == 1 && out[0].d[0]->getConstantValue() == 576);

    // Wrong input count for value_type 0 (a scales input) is refused.
    DimsExprs in4[4] = {in[0], in[1], in[2], in[1]};
    CHECK(h.build->getOutputShapes(in4, 4, nullptr, 0, out, 1, builder) != 0);

    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DataType inTypes[3] = {t, t, DataType::kUINT8};
        DataType outType = DataType::kINT32;
        CHECK(h.build->getOutputDataTypes(&outType, 1, inTypes, 3) == 0);
        CHECK(outType == t);
    }
}

void testFormats(IPluginCreatorV3One* creator)
{
    std::printf("supportsFormatCombination\n");
    DataType const acts[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16};
    for (int32_t vt = 0; vt <= 2; ++vt)
    {
        Fields f = layerFields(64, 32, 48, vt);
        PluginHandle h = wrap(creator->createPlugin("formats", f.get(), TensorRTPhase::kBUILD));
        CHECK(h.build != nullptr);
        if (!h.build)
        {
            continue;
        }
        int32_t const nbIn = vt == 0 ? 3 : 4;
        for (DataType act : acts)
        {
            std::vector<DynamicPluginTensorDesc> io;
            DataType const valueType = vt == 0 ? act : (vt == 1 ? DataType::kINT8 : DataType::kFP8);
            io.push_back(tensorDesc(act, {-1, -1, 64}, {4, 512, 64}));
            io.push_back(tensorDesc(valueType, {48, 32}, {48, 32}));
            io.push_back(tensorDesc(DataType::kUINT8, {48, 8}, {48, 8}));
            if (nbIn == 4)
            {
                io.push_back(tensorDesc(DataType::kFLOAT, {48}, {48}));
            }
            io.push_back(tensorDesc(act, {-1, -1, 48}, {4, 512, 48}));
            for (int32_t pos = 0; pos < nbIn + 1; ++pos)
            {
                CHECK(h.build->supportsFormatCombination(pos, io.data(), nbIn, 1));
            }
            // Mask handed over as INT8 is the same bytes: accepted.
            io[2].desc.type = DataType::kINT8;
            CHECK(h.build->supportsFormatCombination(2, io.data(), nbIn, 1));
            io[2].desc.type = DataType::kINT32;
            CHECK(!h.build->supportsFormatCombination(2, io.data(), nbIn, 1));
            io[2].desc.type = DataType::kUINT8;
            // Output must match t.
            DataType const other = act == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
            io[nbIn].desc.type = other;
            CHECK(!h.build->supportsFormatCombination(nbIn, io.data(), nbIn, 1));
            io[nbIn].desc.type = act;
            // Values of the wrong type.
            io[1].desc.type = vt == 0 ? other : DataType::kHALF;
            CHECK(!h.build->supportsFormatCombination(1, io.data(), nbIn, 1));
            io[1].desc.type = valueType;
            if (nbIn == 4)
            {
                io[3].desc.type = DataType::kHALF;
                CHECK(!h.build->supportsFormatCombination(3, io.data(), nbIn, 1));
                io[3].desc.type = DataType::kFLOAT;
            }
            // Non-linear formats are refused.
            io[0].desc.format = TensorFormat::kCHW32;
            CHECK(!h.build->supportsFormatCombination(0, io.data(), nbIn, 1));
            io[0].desc.format = TensorFormat::kLINEAR;
            // configurePlugin accepts the shapes and refuses a wrong rank.
            CHECK(h.build->configurePlugin(io.data(), nbIn, io.data() + nbIn, 1) == 0);
        }
        // Unsupported activation types.
        for (DataType bad : {DataType::kINT8, DataType::kINT32, DataType::kUINT8})
        {
            std::vector<DynamicPluginTensorDesc> io(nbIn + 1, tensorDesc(bad, {2, 64}, {2, 64}));
            CHECK(!h.build->supportsFormatCombination(0, io.data(), nbIn, 1));
        }
        // Wrong tensor count.
        std::vector<DynamicPluginTensorDesc> io(6, tensorDesc(DataType::kHALF, {2, 64}, {2, 64}));
        CHECK(!h.build->supportsFormatCombination(0, io.data(), nbIn + 1, 1));
    }
}

void testConfigureAndWorkspace(IPluginCreatorV3One* creator, RecordingLogger& logger)
{
    std::printf("configurePlugin and workspace sizes\n");
    int32_t const rank = 100, keep = 37, out = 300;  // rank not a multiple of 8: padded expansion
    for (int32_t vt = 0; vt <= 2; ++vt)
    {
        Fields f = layerFields(rank, keep, out, vt);
        PluginHandle h = wrap(creator->createPlugin("ws", f.get(), TensorRTPhase::kBUILD));
        if (!h.build)
        {
            CHECK(false);
            continue;
        }
        int32_t const nbIn = vt == 0 ? 3 : 4;
        DataType const act = DataType::kHALF;
        auto makeIO = [&](std::vector<int64_t> const& tDims, std::vector<int64_t> const& tMax) {
            std::vector<DynamicPluginTensorDesc> io;
            io.push_back(tensorDesc(act, tDims, tMax));
            io.push_back(tensorDesc(vt == 0 ? act : (vt == 1 ? DataType::kINT8 : DataType::kFP8), {out, keep},
                {out, keep}));
            io.push_back(tensorDesc(DataType::kUINT8, {out, (rank + 7) / 8}, {out, (rank + 7) / 8}));
            if (nbIn == 4)
            {
                io.push_back(tensorDesc(DataType::kFLOAT, {out}, {out}));
            }
            std::vector<int64_t> yDims = tDims, yMax = tMax;
            yDims.back() = out;
            yMax.back() = out;
            io.push_back(tensorDesc(act, yDims, yMax));
            return io;
        };
        // Decode-only profile (batch <= 4, seq == 1): no workspace.
        auto dec = makeIO({-1, 1, rank}, {4, 1, rank});
        CHECK(h.build->configurePlugin(dec.data(), nbIn, dec.data() + nbIn, 1) == 0);
        CHECK(h.build->getWorkspaceSize(dec.data(), nbIn, dec.data() + nbIn, 1) == 0);
        // Prefill profile: the expanded V, d_out x ceil8(rank) fp16, 256-byte aligned, then (keep < rank) the list of
        // rows with non-finite activations: count + one int per row of the profile's max (4 x 512).
        auto pre = makeIO({-1, -1, rank}, {4, 512, rank});
        size_t const ws = h.build->getWorkspaceSize(pre.data(), nbIn, pre.data() + nbIn, 1);
        size_t const expect = (static_cast<size_t>(out) * 104 * 2 + 255) / 256 * 256 + (4u * 2049u + 255) / 256 * 256;
        CHECK(ws == expect);
        CHECK(ws == rocketSparseVWorkspaceSize(2048, rank, keep, out, kROCKET_ACT_FP16, vt, kROCKET_PATH_AUTO));
        // A wrong last dimension of t is refused with a message.
        auto wrong = makeIO({-1, 1, rank + 1}, {4, 1, rank + 1});
        logger.messages.clear();
        logger.verbose = false;
        CHECK(h.build->configurePlugin(wrong.data(), nbIn, wrong.data() + nbIn, 1) != 0);
        logger.verbose = true;
        CHECK(logger.contains("expected rank=100"));
    }
    // Dense V in the activation type: the GEMM reads values in place, no workspace even for prefill.
    CHECK(rocketSparseVWorkspaceSize(4096, 256, 256, 512, kROCKET_ACT_FP16, kROCKET_VALUES_SAME, kROCKET_PATH_AUTO)
        == 0);
    CHECK(rocketSparseVWorkspaceSize(4096, 256, 256, 512, kROCKET_ACT_FP16, kROCKET_VALUES_INT8, kROCKET_PATH_AUTO)
        == 512u * 256u * 2u);
    CHECK(rocketSparseVWorkspaceSize(4096, 256, 100, 512, kROCKET_ACT_FP32, kROCKET_VALUES_SAME, kROCKET_PATH_AUTO)
        == 512u * 256u * 4u + (4u * 4097u + 255) / 256 * 256);
    // Monotone in rows (a profile's max covers its smaller shapes).
    for (int64_t rows = 17; rows < 3000; rows += 97)
    {
        CHECK(rocketSparseVWorkspaceSize(rows, 256, 100, 512, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO)
            <= rocketSparseVWorkspaceSize(rows + 1, 256, 100, 512, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO));
    }
    // Monotone in rows: at or below the decode limit nothing, above it the full expansion.
    int const limit = rocketSparseVDecodeMaxRows();
    CHECK(rocketSparseVWorkspaceSize(limit, 256, 100, 512, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO) == 0);
    CHECK(rocketSparseVWorkspaceSize(limit + 1, 256, 100, 512, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO) > 0);
    CHECK(rocketSparseVWorkspaceSize(1, 256, 100, 512, kROCKET_ACT_FP16, 0, kROCKET_PATH_PREFILL) > 0);
    // Invalid shapes ask for nothing and validate with a message.
    CHECK(rocketSparseVWorkspaceSize(64, 256, 300, 512, kROCKET_ACT_FP16, 0, kROCKET_PATH_AUTO) == 0);
    char msg[128] = {};
    CHECK(rocketSparseVValidate(1, 256, 300, 512, kROCKET_ACT_FP16, 0, msg, sizeof(msg)) == kROCKET_STATUS_INVALID_ARGUMENT);
    CHECK(std::strstr(msg, "keep must be in [1, rank=256]") != nullptr);
    // The launcher refuses bad arguments before touching the device.
    CHECK(rocketSparseVMatMul(nullptr, nullptr, nullptr, nullptr, nullptr, 4, 64, 32, 16, kROCKET_ACT_FP16, 0, nullptr,
              0, kROCKET_PATH_AUTO, nullptr)
        == kROCKET_STATUS_INVALID_ARGUMENT);
    CHECK(rocketSparseVMatMul(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 64, 32, 16, kROCKET_ACT_FP16, 0, nullptr,
              0, kROCKET_PATH_AUTO, nullptr)
        == kROCKET_STATUS_SUCCESS);  // zero rows: nothing to do
}

} // namespace

extern "C" IPluginRegistry* getPluginRegistry() noexcept
{
    return &fakeRegistry();
}

int main()
{
    RecordingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    std::printf("TensorRT headers %d.%d.%d\n", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH);
    testRegistration(logger);
    IPluginCreatorV3One* creator = getRocketCreator();
    CHECK(creator != nullptr);
    if (creator == nullptr)
    {
        std::fprintf(stderr, "getCreators() does not list RocketSparseVMatMul\n");
        return 1;
    }
    testCreatorIdentity(creator);
    testValidation(creator, logger);
    testSerializationRoundTrip(creator);
    testOutputShapesAndTypes(creator);
    testFormats(creator);
    testConfigureAndWorkspace(creator, logger);

    setLoggerFinder(nullptr);
    std::printf("%d checks, %d failed\n", gChecks, gFailures);
    if (gFailures == 0)
    {
        std::printf("ALL PASSED\n");
    }
    return gFailures == 0 ? 0 : 1;
}
