// ONNX Runtime CPU custom-op library: rocket.RocketSparseVMatMul (the op the TensorRT plugin implements).
//   y[..., d_out] = t[..., rank] @ V,  V (rank x d_out) packed per output column j as
//   mask uint8 [d_out, ceil(rank/8)] (bit i%8 of byte i/8 set = row i kept, LSB first) and
//   values [d_out, keep] (fp16 or fp32, kept rows in increasing order); see rocket_deploy/sparse_format.py.
// Unkept entries contribute nothing (a non-finite t in an unkept row is skipped, as the decode path does).
// V stays packed in memory; per column the values are expanded 8 rows at a time (AVX2+F16C permutes, or a
// scalar fallback chosen at run time). Columns are split over ORT's intra-op thread pool.
#include <onnxruntime_c_api.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

const OrtApi* g_api = nullptr;
constexpr int kApiVersion = 17;  // <= ORT_API_VERSION (21) of the 1.21 header; KernelContext_ParallelFor: 1.17+

float half_to_float(uint16_t h) {
  uint32_t s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, f;
  if (e == 0) {
    if (m == 0) { f = s; } else {  // subnormal
      e = 127 - 15 + 1;
      while (!(m & 0x400u)) { m <<= 1; --e; }
      f = s | (e << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (e == 31) {
    f = s | 0x7f800000u | (m << 13);
  } else {
    f = s | ((e + 127 - 15) << 23) | (m << 13);
  }
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

struct Lut {  // for a mask byte b: lane l takes packed value perm[b][l] (kept lanes), keep[b][l] = all-ones if kept
  int32_t perm[256][8];
  int32_t keep[256][8];
  Lut() {
    for (int b = 0; b < 256; ++b) {
      int c = 0;
      for (int l = 0; l < 8; ++l) {
        bool on = (b >> l) & 1;
        perm[b][l] = on ? c : 0;
        keep[b][l] = on ? -1 : 0;
        c += on;
      }
    }
  }
};
const Lut g_lut;

struct Job {
  const float* t;        // [m, rank]
  const void* values;    // [d_out, keep]
  bool fp16;
  const uint8_t* mask;   // [d_out, nb]
  float* y;              // [m, d_out]
  int64_t m, rank, keep, d_out, nb;
  bool avx2;
  int64_t cols_per_task;
};

float value_at(const Job& j, int64_t idx) {
  return j.fp16 ? half_to_float(static_cast<const uint16_t*>(j.values)[idx]) : static_cast<const float*>(j.values)[idx];
}

void columns_scalar(const Job& j, int64_t c0, int64_t c1) {
  std::vector<int32_t> rows(j.keep);
  std::vector<float> vals(j.keep);
  for (int64_t c = c0; c < c1; ++c) {
    const uint8_t* mk = j.mask + c * j.nb;
    int64_t n = 0;
    for (int64_t b = 0; b < j.nb && n < j.keep; ++b) {
      unsigned bits = mk[b];
      while (bits && n < j.keep) {
        int64_t i = b * 8 + __builtin_ctz(bits);
        bits &= bits - 1;
        if (i >= j.rank) break;
        rows[n] = static_cast<int32_t>(i);
        vals[n] = value_at(j, c * j.keep + n);
        ++n;
      }
    }
    for (int64_t r = 0; r < j.m; ++r) {
      const float* tr = j.t + r * j.rank;
      float acc = 0.f;
      for (int64_t q = 0; q < n; ++q) acc += vals[q] * tr[rows[q]];
      j.y[r * j.d_out + c] = acc;
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const Job& j, int64_t idx, int64_t total) {
  if (idx + 8 <= total) {
    if (j.fp16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
        static_cast<const uint16_t*>(j.values) + idx)));
    return _mm256_loadu_ps(static_cast<const float*>(j.values) + idx);
  }
  float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t q = 0; idx + q < total && q < 8; ++q) tmp[q] = value_at(j, idx + q);
  return _mm256_loadu_ps(tmp);
}

__attribute__((target("avx2,fma,f16c"))) void columns_avx2(const Job& j, int64_t c0, int64_t c1,
                                                            const float* tpad, int64_t rpad) {
  // tpad: t rows padded with zeros to rpad = nb*8 columns. dense[] / keep[]: one column of V expanded.
  std::vector<float> dense(rpad);
  std::vector<int32_t> keepbits(rpad);
  const int64_t total = j.d_out * j.keep;
  for (int64_t c = c0; c < c1; ++c) {
    const uint8_t* mk = j.mask + c * j.nb;
    int64_t idx = c * j.keep, end = idx + j.keep;
    for (int64_t b = 0; b < j.nb; ++b) {
      unsigned byte = mk[b];
      if (b * 8 + 8 > j.rank) byte &= (1u << (j.rank - b * 8)) - 1u;  // stray padding bits are ignored
      int cnt = __builtin_popcount(byte);
      if (idx + cnt > end) { byte = 0; cnt = 0; }                       // malformed mask: never read past column
      __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g_lut.perm[byte]));
      __m256i kb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g_lut.keep[byte]));
      __m256 v = cnt ? _mm256_permutevar8x32_ps(load8(j, idx, total), perm) : _mm256_setzero_ps();
      _mm256_storeu_ps(dense.data() + b * 8, _mm256_and_ps(v, _mm256_castsi256_ps(kb)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keepbits.data() + b * 8), kb);
      idx += cnt;
    }
    for (int64_t r = 0; r < j.m; ++r) {
      const float* tr = tpad + r * rpad;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t q = 0; q < rpad; q += 8) {
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(dense.data() + q), _mm256_loadu_ps(tr + q));
        acc = _mm256_add_ps(acc, _mm256_and_ps(p, _mm256_castsi256_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keepbits.data() + q)))));
      }
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
      j.y[r * j.d_out + c] = _mm_cvtss_f32(s);
    }
  }
}

struct AvxJob { const Job* j; const float* tpad; int64_t rpad; };

void task_scalar(void* p, size_t i) {
  const Job& j = *static_cast<const Job*>(p);
  int64_t c0 = static_cast<int64_t>(i) * j.cols_per_task, c1 = std::min(j.d_out, c0 + j.cols_per_task);
  columns_scalar(j, c0, c1);
}

void task_avx2(void* p, size_t i) {
  const AvxJob& a = *static_cast<const AvxJob*>(p);
  int64_t c0 = static_cast<int64_t>(i) * a.j->cols_per_task, c1 = std::min(a.j->d_out, c0 + a.j->cols_per_task);
  columns_avx2(*a.j, c0, c1, a.tpad, a.rpad);
}

bool cpu_has_avx2() {
  const char* force = std::getenv("ROCKET_ORT_SCALAR");
  if (force && force[0] == '1') return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

struct Kernel {
  int64_t rank = 0, keep = 0, d_out = 0, value_type = 0;
  bool avx2 = false;
};

OrtStatus* fail(const std::string& msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

#define RETURN_IF(expr) do { OrtStatus* _s = (expr); if (_s) return _s; } while (0)

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  auto* k = new Kernel();
  int64_t* dst[4] = {&k->rank, &k->keep, &k->d_out, &k->value_type};
  const char* names[4] = {"rank", "keep", "out_features", "value_type"};
  for (int i = 0; i < 4; ++i) {
    if (OrtStatus* s = api->KernelInfoGetAttribute_int64(info, names[i], dst[i])) {
      api->ReleaseStatus(s);
      delete k;
      return fail(std::string("RocketSparseVMatMul: missing int attribute '") + names[i] + "'");
    }
  }
  if (k->value_type != 0) {
    delete k;
    return fail("RocketSparseVMatMul: the CPU library supports value_type 0 (fp16/fp32 values) only");
  }
  if (k->rank <= 0 || k->keep <= 0 || k->keep > k->rank || k->d_out <= 0) {
    delete k;
    return fail("RocketSparseVMatMul: need 0 < keep <= rank and out_features > 0");
  }
  k->avx2 = cpu_has_avx2();
  *out = k;
  return nullptr;
}

OrtStatus* ORT_API_CALL compute(void* kp, OrtKernelContext* ctx) {
  const Kernel& k = *static_cast<Kernel*>(kp);
  const OrtValue *tv, *vv, *mv;
  RETURN_IF(g_api->KernelContext_GetInput(ctx, 0, &tv));
  RETURN_IF(g_api->KernelContext_GetInput(ctx, 1, &vv));
  RETURN_IF(g_api->KernelContext_GetInput(ctx, 2, &mv));
  OrtTensorTypeAndShapeInfo* info;
  RETURN_IF(g_api->GetTensorTypeAndShape(tv, &info));
  size_t nd;
  RETURN_IF(g_api->GetDimensionsCount(info, &nd));
  std::vector<int64_t> shape(nd);
  RETURN_IF(g_api->GetDimensions(info, shape.data(), nd));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF(g_api->GetTensorTypeAndShape(vv, &info));
  ONNXTensorElementDataType vt;
  RETURN_IF(g_api->GetTensorElementType(info, &vt));
  size_t vcount;
  RETURN_IF(g_api->GetTensorShapeElementCount(info, &vcount));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF(g_api->GetTensorTypeAndShape(mv, &info));
  size_t mcount;
  RETURN_IF(g_api->GetTensorShapeElementCount(info, &mcount));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  const int64_t nb = (k.rank + 7) / 8;
  if (nd < 1 || shape[nd - 1] != k.rank) return fail("RocketSparseVMatMul: t's last dim must equal rank");
  if (vt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && vt != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    return fail("RocketSparseVMatMul: values must be float16 or float32");
  if (static_cast<int64_t>(vcount) != k.d_out * k.keep) return fail("RocketSparseVMatMul: values must be [out_features, keep]");
  if (static_cast<int64_t>(mcount) != k.d_out * nb) return fail("RocketSparseVMatMul: mask must be uint8 [out_features, ceil(rank/8)]");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < nd; ++i) m *= shape[i];
  std::vector<int64_t> oshape(shape);
  oshape[nd - 1] = k.d_out;
  OrtValue* yv;
  RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, oshape.data(), nd, &yv));
  Job j;
  RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(tv), (void**)&j.t));
  RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(vv), const_cast<void**>(&j.values)));
  RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(mv), (void**)&j.mask));
  RETURN_IF(g_api->GetTensorMutableData(yv, (void**)&j.y));
  j.fp16 = vt == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  j.m = m; j.rank = k.rank; j.keep = k.keep; j.d_out = k.d_out; j.nb = nb; j.avx2 = k.avx2;
  if (m == 0) return nullptr;
  j.cols_per_task = 64;
  size_t tasks = static_cast<size_t>((k.d_out + j.cols_per_task - 1) / j.cols_per_task);
  if (k.avx2) {
    const int64_t rpad = nb * 8;
    std::vector<float> tpad(static_cast<size_t>(m * rpad), 0.f);
    for (int64_t r = 0; r < m; ++r) std::memcpy(tpad.data() + r * rpad, j.t + r * k.rank, sizeof(float) * k.rank);
    AvxJob a{&j, tpad.data(), rpad};
    return g_api->KernelContext_ParallelFor(ctx, task_avx2, tasks, 0, &a);
  }
  return g_api->KernelContext_ParallelFor(ctx, task_scalar, tasks, 0, &j);
}

void ORT_API_CALL destroy(void* k) { delete static_cast<Kernel*>(k); }

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "RocketSparseVMatMul"; }
const char* ORT_API_CALL op_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL in_type(const OrtCustomOp*, size_t i) {
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                                                              : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
size_t ORT_API_CALL in_count(const OrtCustomOp*) { return 3; }
ONNXTensorElementDataType ORT_API_CALL out_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t ORT_API_CALL out_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL io_char(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ORT_API_CALL in_mem(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL start_ver(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_ver(const OrtCustomOp*) { return 2147483647; }
int ORT_API_CALL zero_i(const OrtCustomOp*) { return 0; }
int ORT_API_CALL one_i(const OrtCustomOp*) { return 1; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = kApiVersion;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_ep;
  op.GetInputType = in_type;
  op.GetInputTypeCount = in_count;
  op.GetOutputType = out_type;
  op.GetOutputTypeCount = out_count;
  op.GetInputCharacteristic = io_char;
  op.GetOutputCharacteristic = io_char;
  op.GetInputMemoryType = in_mem;
  op.GetVariadicInputMinArity = one_i;
  op.GetVariadicInputHomogeneity = zero_i;
  op.GetVariadicOutputMinArity = one_i;
  op.GetVariadicOutputHomogeneity = zero_i;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.KernelDestroy = destroy;
  op.GetStartVersion = start_ver;
  op.GetEndVersion = end_ver;
  return op;
}

OrtCustomOp g_op = make_op();

}  // namespace

extern "C" __attribute__((visibility("default")))
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(kApiVersion);
  if (!g_api) return nullptr;
  OrtCustomOpDomain* dom = nullptr;
  for (const char* name : {"rocket", "trt.plugins"}) {
    RETURN_IF(g_api->CreateCustomOpDomain(name, &dom));
    RETURN_IF(g_api->CustomOpDomain_Add(dom, &g_op));
    RETURN_IF(g_api->AddCustomOpDomain(options, dom));
  }
  return nullptr;
}
