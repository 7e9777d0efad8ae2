// Fused CPU MoE for one layer: every routed (token, expert) pair of the call in ONE call.
//
//   y[t] = sum_k w[t,k] * W2_e act(G_e x_t + bg_e, U_e x_t + bu_e),  e = ids[t,k]; ids == -1 is skipped.
//   act (ActSpec, weights.ACT_CODES): 0 silu(g) u; 1 GPT-OSS's clamped SwiGLU (g' = min(g, limit),
//   u' = clamp(u, -limit, limit), (u' + 1) g' sigmoid(alpha g')); 2 gelu_tanh(g) u. The gate/up bias b13
//   [E, 2I] fp32 (gate then up, by expert id) is optional; a down bias is the model's (weights.py).
//
// Weights (contiguous, E experts stacked):  w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I].
// Formats: f32, bf16, f16, int8 (per-row scale), int4g32 (q [N, K/2] uint8, low nibble = even column;
// scale, zero [N, K/32]; w = (q - 8) * scale + zero), int8gG (q [N, K] int8; scale and optional zero
// [N, K/G], G = 16 or 32; w = q * scale + zero), q4_k (q [N, K/256 * 144] uint8: GGUF Q4_K blocks as in the
// file, no scale/zero tensors; w = d sc_j q - dmin m_j per sub-block j of 32), LUT4 mxfp4 / iq4_nl / iq4_xs
// (q [N, K/B * bytes] uint8: GGUF blocks as in the file; w = scale_g table[index] per 32-group, lut4.h).
// Activations and accumulation are fp32.
//
// Plan: (0) group pairs by expert (counting sort); (1) h = silu(G x) * (U x) in parallel over
// (active expert x block of I rows); (2) y in parallel over blocks of D output rows, each unit looping over
// all active experts, so every output element has one writer and `out` is written, not accumulated.
// Units are claimed in contiguous, shrinking ranges (guided self-scheduling, `claim`): long sequential
// weight streams per thread, and a known next step to prefetch.
// Each weight row is read once per call and used for up to 4 tokens at a time (token tiles).
// int4 rows hold even columns in low nibbles, so their input vector is permuted per 32-group
// (16 even columns, then 16 odd) once per call. The GIL is released by the binding.
//
// Integer path (act_quant, int8/int4g32 weights, AVX2 and up): x (and h) are quantized once per call to int8
// with one fp32 scale sx per 32-group (x ~ sx * xq, |xq| <= 127, xsum = sx * sum(xq)); a weight row times
// an activation row is then, per 32-group, one integer dot (vpdpbusd / vpmaddubsw+vpmaddwd, simd.h):
//   int4g32: sum_j w_j x_j = (s sx) * sum_j q_j xq_j + (z - 8 s) * xsum     (q in 0..15 is the u8 operand)
//   int8:    sum_j w_j x_j = sw * sum_g sx_g * sum_j |w_j| sign(xq_j, w_j)
//   int8gG:  512-bit path only (qdot512.h); AVX2 builds run int8gG weights on the fp32 path.
//   q4_k:    per sub-block j: (d sc_j sx) * sum_j q xq - dmin m_j xsum  (the block's 6-bit scales decoded once
//            per block per row; q in 0..15 is the u8 operand, as for int4g32)
//   LUT4:    512-bit path only (qdot512.h lut_rows: table lookup with vpshufb, then vpdpbusd); other builds
//            run LUT4 weights on the fp32 path (lut4.h group_weights).
// h is quantized by the stage-1 unit that computes it (units are one 32-group of I rows).
// With AVX-512 BW/VL + VNNI the integer path runs the 512-bit kernels of qdot512.h instead (several rows x
// tokens per step, int4 activations laid out per 4-group block, int8 via w ^ 0x80, L2 prefetch of the rows
// `prefetch_rows` steps later); the 256-bit kernels below serve AVX2 / AVX-VNNI builds.
#include <torch/extension.h>
#include <omp.h>

#include "cpu_moe.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "lut4.h"
#include "simd.h"

// The 512-bit integer path (qdot512.h) replaces the 256-bit one where AVX-512 BW/VL + VNNI exist.
#if HX_QDOT && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HX_Q512 1
#include "qdot512.h"
#else
#define HX_Q512 0
#endif

namespace {

enum Fmt : int { F32 = 0, BF16 = 1, F16 = 2, I8 = 3, I4 = 4, I8G = 5, Q4K = 6, MXF4 = 7, IQ4NL = 8, IQ4XS = 9 };

inline bool is_lut(int64_t f) { return f >= MXF4 && f <= IQ4XS; }

// The experts' activation and optional gate/up bias (see the header).
struct ActSpec {
  int code = 0;
  float alpha = 1.702f, limit = 7.f;
  const float* b13 = nullptr;        // [E, 2I] fp32 or nullptr

  inline float operator()(float g, float u) const {
    switch (code) {
      case 1: {
        g = std::min(g, limit);
        u = std::max(-limit, std::min(u, limit));
        return (u + 1.f) * (g / (1.f + std::exp(-alpha * g)));
      }
      case 2: return 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
      default: return g / (1.f + std::exp(-g)) * u;
    }
  }
};

constexpr int64_t QK = 256, QKB = 144;   // q4_k: weights and bytes per block

int float_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    case at::kHalf: return F16;
    default: TORCH_CHECK(false, "cpu_moe: unsupported float dtype ", t);
  }
  return -1;
}

inline float ld(const void* p, int code, int64_t i) {
  switch (code) {
    case BF16: return float(reinterpret_cast<const c10::BFloat16*>(p)[i]);
#if defined(__F16C__)
    case F16: return _cvtsh_ss(reinterpret_cast<const uint16_t*>(p)[i]);
#else
    case F16: return float(reinterpret_cast<const c10::Half*>(p)[i]);
#endif
    default: return reinterpret_cast<const float*>(p)[i];
  }
}

inline void st(void* p, int code, int64_t i, float v) {
  switch (code) {
    case BF16: reinterpret_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    case F16: reinterpret_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    default: reinterpret_cast<float*>(p)[i] = v;
  }
}

struct WDesc {           // one stacked weight [E, N, K]
  int fmt;
  const void* q;
  const void* s = nullptr;
  const void* z = nullptr;
  int scode = F32, zcode = F32;
  int64_t E, N, K;
  int64_t G = 32;        // int8gG: columns per scale (16 or 32)
  int64_t pf = 0;        // integer path: prefetch distance in bytes (a few rows ahead; 0 = off)
};

// res[t] = dot(row, xs[t]) for NT tokens; two accumulator chains per token.
template <int NT, class Load>
inline void dot_plain(Load load, const float* const* xs, int64_t K, float* res) {
  V a0[NT], a1[NT];
  for (int t = 0; t < NT; t++) a0[t] = a1[t] = vzero();
  for (int64_t k = 0; k < K; k += 32) {
    V w0 = load(k), w1 = load(k + 16);
    for (int t = 0; t < NT; t++) {
      a0[t] = vfma(w0, vload(xs[t] + k), a0[t]);
      a1[t] = vfma(w1, vload(xs[t] + k + 16), a1[t]);
    }
  }
  for (int t = 0; t < NT; t++) res[t] = vsum(vadd(a0[t], a1[t]));
}

// int4g32 row: per group w = q * s + (z - 8 s); xs are permuted (16 even, then 16 odd columns per group).
template <int NT>
inline void dot_i4(const WDesc& w, int64_t row, const float* const* xs, float* res) {
  const int64_t G = w.K / 32;
  const uint8_t* q = reinterpret_cast<const uint8_t*>(w.q) + row * (w.K / 2);
  V a0[NT], a1[NT];
  for (int t = 0; t < NT; t++) a0[t] = a1[t] = vzero();
  for (int64_t g = 0; g < G; g++) {
    float s = ld(w.s, w.scode, row * G + g), z = ld(w.z, w.zcode, row * G + g) - 8.f * s;
    V lo, hi;
    vload_u4(q + g * 16, lo, hi);
    V vs = vset1(s), vz = vset1(z);
    V wl = vfma(lo, vs, vz), wh = vfma(hi, vs, vz);
    for (int t = 0; t < NT; t++) {
      a0[t] = vfma(wl, vload(xs[t] + g * 32), a0[t]);
      a1[t] = vfma(wh, vload(xs[t] + g * 32 + 16), a1[t]);
    }
  }
  for (int t = 0; t < NT; t++) res[t] = vsum(vadd(a0[t], a1[t]));
}

// int8gG row: per group w = q * s + z (z = 0 without a zero tensor).
template <int NT>
inline void dot_i8g(const WDesc& w, int64_t row, const float* const* xs, float* res) {
  const int64_t G = w.G, ng = w.K / G;
  const int8_t* q = reinterpret_cast<const int8_t*>(w.q) + row * w.K;
  V a[NT];
  for (int t = 0; t < NT; t++) a[t] = vzero();
  for (int64_t g = 0; g < ng; g++) {
    const V vs = vset1(ld(w.s, w.scode, row * ng + g)), vz = vset1(w.z ? ld(w.z, w.zcode, row * ng + g) : 0.f);
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      const V wv = vfma(vload_i8(q + k), vs, vz);
      for (int t = 0; t < NT; t++) a[t] = vfma(wv, vload(xs[t] + k), a[t]);
    }
  }
  for (int t = 0; t < NT; t++) res[t] = vsum(a[t]);
}

// Q4_K block header at p: d, dmin (fp32) and the decoded 6-bit scales (sm[0..7]) and mins (sm[8..15]).
inline void q4k_header(const uint8_t* p, float& d, float& dmin, uint8_t* sm) {
  uint16_t h[2];
  std::memcpy(h, p, 4);
  d = h2f(h[0]);
  dmin = h2f(h[1]);
  q4k_scales(p + 4, sm);
}

// q4_k row: per sub-block j, w = a_j q - b_j (a_j = d sc_j, b_j = dmin m_j; a_j q is exact in fp32, so the
// FMA gives gguf's dequantized weight bit for bit). Chunk c's 32 bytes: low nibbles = sub-block 2c (columns
// 64c .. 64c + 31 of the block), high = sub-block 2c + 1 (64c + 32 ..); xs in natural column order.
template <int NT>
inline void dot_q4k(const WDesc& w, int64_t row, const float* const* xs, float* res) {
  const int64_t nb = w.K / QK;
  const uint8_t* p = static_cast<const uint8_t*>(w.q) + row * nb * QKB;
  V a0[NT], a1[NT];
  for (int t = 0; t < NT; t++) a0[t] = a1[t] = vzero();
  for (int64_t b = 0; b < nb; b++, p += QKB) {
    float d, dmin;
    uint8_t sm[16];
    q4k_header(p, d, dmin, sm);
    for (int c = 0; c < 4; c++) {
      const uint8_t* qs = p + 16 + 32 * c;
      const int64_t k = b * QK + 64 * c;
      const V s0 = vset1(d * float(sm[2 * c])), z0 = vset1(-(dmin * float(sm[8 + 2 * c])));
      const V s1 = vset1(d * float(sm[2 * c + 1])), z1 = vset1(-(dmin * float(sm[9 + 2 * c])));
      V lo, hi;
      vload_u4(qs, lo, hi);                             // columns 0..15 of sub-blocks 2c (lo), 2c + 1 (hi)
      const V wl0 = vfma(lo, s0, z0), wh0 = vfma(hi, s1, z1);
      vload_u4(qs + 16, lo, hi);                        // columns 16..31
      const V wl1 = vfma(lo, s0, z0), wh1 = vfma(hi, s1, z1);
      for (int t = 0; t < NT; t++) {
        a0[t] = vfma(wl0, vload(xs[t] + k), a0[t]);
        a1[t] = vfma(wl1, vload(xs[t] + k + 16), a1[t]);
        a0[t] = vfma(wh0, vload(xs[t] + k + 32), a0[t]);
        a1[t] = vfma(wh1, vload(xs[t] + k + 48), a1[t]);
      }
    }
  }
  for (int t = 0; t < NT; t++) res[t] = vsum(vadd(a0[t], a1[t]));
}

// LUT4 row: per 32-group, the 32 weights looked up and scaled (lut4.h), then fp32 FMAs; xs in natural order.
template <int NT>
inline void dot_lut(const WDesc& w, int64_t row, const float* const* xs, float* res) {
  const int kind = w.fmt - MXF4;
  const uint8_t* p = static_cast<const uint8_t*>(w.q) + row * lut4::row_bytes(kind, w.K);
  V a0[NT], a1[NT];
  for (int t = 0; t < NT; t++) a0[t] = a1[t] = vzero();
  alignas(64) float wv[32];
  for (int64_t g = 0; g < w.K / 32; g++) {
    lut4::group_weights(p, kind, g, wv);
    const V w0 = vload(wv), w1 = vload(wv + 16);
    for (int t = 0; t < NT; t++) {
      a0[t] = vfma(w0, vload(xs[t] + g * 32), a0[t]);
      a1[t] = vfma(w1, vload(xs[t] + g * 32 + 16), a1[t]);
    }
  }
  for (int t = 0; t < NT; t++) res[t] = vsum(vadd(a0[t], a1[t]));
}

template <int NT>
inline void row_dot(const WDesc& w, int64_t e, int64_t r, const float* const* xs, float* res) {
  const int64_t row = e * w.N + r, K = w.K;
  switch (w.fmt) {
    case F32: {
      const float* p = reinterpret_cast<const float*>(w.q) + row * K;
      dot_plain<NT>([p](int64_t k) { return vload(p + k); }, xs, K, res);
      break;
    }
    case BF16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(w.q) + row * K;
      dot_plain<NT>([p](int64_t k) { return vload_bf16(p + k); }, xs, K, res);
      break;
    }
    case F16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(w.q) + row * K;
      dot_plain<NT>([p](int64_t k) { return vload_f16(p + k); }, xs, K, res);
      break;
    }
    case I8: {
      const int8_t* p = reinterpret_cast<const int8_t*>(w.q) + row * K;
      dot_plain<NT>([p](int64_t k) { return vload_i8(p + k); }, xs, K, res);
      const float s = ld(w.s, w.scode, row);
      for (int t = 0; t < NT; t++) res[t] *= s;
      break;
    }
    case I8G: dot_i8g<NT>(w, row, xs, res); break;
    case Q4K: dot_q4k<NT>(w, row, xs, res); break;
    case MXF4: case IQ4NL: case IQ4XS: dot_lut<NT>(w, row, xs, res); break;
    default: dot_i4<NT>(w, row, xs, res);
  }
}

// Dot of one weight row with n <= 4 token vectors.
inline void row_dot_n(const WDesc& w, int64_t e, int64_t r, const float* const* xs, int n, float* res) {
  switch (n) {
    case 1: row_dot<1>(w, e, r, xs, res); break;
    case 2: row_dot<2>(w, e, r, xs, res); break;
    case 3: row_dot<3>(w, e, r, xs, res); break;
    default: row_dot<4>(w, e, r, xs, res);
  }
}

// Column position of logical column c inside a vector that an int4 row reads (permuted per 32-group).
inline int64_t perm_col(int64_t c) { return (c & ~int64_t(31)) + ((c & 1) << 4) + ((c & 31) >> 1); }

// ---------------------------------------------------------------- int8 activations
// 32 values -> q (round(v * 127 / amax)), scale amax / 127, and scale * sum(q). The Python reference
// (tests/kernels/test_cpu_moe.py: quantize_act) does the same fp32 operations.
inline void quant32(const float* v, int8_t* q, float* s, float* sum) {
  float amax = 0.f;
  for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(v[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int isum = 0;
  for (int i = 0; i < 32; i++) {
    const int qi = int(std::nearbyint(v[i] * inv));
    q[i] = int8_t(qi);
    isum += qi;
  }
  *s = amax / 127.f;
  *sum = *s * float(isum);
}

struct Acts {            // activation rows of length K: fp32 (f), or int8 (q) with per-32-group s, sum
  float* f = nullptr;
  int8_t* q = nullptr;
  float* s = nullptr;
  float* sum = nullptr;
  float* sxl = nullptr;  // 512-bit path, int8 weights: s per int32 lane of a dot (8 per group, K / 4 per row)
  float* sum16 = nullptr;  // 512-bit path, int8g16 weights: sums per 16 columns (K / 16 per row)
  int64_t K = 0;
};

struct Tile {            // up to 4 activation rows that one weight row is applied to
  int n = 0;
  const float* f[4];
  const int8_t* q[4];
  const float* s[4];
  const float* sum[4];
};

inline Tile make_tile(const Acts& a, const int64_t* rows, int n) {
  Tile t;
  t.n = n;
  const int64_t G = a.K / 32;
  for (int j = 0; j < n; j++) {
    t.f[j] = a.f ? a.f + rows[j] * a.K : nullptr;
    t.q[j] = a.q ? a.q + rows[j] * a.K : nullptr;
    t.s[j] = a.s ? a.s + rows[j] * G : nullptr;
    t.sum[j] = a.sum ? a.sum + rows[j] * G : nullptr;
  }
  return t;
}

// Per-thread scratch of at least n floats; slot 0: int4 rows' combined scales s * sx of a token tile
// (long rows only), slot 1: a stage-2 unit's output tile.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buf[2];
  if (int64_t(buf[slot].size()) < n) buf[slot].resize(n);
  return buf[slot].data();
}

#if HX_QDOT && !HX_Q512
// res[t] = sum_g sc[t][g] * (group g of the row . xq_t group g); two fp32 accumulator chains per token.
// pf > 0: prefetch the bytes pf ahead (the same place a few rows on), so short rows keep DRAM busy.
template <int NT, bool I4>
inline void qdot_groups(const uint8_t* p, int64_t G, const int8_t* const* xq, const float* const* sc,
                        float* res, int64_t pf) {
  __m256 a0[NT], a1[NT];
  for (int t = 0; t < NT; t++) a0[t] = a1[t] = _mm256_setzero_ps();
  auto step = [&](int64_t g, __m256* acc) {
    if constexpr (I4) {
      const __m256i u = load_q4(p + g * 16);
      for (int t = 0; t < NT; t++)
        acc[t] = _mm256_fmadd_ps(gdot_u4(u, xq[t] + g * 32), _mm256_broadcast_ss(sc[t] + g), acc[t]);
    } else {
      const __m256i w = load_b32(p + g * 32), aw = _mm256_abs_epi8(w);
      for (int t = 0; t < NT; t++)
        acc[t] = _mm256_fmadd_ps(gdot_s8(w, aw, xq[t] + g * 32), _mm256_broadcast_ss(sc[t] + g), acc[t]);
    }
  };
  int64_t g = 0;
  for (; g + 1 < G; g += 2) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(p + (I4 ? 16 : 32) * g + pf), _MM_HINT_T0);
    step(g, a0);
    step(g + 1, a1);
  }
  if (g < G) step(g, a0);
  for (int t = 0; t < NT; t++) res[t] = hsum8(_mm256_add_ps(a0[t], a1[t]));
}

// 8 consecutive scale/zero values (fp32, bf16 or fp16) as fp32.
inline __m256 load8_code(const void* p, int code, int64_t i) {
  switch (code) {
    case BF16: {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
    }
    case F16: return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    default: return _mm256_loadu_ps(reinterpret_cast<const float*>(p) + i);
  }
}

// int4 row: comb[t * G + g] = s_g * sx_t[g] and corr[t] = sum_g (z_g - 8 s_g) * xsum_t[g].
template <int NT>
inline void i4_prepass(const WDesc& w, int64_t row, const Tile& x, float* comb, float* corr) {
  const int64_t G = w.K / 32, base = row * G;
  __m256 c[NT];
  for (int t = 0; t < NT; t++) c[t] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 s = load8_code(w.s, w.scode, base + g), z = load8_code(w.z, w.zcode, base + g);
    const __m256 zc = _mm256_fmadd_ps(s, _mm256_set1_ps(-8.f), z);
    for (int t = 0; t < NT; t++) {
      _mm256_storeu_ps(comb + t * G + g, _mm256_mul_ps(s, _mm256_loadu_ps(x.s[t] + g)));
      c[t] = _mm256_fmadd_ps(zc, _mm256_loadu_ps(x.sum[t] + g), c[t]);
    }
  }
  for (int t = 0; t < NT; t++) corr[t] = hsum8(c[t]);
  for (; g < G; g++) {
    const float s = ld(w.s, w.scode, base + g), zc = ld(w.z, w.zcode, base + g) - 8.f * s;
    for (int t = 0; t < NT; t++) {
      comb[t * G + g] = s * x.s[t][g];
      corr[t] += zc * x.sum[t][g];
    }
  }
}

// q4_k row (nb blocks at p) times int8 activations (natural column order): per block the 8 sub-blocks'
// s_j = d sc_j sx_j in one vector (lane j) and the min term sum_j dmin m_j xsum_j FMA'd into corr; per chunk
// of 32 bytes two dots (low nibbles: sub-block 2c, high: 2c + 1), each scaled by its lane of s.
template <int NT>
inline void qdot_q4k(const uint8_t* p, int64_t nb, const Tile& x, float* res, int64_t pf) {
  __m256 a0[NT], a1[NT], corr[NT];
  for (int t = 0; t < NT; t++) a0[t] = a1[t] = corr[t] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int64_t b = 0; b < nb; b++, p += QKB) {
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(p + pf), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + pf + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + pf + QKB - 1), _MM_HINT_T0);
    }
    float d, dmin;
    alignas(16) uint8_t sm[16];
    q4k_header(p, d, dmin, sm);
    const __m128i smv = _mm_load_si128(reinterpret_cast<const __m128i*>(sm));
    const __m256 a = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(smv)));
    const __m256 z = _mm256_mul_ps(_mm256_set1_ps(dmin),
                                   _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(smv, 8))));
    __m256 cs[NT];
    for (int t = 0; t < NT; t++) {
      cs[t] = _mm256_mul_ps(a, _mm256_loadu_ps(x.s[t] + 8 * b));
      corr[t] = _mm256_fnmadd_ps(z, _mm256_loadu_ps(x.sum[t] + 8 * b), corr[t]);
    }
    for (int c = 0; c < 4; c++) {
      const __m256i qv = load_b32(p + 16 + 32 * c);
      const __m256i lo = _mm256_and_si256(qv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4);
      const __m256i il = _mm256_set1_epi32(2 * c), ih = _mm256_set1_epi32(2 * c + 1);
      for (int t = 0; t < NT; t++) {
        const int8_t* xq = x.q[t] + b * QK + 64 * c;
        a0[t] = _mm256_fmadd_ps(gdot_u4(lo, xq), _mm256_permutevar8x32_ps(cs[t], il), a0[t]);
        a1[t] = _mm256_fmadd_ps(gdot_u4(hi, xq + 32), _mm256_permutevar8x32_ps(cs[t], ih), a1[t]);
      }
    }
  }
  for (int t = 0; t < NT; t++) res[t] = hsum8(_mm256_add_ps(_mm256_add_ps(a0[t], a1[t]), corr[t]));
}

template <int NT>
inline void qrow_dot(const WDesc& w, int64_t e, int64_t r, const Tile& x, float* res) {
  const int64_t row = e * w.N + r, G = w.K / 32;
  const uint8_t* q = reinterpret_cast<const uint8_t*>(w.q);
  if (w.fmt == Q4K) {
    qdot_q4k<NT>(q + row * (w.K / QK) * QKB, w.K / QK, x, res, w.pf);
  } else if (w.fmt == I4) {
    float stack[4 * 256];                               // rows up to 8192 columns use the stack
    float* comb = NT * G <= 4 * 256 ? stack : scratch(0, NT * G);
    float corr[NT];
    i4_prepass<NT>(w, row, x, comb, corr);
    const float* sc[NT];
    for (int t = 0; t < NT; t++) sc[t] = comb + t * G;
    qdot_groups<NT, true>(q + row * (w.K / 2), G, x.q, sc, res, w.pf);
    for (int t = 0; t < NT; t++) res[t] += corr[t];
  } else {
    qdot_groups<NT, false>(q + row * w.K, G, x.q, x.s, res, w.pf);
    const float s = ld(w.s, w.scode, row);
    for (int t = 0; t < NT; t++) res[t] *= s;
  }
}
#endif

// Dot of weight row r of expert e with the tile's activation rows (integer path when the tile is int8).
inline void tile_dot(const WDesc& w, int64_t e, int64_t r, const Tile& x, float* res) {
#if HX_QDOT && !HX_Q512
  if (x.q[0] != nullptr) {
    switch (x.n) {
      case 1: qrow_dot<1>(w, e, r, x, res); return;
      case 2: qrow_dot<2>(w, e, r, x, res); return;
      case 3: qrow_dot<3>(w, e, r, x, res); return;
      default: qrow_dot<4>(w, e, r, x, res); return;
    }
  }
#endif
  row_dot_n(w, e, r, x.f, x.n, res);
}

WDesc describe(int64_t fmt, const at::Tensor& q, const c10::optional<at::Tensor>& s,
               const c10::optional<at::Tensor>& z, int64_t N, int64_t K) {
  TORCH_CHECK(q.is_contiguous() && q.device().is_cpu(), "cpu_moe: weights must be contiguous CPU tensors");
  WDesc w{int(fmt), q.data_ptr()};
  w.E = q.size(0);
  w.N = N;
  w.K = K;
  if (fmt == I8 || fmt == I4 || fmt == I8G) {
    TORCH_CHECK(s.has_value() && s->is_contiguous(), "cpu_moe: quantized weight needs a contiguous scale");
    w.s = s->data_ptr();
    w.scode = float_code(s->scalar_type());
  }
  if (fmt == I8G) {
    const int64_t ng = s->size(-1);
    TORCH_CHECK(ng > 0 && K % ng == 0 && (K / ng == 16 || K / ng == 32) && s->numel() == w.E * N * ng,
                "cpu_moe: int8g scale must be [E, N, K/16] or [E, N, K/32]");
    w.G = K / ng;
    if (z.has_value()) {
      TORCH_CHECK(z->is_contiguous() && z->sizes() == s->sizes(), "cpu_moe: int8g zero must match its scale");
      w.z = z->data_ptr();
      w.zcode = float_code(z->scalar_type());
    }
  }
  if (fmt == Q4K)
    TORCH_CHECK(q.scalar_type() == at::kByte && K % QK == 0 && q.dim() == 3 && q.size(1) == N
                    && q.size(2) == K / QK * QKB,
                "cpu_moe: q4_k weight must be uint8 [E, N, K/256 * 144] with K a multiple of 256");
  if (is_lut(fmt)) {
    const int kind = int(fmt) - MXF4;
    TORCH_CHECK(q.scalar_type() == at::kByte && K % lut4::kBlockW[kind] == 0 && q.dim() == 3 && q.size(1) == N
                    && q.size(2) == lut4::row_bytes(kind, K),
                "cpu_moe: LUT4 weight must be uint8 [E, N, K/B * bytes] with K a multiple of its block B");
  }
  if (fmt == I4) {
    TORCH_CHECK(z.has_value() && z->is_contiguous(), "cpu_moe: int4g32 weight needs a contiguous zero");
    w.z = z->data_ptr();
    w.zcode = float_code(z->scalar_type());
  }
  return w;
}

constexpr int64_t RB1 = 32;          // stage-1 unit: 32 rows of I (one 32-group of h)

struct Pairs {                       // (token, expert) pairs sorted by expert (reused per calling thread)
  std::vector<int64_t> expert;       // active experts
  std::vector<int64_t> start;        // [n_active + 1] offsets into tok/wt
  std::vector<int64_t> tok;
  std::vector<float> wt;
  std::vector<int64_t> count;        // scratch of the counting sort
};

void group_pairs(Pairs& p, const int64_t* ids, const at::Tensor& wts, int64_t T, int64_t K, int64_t E) {
  const int wcode = float_code(wts.scalar_type());
  const void* wp = wts.data_ptr();
  std::vector<int64_t>& count = p.count;
  count.assign(E + 1, 0);
  for (int64_t i = 0; i < T * K; i++) {
    TORCH_CHECK(ids[i] >= -1 && ids[i] < E, "cpu_moe: expert id ", ids[i], " out of range [-1, ", E, ")");
    if (ids[i] >= 0) count[ids[i] + 1]++;
  }
  p.expert.clear();
  p.start.clear();
  for (int64_t e = 0; e < E; e++) {
    if (count[e + 1] > 0) { p.expert.push_back(e); p.start.push_back(count[e]); }
    count[e + 1] += count[e];
  }
  p.start.push_back(count[E]);
  p.tok.resize(count[E]);
  p.wt.resize(count[E]);
  for (int64_t i = 0; i < T * K; i++) {
    if (ids[i] < 0) continue;
    int64_t j = count[ids[i]]++;
    p.tok[j] = i / K;
    p.wt[j] = ld(wp, wcode, i);
  }
}

#if HX_Q512
using q512::QTile;

inline QTile make_qtile(const Acts& a, const int64_t* rows, int n) {
  QTile t;
  t.n = n;
  const int64_t G = a.K / 32;
  for (int j = 0; j < n; j++) {
    t.q[j] = a.q + rows[j] * a.K;
    t.s[j] = a.s + rows[j] * G;
    t.sum[j] = a.sum + rows[j] * G;
    t.sxl[j] = a.sxl ? a.sxl + rows[j] * (a.K / 4) : nullptr;
    t.sum16[j] = a.sum16 ? a.sum16 + rows[j] * (a.K / 16) : nullptr;
    t.X[j] = 0.f;
    if (a.sxl)
      for (int64_t g = 0; g < G; g++) t.X[j] += t.sum[j][g];
  }
  return t;
}

// Row pointers of R weight rows (global row indices e * N + r); int8: s = the row's scale.
template <int R>
HX_INLINE q512::Rows<R> rows_of(const WDesc& w, const int64_t* rows) {
  q512::Rows<R> p;
  const int64_t G = w.K / 32, ssz = w.scode == F32 ? 4 : 2, zsz = w.zcode == F32 ? 4 : 2;
  for (int r = 0; r < R; r++) {
    if (w.fmt == Q4K || is_lut(w.fmt)) {
      const int64_t rb = w.fmt == Q4K ? w.K / QK * QKB : lut4::row_bytes(w.fmt - MXF4, w.K);
      p.q[r] = static_cast<const uint8_t*>(w.q) + rows[r] * rb;
      p.s[r] = p.z[r] = nullptr;
    } else if (w.fmt == I4) {
      p.q[r] = static_cast<const uint8_t*>(w.q) + rows[r] * (w.K / 2);
      p.s[r] = static_cast<const char*>(w.s) + rows[r] * G * ssz;
      p.z[r] = static_cast<const char*>(w.z) + rows[r] * G * zsz;
    } else if (w.fmt == I8G) {
      const int64_t ng = w.K / w.G;
      p.q[r] = static_cast<const uint8_t*>(w.q) + rows[r] * w.K;
      p.s[r] = static_cast<const char*>(w.s) + rows[r] * ng * ssz;
      p.z[r] = w.z ? static_cast<const char*>(w.z) + rows[r] * ng * zsz : nullptr;
    } else {
      p.q[r] = static_cast<const uint8_t*>(w.q) + rows[r] * w.K;
      p.s[r] = static_cast<const char*>(w.s) + rows[r] * ssz;
      p.z[r] = nullptr;
    }
  }
  return p;
}

// Integer dots of R weight rows (global row indices) with tile x: res[r * x.n + t]. prow (or nullptr): the R
// rows to prefetch meanwhile.
template <int R, int NT>
HX_INLINE void qrows_t(const WDesc& w, const int64_t* rows, const int64_t* prow, const QTile& x, float* res) {
  const q512::Rows<R> rw = rows_of<R>(w, rows);
  q512::Rows<R> rp;
  if (prow) rp = rows_of<R>(w, prow);
  const q512::Rows<R>* pp = prow ? &rp : nullptr;
  if (w.fmt == Q4K) {
    q512::q4k_rows<R, NT>(rw, pp, w.K / QK, x, res);
  } else if (is_lut(w.fmt)) {
    q512::lut_rows<R, NT>(rw, pp, w.fmt - MXF4, w.K / 32, x, res);
  } else if (w.fmt == I4) {
    q512::q4_rows<R, NT>(rw, pp, w.scode, w.zcode, w.K / 32, x, res);
  } else if (w.fmt == I8G) {
    if (w.G == 16) q512::q8g_rows<R, NT, true>(rw, pp, w.scode, w.zcode, w.K / 16, x, res);
    else q512::q8g_rows<R, NT, false>(rw, pp, w.scode, w.zcode, w.K / 32, x, res);
  } else {
    q512::q8_rows<R, NT>(rw, pp, w.K, x, res);
    for (int r = 0; r < R; r++) {
      const float sw = ld(w.s, w.scode, rows[r]);
      for (int t = 0; t < NT; t++) res[r * NT + t] *= sw;
    }
  }
}

// R in {1, 2, 4} rows; tiles of 3-4 tokens take 4 rows as two pairs (R * NT accumulators fit in registers).
template <int R>
inline void qrows(const WDesc& w, const int64_t* rows, const int64_t* prow, const QTile& x, float* res) {
  switch (x.n) {
    case 1: qrows_t<R, 1>(w, rows, prow, x, res); return;
    case 2: qrows_t<R, 2>(w, rows, prow, x, res); return;
    default:
      if constexpr (R == 4) {
        qrows<2>(w, rows, prow, x, res);
        qrows<2>(w, rows + 2, prow ? prow + 2 : nullptr, x, res + 2 * x.n);
      } else if (x.n == 3) {
        qrows_t<R, 3>(w, rows, prow, x, res);
      } else {
        qrows_t<R, 4>(w, rows, prow, x, res);
      }
  }
}

// 16 activations of dtype `code` from element i on, as fp32.
inline __m512 load16x(const void* p, int code, int64_t i) {
  switch (code) {
    case BF16: return vload_bf16(static_cast<const uint16_t*>(p) + i).v;
    case F16: return vload_f16(static_cast<const uint16_t*>(p) + i).v;
    default: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  }
}

// Group g of activation row `row` (32 fp32 values: v0 = columns 0..15, v1 = 16..31) -> int8 in the layout
// that weights of format f read (int4: q4_group_pos; q4_k: q4k_act_pos; int8: natural, plus sxl).
inline void qstore(const Acts& a, int f, int64_t row, int64_t g, __m512 v0, __m512 v1) {
  const int64_t G = a.K / 32;
  int8_t* base = a.q + row * a.K;
  float* s = a.s + row * G + g;
  float* sum = a.sum + row * G + g;
  if (f == Q4K) {                           // odd sub-blocks: q & 0xF0 = 16 q, so their scale carries 1/16
    int64_t lo, hi;
    q512::q4k_act_pos(g, lo, hi);
    q512::quant32v(v0, v1, false, base + lo, base + hi, s, sum);
    if (g & 1) *s *= 1.f / 16.f;
  } else if (f == I4 || is_lut(f)) {       // int4: even/odd split; LUT4: first/second halves
    int64_t lo, hi;
    q512::q4_group_pos(g, G, lo, hi);
    q512::quant32v(v0, v1, f == I4, base + lo, base + hi, s, sum);
  } else {
    float* s16 = a.sum16 ? a.sum16 + row * (a.K / 16) + 2 * g : nullptr;
    q512::quant32v(v0, v1, false, base + g * 32, base + g * 32 + 16, s, sum, s16);
    if (a.sxl) _mm256_storeu_ps(a.sxl + row * (a.K / 4) + g * 8, _mm256_set1_ps(*s));
  }
}
#endif

// Stage 1 unit: h rows [r0, r0 + RB1) (one 32-group) of active expert a for all its tokens.
// h is written fp32 (h.f; permuted per group when w2 is int4) or, when h.q is set, quantized per 32-group
// right here into the layout w2's format reads. 512-bit path: 4 weight rows per step, gate and up rows r and
// r + 16 (four sequential streams, which the hardware prefetchers follow better than 4 adjacent rows of one
// page), prefetching the rows pfd steps later: in this unit, or in unit (na, nr0) (na < 0: none) next.
void gate_up_unit(const WDesc& w13, const Pairs& p, int64_t a, int64_t r0, int64_t na, int64_t nr0,
                  const Acts& x, const Acts& h, int f2, int64_t pfd, const ActSpec& act) {
  const int64_t r1 = r0 + RB1;
  const int64_t e = p.expert[a], b = p.start[a], n = p.start[a + 1] - b, I = h.K;
  const bool perm_h = f2 == I4;
  const bool perm_hl = perm_h && !HX_Q512;     // the 256-bit path quantizes h from the permuted group
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    const int nt = int(std::min<int64_t>(4, n - t0));
    float hl[4][32];
    const float* bias = act.b13 ? act.b13 + e * 2 * I : nullptr;
    auto put = [&](int64_t r, int j, float g, float u) {
      if (bias) g += bias[r], u += bias[I + r];
      const float v = act(g, u);
      if (h.q) hl[j][(perm_hl ? perm_col(r) : r) - r0] = v;
      else h.f[(b + t0 + j) * I + (perm_h ? perm_col(r) : r)] = v;
    };
#if HX_Q512
    if (x.q) {
      const QTile xt = make_qtile(x, &p.tok[b + t0], nt);
      const int64_t base = e * w13.N;
      float res[16];
      constexpr int64_t H = RB1 / 2;                 // step i: gate and up rows r0 + i and r0 + H + i
      for (int64_t i = 0; i < H; i++) {
        const int64_t r = r0 + i;
        const int64_t rows[4] = {base + r, base + r + H, base + I + r, base + I + r + H};
        int64_t prow[4], pb = -1, pr = i + pfd;
        if (pfd > 0 && pr < H) pb = base, pr += r0;
        else if (pfd > 0 && na >= 0 && pr - H < H) pb = p.expert[na] * w13.N, pr = nr0 + pr - H;
        if (pb >= 0) prow[0] = pb + pr, prow[1] = pb + pr + H, prow[2] = pb + I + pr, prow[3] = pb + I + pr + H;
        qrows<4>(w13, rows, pb >= 0 ? prow : nullptr, xt, res);
        for (int j = 0; j < nt; j++) {
          put(r, j, res[j], res[2 * nt + j]);
          put(r + H, j, res[nt + j], res[3 * nt + j]);
        }
      }
    } else
#endif
    {
      const Tile xt = make_tile(x, &p.tok[b + t0], nt);
      for (int64_t r = r0; r < r1; r++) {
        float g[4], u[4];
        tile_dot(w13, e, r, xt, g);
        tile_dot(w13, e, I + r, xt, u);
        for (int j = 0; j < nt; j++) put(r, j, g[j], u[j]);
      }
    }
    if (!h.q) continue;
    for (int j = 0; j < nt; j++) {
      const int64_t row = b + t0 + j;
#if HX_Q512
      qstore(h, f2, row, r0 / 32, _mm512_loadu_ps(hl[j]), _mm512_loadu_ps(hl[j] + 16));
#else
      const int64_t G = I / 32;
      quant32(hl[j], h.q + row * I + r0, h.s + row * G + r0 / 32, h.sum + row * G + r0 / 32);
#endif
    }
  }
}

// Stage 2: output rows [d0, d1) of every token, summed over all active experts, into acc [T, d1 - d0].
// 512-bit path: 4 rows per step, one from each quarter of [d0, d1) (four sequential streams), prefetching
// the rows pfd steps later (this expert's, or the next one's).
void down_rows(const WDesc& w2, const Pairs& p, int64_t d0, int64_t d1, const Acts& h, float* acc, int64_t T,
               int64_t pfd) {
  const int64_t R = d1 - d0, nA = p.expert.size();
  std::fill(acc, acc + T * R, 0.f);
  for (int64_t a = 0; a < nA; a++) {
    const int64_t e = p.expert[a], b = p.start[a], n = p.start[a + 1] - b;
    for (int64_t t0 = 0; t0 < n; t0 += 4) {
      const int nt = int(std::min<int64_t>(4, n - t0));
      int64_t pr[4];
      for (int j = 0; j < nt; j++) pr[j] = b + t0 + j;
      auto add = [&](int64_t d, const float* y) {
        for (int j = 0; j < nt; j++) acc[p.tok[b + t0 + j] * R + (d - d0)] += p.wt[b + t0 + j] * y[j];
      };
#if HX_Q512
      if (h.q) {
        const QTile ht = make_qtile(h, pr, nt);
        const int64_t base = e * w2.N;
        float y[16];
        int64_t d = d0;                              // (R is a multiple of 16: D is one of 32)
        if (R % 4 == 0) {                            // step i: rows d0 + i + {0, 1, 2, 3} * R / 4
          const int64_t Q = R / 4;
          for (int64_t i = 0; i < Q; i++) {
            const int64_t rows[4] = {base + d0 + i, base + d0 + Q + i, base + d0 + 2 * Q + i,
                                     base + d0 + 3 * Q + i};
            const int64_t pi = i + pfd, pa = a + pi / Q;  // the step pfd later: expert pa, step pi % Q
            int64_t prow[4], pb = pfd > 0 && pa < nA ? p.expert[pa] * w2.N : -1;
            if (pb >= 0)
              for (int k = 0; k < 4; k++) prow[k] = pb + d0 + k * Q + pi % Q;
            qrows<4>(w2, rows, pb >= 0 ? prow : nullptr, ht, y);
            for (int k = 0; k < 4; k++) add(d0 + k * Q + i, y + k * nt);
          }
          d = d1;
        }
        for (; d < d1; d++) {
          const int64_t rows[1] = {base + d};
          qrows<1>(w2, rows, nullptr, ht, y);
          add(d, y);
        }
        continue;
      }
#endif
      const Tile ht = make_tile(h, pr, nt);
      for (int64_t d = d0; d < d1; d++) {
        float y[4];
        tile_dot(w2, e, d, ht, y);
        add(d, y);
      }
    }
  }
}

// Guided self-scheduling: claims [u0, u1) of the n units, chunks shrinking from n / (2 threads) to 1 (at
// most maxc): few, long, contiguous ranges per thread (long weight streams, known prefetch targets), small
// ones at the end (balance).
inline bool claim(std::atomic<int64_t>& next, int64_t n, int64_t threads, int64_t maxc, int64_t& u0, int64_t& u1) {
  int64_t cur = next.load(std::memory_order_relaxed);
  while (cur < n) {
    const int64_t c = std::max<int64_t>(1, std::min<int64_t>(maxc, (n - cur) / (2 * threads)));
    if (next.compare_exchange_weak(cur, cur + c, std::memory_order_relaxed)) {
      u0 = cur;
      u1 = cur + c;
      return true;
    }
  }
  return false;
}

constexpr int64_t RB2 = 16;          // stage-2 unit: 16 rows of D (claims take several at once)

// Reused per calling thread (no allocation per call once warm).
template <class Tv>
Tv* buffer(std::vector<Tv>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

struct CallBufs {
  std::vector<float> xf, xs, xsum, xsxl, xsum16, hf, hs, hsum, hsxl, hsum16;
  std::vector<int8_t> xq, hq;
  Pairs pairs;
};

at::Tensor forward(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts, int64_t f13,
                   const at::Tensor& q13, const c10::optional<at::Tensor>& s13,
                   const c10::optional<at::Tensor>& z13, int64_t f2, const at::Tensor& q2,
                   const c10::optional<at::Tensor>& s2, const c10::optional<at::Tensor>& z2, at::Tensor out,
                   int64_t nthreads, bool act_quant, int64_t prefetch_rows, const ExpertAct& ea) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous(), "cpu_moe: x, out must be contiguous [T, D]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && wts.is_contiguous(),
              "cpu_moe: ids must be contiguous int64, weights contiguous");
  const int64_t T = x.size(0), D = x.size(1), K = ids.size(1);
  const int64_t I = f2 == I4    ? q2.size(2) * 2
                    : f2 == Q4K ? q2.size(2) / QKB * QK
                    : is_lut(f2) ? q2.size(2) / lut4::kBlockB[f2 - MXF4] * lut4::kBlockW[f2 - MXF4]
                                 : q2.size(2);
  TORCH_CHECK(D % 32 == 0 && I % 32 == 0, "cpu_moe: D and I must be multiples of 32");
  WDesc w13 = describe(f13, q13, s13, z13, 2 * I, D), w2 = describe(f2, q2, s2, z2, D, I);
  // 256-bit path: prefetch the same place prefetch_rows rows on (the 512-bit path: see pfd below)
  auto row_bytes = [](int64_t f, int64_t K) {
    return f == I4 ? K / 2 : f == Q4K ? K / QK * QKB : is_lut(f) ? lut4::row_bytes(int(f) - MXF4, K) : K;
  };
  w13.pf = HX_Q512 ? 0 : prefetch_rows * row_bytes(f13, D);
  w2.pf = HX_Q512 ? 0 : prefetch_rows * row_bytes(f2, I);
  TORCH_CHECK(ids.size(0) == T && wts.size(0) == T && wts.size(1) == K && out.size(0) == T && out.size(1) == D,
              "cpu_moe: shape mismatch between x, ids, weights, out");
  thread_local CallBufs cb;
  Pairs& p = cb.pairs;
  group_pairs(p, ids.data_ptr<int64_t>(), wts, T, K, w13.E);
  const int64_t nA = p.expert.size(), P = p.tok.size();
  const int xcode = float_code(x.scalar_type()), ocode = float_code(out.scalar_type());
  void* op = out.data_ptr();
  if (P == 0) {                                       // nothing routed here: zeros, no parallel region
    for (int64_t i = 0; i < T * D; i++) st(op, ocode, i, 0.f);
    return out;
  }
  const bool q13a = HX_QDOT && act_quant && (f13 == I8 || f13 == I4 || f13 == Q4K || (HX_Q512 && (f13 == I8G || is_lut(f13))));
  const bool q2a = HX_QDOT && act_quant && (f2 == I8 || f2 == I4 || f2 == Q4K || (HX_Q512 && (f2 == I8G || is_lut(f2))));
  ActSpec act;
  act.code = int(ea.code);
  act.alpha = float(ea.alpha);
  act.limit = float(ea.limit);
  TORCH_CHECK(act.code >= 0 && act.code <= 2, "cpu_moe: unknown activation code ", ea.code);
  if (ea.b13.has_value()) {
    TORCH_CHECK(ea.b13->scalar_type() == at::kFloat && ea.b13->is_contiguous() && ea.b13->numel() == w13.E * 2 * I,
                "cpu_moe: b13 must be a contiguous float32 [E, 2I]");
    act.b13 = ea.b13->data_ptr<float>();
  }

  // x -> int8 per 32-group for the integer path (in the layout w13's format reads), else fp32 (permuted per
  // 32-group when w13 is int4)
  Acts xa, ha;
  xa.K = D;
  ha.K = I;
#if HX_Q512
  if (q13a) {
    xa.q = buffer(cb.xq, T * D);
    xa.s = buffer(cb.xs, T * D / 32);
    xa.sum = buffer(cb.xsum, T * D / 32);
    if (f13 == I8) xa.sxl = buffer(cb.xsxl, T * D / 4);
    if (f13 == I8G && w13.G == 16) xa.sum16 = buffer(cb.xsum16, T * D / 16);
    const void* xp = x.data_ptr();
    for (int64_t t = 0; t < T; t++)
      for (int64_t g = 0; g < D / 32; g++) {
        const int64_t i = t * D + g * 32;
        qstore(xa, int(f13), t, g, load16x(xp, xcode, i), load16x(xp, xcode, i + 16));
      }
  } else
#endif
  {
    xa.f = buffer(cb.xf, T * D);
    for (int64_t i = 0; i < T * D; i++) xa.f[f13 == I4 ? (i / D) * D + perm_col(i % D) : i] = ld(x.data_ptr(), xcode, i);
    if (q13a) {
      xa.q = buffer(cb.xq, T * D);
      xa.s = buffer(cb.xs, T * D / 32);
      xa.sum = buffer(cb.xsum, T * D / 32);
      for (int64_t i = 0; i < T * D / 32; i++) quant32(xa.f + i * 32, xa.q + i * 32, xa.s + i, xa.sum + i);
    }
  }
  if (q2a) {
    ha.q = buffer(cb.hq, P * I);
    ha.s = buffer(cb.hs, P * I / 32);
    ha.sum = buffer(cb.hsum, P * I / 32);
    if (HX_Q512 && f2 == I8) ha.sxl = buffer(cb.hsxl, P * I / 4);
    if (HX_Q512 && f2 == I8G && w2.G == 16) ha.sum16 = buffer(cb.hsum16, P * I / 16);
  } else {
    ha.f = buffer(cb.hf, P * I);
  }
  const int64_t nb1 = I / RB1, nb2 = (D + RB2 - 1) / RB2, n1 = nA * nb1;
  const int64_t max2 = std::max<int64_t>(1, 16384 / (T * RB2));   // stage-2 claims: acc tile <= 64 KB
  const int64_t pfd = HX_Q512 ? prefetch_rows : 0;                // 512-bit path: prefetch distance (steps)
  std::atomic<int64_t> next1{0}, next2{0};

#pragma omp parallel num_threads(int(nthreads))
  {
    const int64_t nth = omp_get_num_threads();
    float* acc = scratch(1, T * RB2 * max2);
    int64_t u0, u1;
    while (claim(next1, n1, nth, n1, u0, u1))
      for (int64_t u = u0; u < u1; u++) {
        const int64_t na = u + 1 < u1 ? (u + 1) / nb1 : -1, nr0 = ((u + 1) % nb1) * RB1;
        gate_up_unit(w13, p, u / nb1, (u % nb1) * RB1, na, nr0, xa, ha, int(f2), pfd, act);
      }
#pragma omp barrier
    while (claim(next2, nb2, nth, max2, u0, u1)) {
      const int64_t d0 = u0 * RB2, d1 = std::min(D, u1 * RB2), R = d1 - d0;
      down_rows(w2, p, d0, d1, ha, acc, T, pfd);
      for (int64_t t = 0; t < T; t++)
        for (int64_t d = d0; d < d1; d++) st(op, ocode, t * D + d, acc[t * R + d - d0]);
    }
  }
  return out;
}

}  // namespace

// The binding runs with the GIL released; an exception must not unwind through that boundary (seen on the
// H200 build: a bad expert id crashed the process). Errors come back as a message; the caller raises.
std::string forward_checked(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts, int64_t f13,
                            const at::Tensor& q13, const c10::optional<at::Tensor>& s13,
                            const c10::optional<at::Tensor>& z13, int64_t f2, const at::Tensor& q2,
                            const c10::optional<at::Tensor>& s2, const c10::optional<at::Tensor>& z2,
                            at::Tensor out, int64_t nthreads, bool act_quant, int64_t prefetch_rows,
                            const ExpertAct& act) {
  try {
    forward(x, ids, wts, f13, q13, s13, z13, f2, q2, s2, z2, out, nthreads, act_quant, prefetch_rows, act);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return std::string();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "forward",
      [](const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts, int64_t f13, const at::Tensor& q13,
         const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& z13, int64_t f2,
         const at::Tensor& q2, const c10::optional<at::Tensor>& s2, const c10::optional<at::Tensor>& z2,
         at::Tensor out, int64_t nthreads, bool act_quant, int64_t prefetch_rows, int64_t act, double alpha,
         double limit, const c10::optional<at::Tensor>& b13) {
        return forward_checked(x, ids, wts, f13, q13, s13, z13, f2, q2, s2, z2, out, nthreads, act_quant,
                               prefetch_rows, ExpertAct{act, alpha, limit, b13});
      },
      py::call_guard<py::gil_scoped_release>(),
      "fused MoE layer: forward(x, ids, weights, f13, q13, s13, z13, f2, q2, s2, z2, out, nthreads, act_quant, "
      "prefetch_rows, act, alpha, limit, b13)");
  m.def("int_dot", []() { return std::string(HX_QDOT_KIND); });
  m.def("simd", []() { return std::string(HX_SIMD); });
  m.def("max_threads", []() { return omp_get_max_threads(); });
  register_worker(m);
}
