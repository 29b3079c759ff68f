// ONNX Runtime CPU custom-op library: rocket.RocketSparseVMatMul (the op the TensorRT plugin implements).
//   y[..., d_out] = t[..., rank] @ V,  V (rank x d_out) packed per output column j as
//   mask uint8 [d_out, ceil(rank/8)] (bit i%8 of byte i/8 set = row i kept, LSB first) and
//   values [d_out, keep] (fp16 or fp32, kept rows in increasing order); see rocket_deploy/sparse_format.py.
// Unkept entries contribute nothing (a non-finite t in an unkept row is skipped, as the decode path does).
// V stays packed in memory; per column the values are expanded 8 rows at a time in registers (AVX2+F16C permutes)
// and multiplied into up to 4 rows of t at once, or a scalar fallback chosen at run time. Columns are split over
// ORT's intra-op thread pool.
//
// rocket.RocketMatMulF16 (the `ort-packed` export target's dense products: U, uncompressed layers, lm_head):
//   y[..., N] = x[..., K] @ W^T,  x float32, W float16 [N, K] (a torch Linear weight's layout), y float32.
// W stays fp16 in memory (no fp32 copy at session start); each 8-wide chunk is converted with F16C and accumulated
// in fp32 (or a scalar fallback). One row: one output at a time (W read as one stream); more rows: 4 outputs x up to
// 3 rows per register block. Outputs are split over ORT's intra-op thread pool.
#include <onnxruntime_c_api.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
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

__attribute__((target("avx2,fma,f16c,popcnt"))) inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c,popcnt"))) inline __m256 load8(const Job& j, int64_t idx, int64_t total) {
  if (idx + 8 <= total) {
    if (j.fp16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
        static_cast<const uint16_t*>(j.values) + idx)));
    return _mm256_loadu_ps(static_cast<const float*>(j.values) + idx);
  }
  float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t q = 0; idx + q < total && q < 8; ++q) tmp[q] = value_at(j, idx + q);
  return _mm256_loadu_ps(tmp);
}

// One pass per column and block of R rows: each mask byte's 8 values are expanded in registers (LUT permute, unkept
// lanes zeroed) and multiplied into R accumulator pairs at once; all-zero bytes are skipped. FIN: every t is finite,
// so the zeroed lanes can go through an FMA (0 * finite adds an exact 0); otherwise the products of unkept lanes are
// masked off after the multiply (0 * inf would be NaN), as the decode path skips those rows.
template <int R, bool FIN>
__attribute__((target("avx2,fma,f16c,popcnt"), always_inline)) inline void column_byte(
    const Job& j, const uint8_t* mk, int64_t b, int64_t& idx, int64_t end, int64_t total, const float* tp,
    int64_t rpad, __m256 (&acc)[R]) {
  unsigned byte = mk[b];
  if (b * 8 + 8 > j.rank) byte &= (1u << (j.rank - b * 8)) - 1u;    // stray padding bits are ignored
  const int cnt = __builtin_popcount(byte);
  if (cnt == 0 || idx + cnt > end) return;                           // malformed mask: never read past column
  __m256 kb = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g_lut.keep[byte])));
  __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g_lut.perm[byte]));
  __m256 v = _mm256_and_ps(_mm256_permutevar8x32_ps(load8(j, idx, total), perm), kb);
  for (int r = 0; r < R; ++r) {
    __m256 tv = _mm256_loadu_ps(tp + r * rpad + b * 8);
    if (FIN) acc[r] = _mm256_fmadd_ps(v, tv, acc[r]);
    else acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(_mm256_mul_ps(v, tv), kb));
  }
  idx += cnt;
}

// The fast path of a well-formed column (its mask keeps exactly `keep` rows, and 8 values past its start are
// inside the array): no per-byte checks; an all-zero byte adds zeros.
template <int R, bool FIN, bool HALF>
__attribute__((target("avx2,fma,f16c,popcnt"), always_inline)) inline void fast_byte(
    unsigned byte, const void* vals, int64_t& idx, const float* tp, int64_t rpad, int64_t b, __m256 (&acc)[R]) {
  __m256 kb = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g_lut.keep[byte])));
  __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g_lut.perm[byte]));
  __m256 raw = HALF ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                          static_cast<const uint16_t*>(vals) + idx)))
                    : _mm256_loadu_ps(static_cast<const float*>(vals) + idx);
  __m256 v = _mm256_and_ps(_mm256_permutevar8x32_ps(raw, perm), kb);
  for (int r = 0; r < R; ++r) {
    __m256 tv = _mm256_loadu_ps(tp + r * rpad + b * 8);
    if (FIN) acc[r] = _mm256_fmadd_ps(v, tv, acc[r]);
    else acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(_mm256_mul_ps(v, tv), kb));
  }
  idx += __builtin_popcount(byte);
}

template <int R, bool FIN, bool HALF>
__attribute__((target("avx2,fma,f16c,popcnt"))) inline void fast_column(const Job& j, const uint8_t* mk, int64_t idx,
                                                                         unsigned last, const float* tp, int64_t rpad,
                                                                         __m256 (&a0)[R], __m256 (&a1)[R]) {
  int64_t b = 0;
  const int64_t full = j.nb - 1;               // the last byte (padding bits cleared: `last`) after the loop
  if (R <= 2) {                                // few rows: 4 accumulator sets, so the FMA latency is hidden
    __m256 a2[R], a3[R];
    for (int r = 0; r < R; ++r) a2[r] = a3[r] = _mm256_setzero_ps();
    for (; b + 4 <= full; b += 4) {
      fast_byte<R, FIN, HALF>(mk[b], j.values, idx, tp, rpad, b, a0);
      fast_byte<R, FIN, HALF>(mk[b + 1], j.values, idx, tp, rpad, b + 1, a1);
      fast_byte<R, FIN, HALF>(mk[b + 2], j.values, idx, tp, rpad, b + 2, a2);
      fast_byte<R, FIN, HALF>(mk[b + 3], j.values, idx, tp, rpad, b + 3, a3);
    }
    for (int r = 0; r < R; ++r) { a0[r] = _mm256_add_ps(a0[r], a2[r]); a1[r] = _mm256_add_ps(a1[r], a3[r]); }
  }
  for (; b + 2 <= full; b += 2) {
    fast_byte<R, FIN, HALF>(mk[b], j.values, idx, tp, rpad, b, a0);
    fast_byte<R, FIN, HALF>(mk[b + 1], j.values, idx, tp, rpad, b + 1, a1);
  }
  if (b < full) { fast_byte<R, FIN, HALF>(mk[b], j.values, idx, tp, rpad, b, a0); ++b; }
  fast_byte<R, FIN, HALF>(last, j.values, idx, tp, rpad, b, a1);
}

constexpr int64_t kAhead = 4;   // columns of V prefetched ahead

template <int R, bool FIN>
__attribute__((target("avx2,fma,f16c,popcnt"))) void columns_block(const Job& j, int64_t c0, int64_t c1,
                                                                    const float* tp, int64_t rpad) {
  const int64_t total = j.d_out * j.keep;
  const unsigned last_bits = (j.rank % 8) ? (1u << (j.rank % 8)) - 1u : 0xffu;
  const int64_t vbytes = j.keep * (j.fp16 ? 2 : 4);
  for (int64_t c = c0; c < c1; ++c) {
    // the value loads' addresses hang on the mask (popcounts): without prefetching, cache misses are not overlapped
    // (measured ~7x slower than in cache); so the lines of column c + kAhead are fetched now
    if (c + kAhead < j.d_out) {
      const char* vp = static_cast<const char*>(j.values) + (c + kAhead) * vbytes;
      for (int64_t o = 0; o < vbytes + 63; o += 64) _mm_prefetch(vp + o, _MM_HINT_T0);
      const char* mp = reinterpret_cast<const char*>(j.mask + (c + kAhead) * j.nb);
      for (int64_t o = 0; o < j.nb + 63; o += 64) _mm_prefetch(mp + o, _MM_HINT_T0);
    }
    const uint8_t* mk = j.mask + c * j.nb;
    int64_t idx = c * j.keep, end = idx + j.keep;
    __m256 a0[R], a1[R];                    // two accumulator sets (even / odd bytes) to overlap the FMA latency
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    const unsigned last = mk[j.nb - 1] & last_bits;
    int64_t kept = __builtin_popcount(last);
    for (int64_t b = 0; b + 1 < j.nb; ++b) kept += __builtin_popcount(mk[b]);
    if (kept == j.keep && end + 8 <= total) {
      if (j.fp16) fast_column<R, FIN, true>(j, mk, idx, last, tp, rpad, a0, a1);
      else fast_column<R, FIN, false>(j, mk, idx, last, tp, rpad, a0, a1);
    } else {                                // malformed mask or the array's last values: the checked path
      int64_t b = 0;
      for (; b + 2 <= j.nb; b += 2) {
        column_byte<R, FIN>(j, mk, b, idx, end, total, tp, rpad, a0);
        column_byte<R, FIN>(j, mk, b + 1, idx, end, total, tp, rpad, a1);
      }
      if (b < j.nb) column_byte<R, FIN>(j, mk, b, idx, end, total, tp, rpad, a0);
    }
    for (int r = 0; r < R; ++r) j.y[r * j.d_out + c] = hsum(_mm256_add_ps(a0[r], a1[r]));
  }
}

template <bool FIN>
__attribute__((target("avx2,fma,f16c,popcnt"))) void columns_rows(const Job& j, int64_t c0, int64_t c1,
                                                            const float* tpad, int64_t rpad) {
  // tpad: t rows padded with zeros to rpad = nb*8 columns; rows in blocks of 4 (one expansion per block)
  int64_t r = 0;
  Job jj = j;
  for (; r + 4 <= j.m; r += 4) { jj.y = j.y + r * j.d_out; columns_block<4, FIN>(jj, c0, c1, tpad + r * rpad, rpad); }
  jj.y = j.y + r * j.d_out;
  const float* tr = tpad + r * rpad;
  switch (j.m - r) {
    case 3: columns_block<3, FIN>(jj, c0, c1, tr, rpad); break;
    case 2: columns_block<2, FIN>(jj, c0, c1, tr, rpad); break;
    case 1: columns_block<1, FIN>(jj, c0, c1, tr, rpad); break;
    default: break;
  }
}

struct AvxJob { const Job* j; const float* tpad; int64_t rpad; bool finite; };

void task_scalar(void* p, size_t i) {
  const Job& j = *static_cast<const Job*>(p);
  int64_t c0 = static_cast<int64_t>(i) * j.cols_per_task, c1 = std::min(j.d_out, c0 + j.cols_per_task);
  columns_scalar(j, c0, c1);
}

void task_avx2(void* p, size_t i) {
  const AvxJob& a = *static_cast<const AvxJob*>(p);
  int64_t c0 = static_cast<int64_t>(i) * a.j->cols_per_task, c1 = std::min(a.j->d_out, c0 + a.j->cols_per_task);
  if (a.finite) columns_rows<true>(*a.j, c0, c1, a.tpad, a.rpad);
  else columns_rows<false>(*a.j, c0, c1, a.tpad, a.rpad);
}

bool cpu_has_avx2() {
  const char* force = std::getenv("ROCKET_ORT_SCALAR");
  if (force && force[0] == '1') return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("popcnt");
}


// ---- RocketMatMulF16 --------------------------------------------------------------------------------------------
struct MmJob {
  const float* x;       // [m, k]
  const uint16_t* w;    // [n, k] fp16
  float* y;             // [m, n]
  int64_t m, k, n, cols_per_task;
};

void mm_scalar(const MmJob& j, int64_t c0, int64_t c1) {
  std::vector<float> wrow(j.k);
  for (int64_t c = c0; c < c1; ++c) {
    const uint16_t* wr = j.w + c * j.k;
    for (int64_t q = 0; q < j.k; ++q) wrow[q] = half_to_float(wr[q]);
    for (int64_t r = 0; r < j.m; ++r) {
      const float* xr = j.x + r * j.k;
      float acc = 0.f;
      for (int64_t q = 0; q < j.k; ++q) acc += xr[q] * wrow[q];
      j.y[r * j.n + c] = acc;
    }
  }
}

__attribute__((target("avx2,fma,f16c,popcnt"))) inline __m256 ldh(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// C output columns (C <= 4) x R rows (R <= 3) starting at (r0, c0); k8 = k rounded down to 8, the tail is scalar.
template <int C, int R>
__attribute__((target("avx2,fma,f16c,popcnt"))) inline void mm_block(const MmJob& j, int64_t r0, int64_t c0) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const uint16_t* w[C];
  for (int c = 0; c < C; ++c) w[c] = j.w + (c0 + c) * j.k;
  const float* x[R];
  for (int r = 0; r < R; ++r) x[r] = j.x + (r0 + r) * j.k;
  const int64_t k8 = j.k & ~int64_t(7);
  for (int64_t q = 0; q < k8; q += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = ldh(w[c] + q);
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x[r] + q);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t q = k8; q < j.k; ++q) s += x[r][q] * half_to_float(w[c][q]);
      j.y[(r0 + r) * j.n + c0 + c] = s;
    }
}

template <int C>
__attribute__((target("avx2,fma,f16c,popcnt"))) void mm_cols(const MmJob& j, int64_t c0) {
  int64_t r = 0;
  for (; r + 3 <= j.m; r += 3) mm_block<C, 3>(j, r, c0);
  if (j.m - r == 2) mm_block<C, 2>(j, r, c0);
  else if (j.m - r == 1) mm_block<C, 1>(j, r, c0);
}

// one row (decode): one output at a time, k unrolled over 4 accumulators -- W is read as one sequential stream
__attribute__((target("avx2,fma,f16c,popcnt"))) void mm_row1(const MmJob& j, int64_t c0, int64_t c1) {
  const float* x = j.x;
  const int64_t k32 = j.k & ~int64_t(31), k8 = j.k & ~int64_t(7);
  for (int64_t c = c0; c < c1; ++c) {
    const uint16_t* w = j.w + c * j.k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t q = 0;
    for (; q < k32; q += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + q), ldh(w + q), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + q + 8), ldh(w + q + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + q + 16), ldh(w + q + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + q + 24), ldh(w + q + 24), a3);
    }
    for (; q < k8; q += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + q), ldh(w + q), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; q < j.k; ++q) s += x[q] * half_to_float(w[q]);
    j.y[c] = s;
  }
}

__attribute__((target("avx2,fma,f16c,popcnt"))) void mm_avx2(const MmJob& j, int64_t c0, int64_t c1) {
  if (j.m == 1) return mm_row1(j, c0, c1);
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) mm_cols<4>(j, c);
  for (; c < c1; ++c) mm_cols<1>(j, c);
}

void mm_task_scalar(void* p, size_t i) {
  const MmJob& j = *static_cast<const MmJob*>(p);
  int64_t c0 = static_cast<int64_t>(i) * j.cols_per_task;
  mm_scalar(j, c0, std::min(j.n, c0 + j.cols_per_task));
}

void mm_task_avx2(void* p, size_t i) {
  const MmJob& j = *static_cast<const MmJob*>(p);
  int64_t c0 = static_cast<int64_t>(i) * j.cols_per_task;
  mm_avx2(j, c0, std::min(j.n, c0 + j.cols_per_task));
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
    bool finite = true;
    for (int64_t q = 0; q < m * k.rank && finite; ++q) finite = std::isfinite(j.t[q]);
    AvxJob a{&j, tpad.data(), rpad, finite};
    return g_api->KernelContext_ParallelFor(ctx, task_avx2, tasks, 0, &a);
  }
  return g_api->KernelContext_ParallelFor(ctx, task_scalar, tasks, 0, &j);
}

void ORT_API_CALL destroy(void* k) { delete static_cast<Kernel*>(k); }

struct MmKernel {
  int64_t k = 0, n = 0;
  bool avx2 = false;
};

OrtStatus* ORT_API_CALL mm_create(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  auto* k = new MmKernel();
  int64_t* dst[2] = {&k->k, &k->n};
  const char* names[2] = {"in_features", "out_features"};
  for (int i = 0; i < 2; ++i) {
    if (OrtStatus* s = api->KernelInfoGetAttribute_int64(info, names[i], dst[i])) {
      api->ReleaseStatus(s);
      delete k;
      return fail(std::string("RocketMatMulF16: missing int attribute '") + names[i] + "'");
    }
  }
  if (k->k <= 0 || k->n <= 0) {
    delete k;
    return fail("RocketMatMulF16: need in_features > 0 and out_features > 0");
  }
  k->avx2 = cpu_has_avx2();
  *out = k;
  return nullptr;
}

OrtStatus* ORT_API_CALL mm_compute(void* kp, OrtKernelContext* ctx) {
  const MmKernel& k = *static_cast<MmKernel*>(kp);
  const OrtValue *xv, *wv;
  RETURN_IF(g_api->KernelContext_GetInput(ctx, 0, &xv));
  RETURN_IF(g_api->KernelContext_GetInput(ctx, 1, &wv));
  OrtTensorTypeAndShapeInfo* info;
  RETURN_IF(g_api->GetTensorTypeAndShape(xv, &info));
  size_t nd;
  RETURN_IF(g_api->GetDimensionsCount(info, &nd));
  std::vector<int64_t> shape(nd);
  RETURN_IF(g_api->GetDimensions(info, shape.data(), nd));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF(g_api->GetTensorTypeAndShape(wv, &info));
  size_t wnd;
  RETURN_IF(g_api->GetDimensionsCount(info, &wnd));
  std::vector<int64_t> wshape(wnd);
  RETURN_IF(g_api->GetDimensions(info, wshape.data(), wnd));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (nd < 1 || shape[nd - 1] != k.k) return fail("RocketMatMulF16: x's last dim must equal in_features");
  if (wnd != 2 || wshape[0] != k.n || wshape[1] != k.k)
    return fail("RocketMatMulF16: w must be float16 [out_features, in_features]");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < nd; ++i) m *= shape[i];
  std::vector<int64_t> oshape(shape);
  oshape[nd - 1] = k.n;
  OrtValue* yv;
  RETURN_IF(g_api->KernelContext_GetOutput(ctx, 0, oshape.data(), nd, &yv));
  MmJob j;
  RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(xv), (void**)&j.x));
  RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(wv), (void**)&j.w));
  RETURN_IF(g_api->GetTensorMutableData(yv, (void**)&j.y));
  j.m = m; j.k = k.k; j.n = k.n;
  if (m == 0) return nullptr;
  // ~64 KiB of W per task (at least 4 outputs), so small layers still split over the threads
  j.cols_per_task = std::max<int64_t>(4, ((32768 / k.k) + 3) & ~int64_t(3));
  size_t tasks = static_cast<size_t>((k.n + j.cols_per_task - 1) / j.cols_per_task);
  return g_api->KernelContext_ParallelFor(ctx, k.avx2 ? mm_task_avx2 : mm_task_scalar, tasks, 0, &j);
}

void ORT_API_CALL mm_destroy(void* k) { delete static_cast<MmKernel*>(k); }
const char* ORT_API_CALL mm_name(const OrtCustomOp*) { return "RocketMatMulF16"; }
ONNXTensorElementDataType ORT_API_CALL mm_in_type(const OrtCustomOp*, size_t i) {
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}
size_t ORT_API_CALL two(const OrtCustomOp*) { return 2; }

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

OrtCustomOp make_mm_op() {
  OrtCustomOp op = make_op();
  op.GetName = mm_name;
  op.GetInputType = mm_in_type;
  op.GetInputTypeCount = two;
  op.CreateKernelV2 = mm_create;
  op.KernelComputeV2 = mm_compute;
  op.KernelDestroy = mm_destroy;
  return op;
}

OrtCustomOp g_op = make_op();
OrtCustomOp g_mm_op = make_mm_op();

}  // namespace

extern "C" __attribute__((visibility("default")))
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(kApiVersion);
  if (!g_api) return nullptr;
  OrtCustomOpDomain* dom = nullptr;
  for (const char* name : {"rocket", "trt.plugins"}) {
    RETURN_IF(g_api->CreateCustomOpDomain(name, &dom));
    RETURN_IF(g_api->CustomOpDomain_Add(dom, &g_op));
    RETURN_IF(g_api->CustomOpDomain_Add(dom, &g_mm_op));
    RETURN_IF(g_api->AddCustomOpDomain(options, dom));
  }
  return nullptr;
}
