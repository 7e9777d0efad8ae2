// A 16-float vector "V" with the few operations the CPU MoE kernel needs.
// One source, three code paths chosen at compile time (-march=native):
//   AVX-512F: one __m512;  AVX2+FMA+F16C: two __m256;  otherwise: float[16] loops (auto-vectorized).
// Loaders widen 16 stored weights to fp32: int8, bf16, fp16, and 16 bytes of packed int4 ->
// (lo nibbles = even columns, hi nibbles = odd columns) as two vectors.
// With AVX2 (and AVX-512), also integer dot products of 32-groups (HX_QDOT = 1, see the end of this file).
// GGUF Q4_K block headers (every path): h2f (one fp16 -> fp32) and q4k_scales (the 6-bit scales and mins).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define HX_SIMD "avx512"
struct V { __m512 v; };
static inline V vzero() { return {_mm512_setzero_ps()}; }
static inline V vset1(float a) { return {_mm512_set1_ps(a)}; }
static inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline float vsum(V a) { return _mm512_reduce_add_ps(a.v); }
static inline V vload_i8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))};
}
static inline V vload_bf16(const uint16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
static inline V vload_f16(const uint16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
static inline void vload_u4(const uint8_t* p, V& lo, V& hi) {
  __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  lo = {_mm512_cvtepi32_ps(_mm512_and_si512(e, _mm512_set1_epi32(15)))};
  hi = {_mm512_cvtepi32_ps(_mm512_srli_epi32(e, 4))};
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HX_SIMD "avx2"
struct V { __m256 a, b; };
static inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V vset1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline V vfma(V x, V y, V z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
static inline V vadd(V x, V y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
static inline float vsum(V x) {
  __m256 s = _mm256_add_ps(x.a, x.b);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
static inline __m256 i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline V vload_i8(const int8_t* p) { return {i8x8(p), i8x8(p + 8)}; }
static inline __m256 bf16x8(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline V vload_bf16(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
static inline V vload_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)),
          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
static inline void vload_u4(const uint8_t* p, V& lo, V& hi) {
  const __m256i m = _mm256_set1_epi32(15);
  __m256i e0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  __m256i e1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
  lo = {_mm256_cvtepi32_ps(_mm256_and_si256(e0, m)), _mm256_cvtepi32_ps(_mm256_and_si256(e1, m))};
  hi = {_mm256_cvtepi32_ps(_mm256_srli_epi32(e0, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(e1, 4))};
}

#else
#define HX_SIMD "scalar"
#include <c10/util/Half.h>
struct V { float f[16]; };
static inline V vzero() { V r; for (int i = 0; i < 16; i++) r.f[i] = 0.f; return r; }
static inline V vset1(float a) { V r; for (int i = 0; i < 16; i++) r.f[i] = a; return r; }
static inline V vload(const float* p) { V r; std::memcpy(r.f, p, 64); return r; }
static inline V vfma(V a, V b, V c) { for (int i = 0; i < 16; i++) c.f[i] += a.f[i] * b.f[i]; return c; }
static inline V vadd(V a, V b) { for (int i = 0; i < 16; i++) a.f[i] += b.f[i]; return a; }
static inline float vsum(V a) { float s = 0.f; for (int i = 0; i < 16; i++) s += a.f[i]; return s; }
static inline V vload_i8(const int8_t* p) { V r; for (int i = 0; i < 16; i++) r.f[i] = p[i]; return r; }
static inline V vload_bf16(const uint16_t* p) {
  V r;
  for (int i = 0; i < 16; i++) { uint32_t u = uint32_t(p[i]) << 16; std::memcpy(&r.f[i], &u, 4); }
  return r;
}
static inline V vload_f16(const uint16_t* p) {
  V r;
  for (int i = 0; i < 16; i++) r.f[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
  return r;
}
static inline void vload_u4(const uint8_t* p, V& lo, V& hi) {
  for (int i = 0; i < 16; i++) { lo.f[i] = float(p[i] & 15); hi.f[i] = float(p[i] >> 4); }
}
#endif

// ---------------------------------------------------------------- GGUF Q4_K block header
// One fp16 value (bits) as fp32.
static inline float h2f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// The 12 bytes of 6-bit (sc, m) x 8 of a Q4_K block (llama.cpp get_scale_min_k4) -> out[0..7] = sc[0..7],
// out[8..15] = m[0..7], with llama.cpp's three 32-bit words of masks and shifts.
static inline void q4k_scales(const uint8_t* s12, uint8_t* out) {
  constexpr uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
  uint32_t u[4];
  std::memcpy(u, s12, 12);
  const uint32_t m_hi = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
  const uint32_t m_lo = u[1] & k1;
  const uint32_t sc_hi = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
  const uint32_t w[4] = {u[0] & k1, sc_hi, m_lo, m_hi};
  std::memcpy(out, w, 16);
}

// ---------------------------------------------------------------- integer 32-group dot products
// u: 32 unsigned bytes (int4 values 0..15, or |w| of int8 weights); s: 32 signed bytes (int8 activations,
// |x| <= 127, for int8 weights sign-adjusted: sign(x, w)) -> 8 int32 partial sums, returned as fp32.
// Products pair-summed by maddubs stay <= 2 * 128 * 127 < 2^15 (no saturation): exact on every path.
// AVX-512 VNNI (+VL) or AVX-VNNI: one vpdpbusd; plain AVX2: vpmaddubsw + vpmaddwd.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HX_QDOT 1
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HX_QDOT_KIND "avx512vnni"
#elif defined(__AVXVNNI__)
#define HX_QDOT_KIND "avxvnni"
#else
#define HX_QDOT_KIND "avx2"
#endif
// 16 bytes of packed int4 -> 32 bytes: the 16 low nibbles (even columns), then the 16 high ones (odd).
static inline __m256i load_q4(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
  return _mm256_and_si256(v, _mm256_set1_epi8(15));
}
static inline __m256i load_b32(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
// int4 group (u = q) times activations x: sum q_j x_j (8 partial sums, fp32).
static inline __m256 gdot_u4(__m256i u, const int8_t* x) {
  return _mm256_cvtepi32_ps(dot_u8s8(u, load_b32(x)));
}
// int8 group (w, aw = |w|) times activations x: sum w_j x_j = sum |w_j| sign(x_j, w_j).
static inline __m256 gdot_s8(__m256i w, __m256i aw, const int8_t* x) {
  return _mm256_cvtepi32_ps(dot_u8s8(aw, _mm256_sign_epi8(load_b32(x), w)));
}
static inline float hsum8(__m256 s) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
#else
#define HX_QDOT 0
#define HX_QDOT_KIND "none"
#endif
