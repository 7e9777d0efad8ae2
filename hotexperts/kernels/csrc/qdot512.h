// 512-bit integer dot products for the CPU MoE kernel's integer path (AVX-512 F/BW/VL + VNNI; HX_Q512 = 1).
//
// Several weight rows (R) times several int8 activation rows (NT <= 4) per call: every weight byte is
// loaded and unpacked once for all NT tokens, every activation vector once for all R rows, the R x NT
// accumulators are independent chains, and the horizontal sums are done at the end, 4 at a time.
//
// int4g32 rows (16 bytes per 32-group): one zmm = 64 bytes = 4 groups. lo = b & 15 holds the even columns of
// the 4 groups (16 per 128-bit lane), hi = (b >> 4) & 15 the odd ones. The activations are stored to match
// (q4_group_pos): per block of 4 groups (128 columns) the 64 even-column bytes, then the 64 odd ones (a last
// block of nb < 4 groups: 16 nb even bytes, then 16 nb odd ones). vpdpbusd(lo, x_even) + vpdpbusd(hi, x_odd)
// leaves group g's partial sums in int32 lanes 4g..4g+3; they are converted to fp32 and FMA'd with
// s_g sx_g (the 16 groups' s * sx of a chunk of 16 groups, spread 4 lanes per group with vpermps).
// The zero term sum_g (z_g - 8 s_g) xsum_g is FMA'd into the same accumulator once per 16 groups (16 lanes
// = 16 groups): the accumulator's lanes mean different things, but only its total is used.
//
// int8 rows: no 512-bit vpsignb, so the signed weights are offset to u8: (w ^ 0x80) = w + 128, and
//   sum_j w_j x_j = sum_j (w_j + 128) x_j - 128 sum_j x_j;
// the last term, summed over groups with the group scales, is 128 * X (X = sum_g xsum_g, one float per
// activation row), so it costs nothing per weight. One zmm = 64 bytes = 2 groups; int32 lanes 0..7 belong
// to the first group, 8..15 to the second, and are scaled by sxl (sx per int32 lane, K/4 floats per row).
// Per-lane sums stay <= 4 * 255 * 127 < 2^31 (vpdpbusd does not saturate): the integer part is exact; the
// 128 X term is subtracted in fp32 at the end (rounding ~1e-7 of 128 |X|, far below the int8 activation error).
//
// int8gG rows (G = 32 or 16 columns per weight group, scale s_g and zero z_g per group; w = q s + z): the
// same w ^ 0x80 offset, so per group sum_j w_j x_j = s_g sum_j (w_j + 128) xq_j sx + (z_g - 128 s_g) xsum_g
// (xsum_g = the activations' sum over the weight group: xsum per 32-group, or sum16 per 16 for G = 16).
// A chunk is 16 weight groups: s_g sx_g of its groups (sx of the activation 32-group holding weight group g)
// in one vector, spread over each 64-byte block's int32 lanes with vpermps (G = 32: 2 groups x 8 lanes,
// kSpread8; G = 16: 4 groups x 4 lanes, kSpread), and the zero term FMA'd once per chunk as for int4.
//
// Prefetch: the caller names the rows it reads a few steps later; they go to L2 (prefetcht1): into L1
// (prefetcht0) they were evicted before use and measured no better than no prefetch (docs/cpu-kernel.md).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace q512 {

#define HX_INLINE inline __attribute__((always_inline))

// vpermps indices that spread lanes 4j..4j+3 (s * sx of block j's 4 groups) over 4 lanes each
alignas(64) inline constexpr int32_t kSpread[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

// lanes 0..7 -> group 2j, lanes 8..15 -> group 2j + 1 (int8g32: block j of a 16-group chunk)
alignas(64) inline constexpr int32_t kSpread8[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},         {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},         {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},         {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
    {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}};
// lane i -> i / 2 (a 16-column weight group's activation 32-group)
alignas(64) inline constexpr int32_t kDup2[16] = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7};

// up to 4 activation rows (int8, per-32-group scale s, xsum, and for int8 weights sxl and X = sum(xsum);
// for int8g16 weights sum16, the sums per 16 columns)
struct QTile {
  int n = 0;
  const int8_t* q[4];
  const float* s[4];
  const float* sum[4];
  const float* sum16[4];
  const float* sxl[4];
  float X[4];
};

// R weight rows: their packed bytes, and (int4) their per-group scales and zeros. A second Rows names the rows
// to prefetch (those a few steps later in the caller's sequence), line by line as the current ones are read.
template <int R>
struct Rows {
  const uint8_t* q[R];
  const char* s[R];
  const char* z[R];
};

#ifndef HX_PF_HINT
#define HX_PF_HINT _MM_HINT_T1
#endif
HX_INLINE void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), HX_PF_HINT); }

// Where group g's 16 even-column and 16 odd-column bytes live in an int4-layout activation row of G groups.
inline void q4_group_pos(int64_t g, int64_t G, int64_t& lo, int64_t& hi) {
  const int64_t blk = g / 4, nb = std::min<int64_t>(4, G - 4 * blk);
  lo = blk * 128 + (g % 4) * 16;
  hi = lo + nb * 16;
}

// 16 scale/zero values (fp32 = 0, bf16 = 1, fp16 = 2; lanes outside mask m are 0) as fp32.
HX_INLINE __m512 load16(const void* p, int code, __mmask16 m) {
  switch (code) {
    case 1: {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    case 2: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
    default: return _mm512_maskz_loadu_ps(m, p);
  }
}

// Sums of 4 vectors -> [sum a, sum b, sum c, sum d].
HX_INLINE __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));   // a02 b02 a13 b13
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[i] = total of acc[i], i < n (n = R * NT accumulators).
template <int N>
HX_INLINE void reduce(const __m512 (&acc)[N], float* out) {
#pragma GCC unroll 4
  for (int i = 0; i + 4 <= N; i += 4) _mm_storeu_ps(out + i, hsum4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
#pragma GCC unroll 4
  for (int i = N / 4 * 4; i < N; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// One chunk of up to 16 groups from group c on (FULL: exactly 16, no masks; else ng < 16, masked loads).
template <int R, int NT, bool FULL>
HX_INLINE void q4_chunk(const Rows<R>& w, const Rows<R>* pf, int scode, int zcode, int64_t c, int ng, const QTile& x,
                     __m512* acc) {
  const __m512i m4 = _mm512_set1_epi8(15);
  const int ssz = scode == 0 ? 4 : 2, zsz = zcode == 0 ? 4 : 2;
  const __mmask16 gm = FULL ? __mmask16(0xFFFF) : __mmask16((1u << ng) - 1);
  __m512 cs[R * NT];                                     // s_g * sx_g of the chunk's 16 groups
#pragma GCC unroll 16
  for (int r = 0; r < R; r++) {
    if (pf) {
      prefetch(pf->s[r] + c * ssz);
      prefetch(pf->s[r] + (c + ng) * ssz - 1);
      prefetch(pf->z[r] + c * zsz);
      prefetch(pf->z[r] + (c + ng) * zsz - 1);
    }
    const __m512 sv = load16(w.s[r] + c * ssz, scode, gm);
    const __m512 zv = load16(w.z[r] + c * zsz, zcode, gm);
    const __m512 zc = _mm512_fmadd_ps(sv, _mm512_set1_ps(-8.f), zv);
  #pragma GCC unroll 16
    for (int t = 0; t < NT; t++) {
      cs[r * NT + t] = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(gm, x.s[t] + c));
      acc[r * NT + t] = _mm512_fmadd_ps(zc, _mm512_maskz_loadu_ps(gm, x.sum[t] + c), acc[r * NT + t]);
    }
  }
  const int nblk = FULL ? 4 : (ng + 3) / 4;
#pragma GCC unroll 4
  for (int j = 0; j < nblk; j++) {
    const int nb = FULL ? 4 : std::min(4, ng - 4 * j);  // groups in this block (< 4: the row's last one)
    const int64_t g0 = c + 4 * j;
    const __mmask64 bm = nb == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * nb)) - 1;
    const __m512i sp = _mm512_load_si512(kSpread[j]);
    __m512i xl[NT], xh[NT];
  #pragma GCC unroll 16
    for (int t = 0; t < NT; t++) {
      if (FULL) {
        xl[t] = _mm512_loadu_si512(x.q[t] + g0 * 32);
        xh[t] = _mm512_loadu_si512(x.q[t] + g0 * 32 + 64);
      } else {
        xl[t] = _mm512_maskz_loadu_epi8(bm, x.q[t] + g0 * 32);
        xh[t] = _mm512_maskz_loadu_epi8(bm, x.q[t] + g0 * 32 + 16 * nb);
      }
    }
  #pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
      if (pf) prefetch(pf->q[r] + g0 * 16);
      const uint8_t* qp = w.q[r] + g0 * 16;
      const __m512i b = FULL ? _mm512_loadu_si512(qp) : _mm512_maskz_loadu_epi8(bm, qp);
      const __m512i lo = _mm512_and_si512(b, m4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
#pragma GCC unroll 16
      for (int t = 0; t < NT; t++) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl[t]), hi, xh[t]);
        acc[r * NT + t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(sp, cs[r * NT + t]),
                                          acc[r * NT + t]);
      }
    }
  }
}

// res[r * NT + t] = int4 row r (G groups) . activation row t; pf (or nullptr): rows to prefetch.
template <int R, int NT>
HX_INLINE void q4_rows(const Rows<R>& w, const Rows<R>* pf, int scode, int zcode, int64_t G, const QTile& x,
                    float* res) {
  __m512 acc[R * NT];
#pragma GCC unroll 16
  for (int i = 0; i < R * NT; i++) acc[i] = _mm512_setzero_ps();
  int64_t c = 0;
#pragma GCC unroll 1
  for (; c + 16 <= G; c += 16) q4_chunk<R, NT, true>(w, pf, scode, zcode, c, 16, x, acc);
  if (c < G) q4_chunk<R, NT, false>(w, pf, scode, zcode, c, int(G - c), x, acc);
  reduce<R * NT>(acc, res);
}

// One 64-column block at k (FULL) or the row's last 32 columns (one group; masked loads) of int8 rows.
template <int R, int NT, bool FULL>
HX_INLINE void q8_block(const Rows<R>& w, const Rows<R>* pf, int64_t k, const QTile& x, __m512* acc) {
  const __m512i off = _mm512_set1_epi8(char(0x80));
  const __mmask64 bm = __mmask64(0xFFFFFFFFull);
  __m512i xv[NT];
  __m512 sv[NT];
#pragma GCC unroll 16
  for (int t = 0; t < NT; t++) {
    xv[t] = FULL ? _mm512_loadu_si512(x.q[t] + k) : _mm512_maskz_loadu_epi8(bm, x.q[t] + k);
    sv[t] = FULL ? _mm512_loadu_ps(x.sxl[t] + k / 4) : _mm512_maskz_loadu_ps(0xFF, x.sxl[t] + k / 4);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; r++) {
    if (pf) prefetch(pf->q[r] + k);
    const __m512i b = FULL ? _mm512_loadu_si512(w.q[r] + k) : _mm512_maskz_loadu_epi8(bm, w.q[r] + k);
    const __m512i u = _mm512_xor_si512(b, off);
#pragma GCC unroll 16
    for (int t = 0; t < NT; t++) {
      const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv[t]);
      acc[r * NT + t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv[t], acc[r * NT + t]);
    }
  }
}

// res[r * NT + t] = (int8 row r, K columns) . activation row t, before the row's scale; pf: rows to prefetch.
template <int R, int NT>
HX_INLINE void q8_rows(const Rows<R>& w, const Rows<R>* pf, int64_t K, const QTile& x, float* res) {
  __m512 acc[R * NT];
#pragma GCC unroll 16
  for (int i = 0; i < R * NT; i++) acc[i] = _mm512_setzero_ps();
  if (pf)
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) prefetch(pf->s[r]);       // the row's scale
  int64_t k = 0;
#pragma GCC unroll 1
  for (; k + 64 <= K; k += 64) q8_block<R, NT, true>(w, pf, k, x, acc);
  if (k < K) q8_block<R, NT, false>(w, pf, k, x, acc);
  reduce<R * NT>(acc, res);
#pragma GCC unroll 16
  for (int r = 0; r < R; r++)
#pragma GCC unroll 16
    for (int t = 0; t < NT; t++) res[r * NT + t] -= 128.f * x.X[t];
}

// One chunk of up to 16 weight groups from group c on of int8gG rows (G16: G = 16, else 32; FULL: 16 groups).
template <int R, int NT, bool G16, bool FULL>
HX_INLINE void q8g_chunk(const Rows<R>& w, const Rows<R>* pf, int scode, int zcode, int64_t c, int ng,
                         const QTile& x, __m512* acc) {
  constexpr int GS = G16 ? 16 : 32;
  const int ssz = scode == 0 ? 4 : 2, zsz = zcode == 0 ? 4 : 2;
  const __mmask16 gm = FULL ? __mmask16(0xFFFF) : __mmask16((1u << ng) - 1);
  __m512 sxg[NT], xsg[NT];                              // per weight group: activation scale, sum
#pragma GCC unroll 16
  for (int t = 0; t < NT; t++) {
    if (G16) {
      const __mmask16 hm = FULL ? __mmask16(0xFF) : __mmask16((1u << ((ng + 1) / 2)) - 1);
      sxg[t] = _mm512_maskz_permutexvar_ps(gm, _mm512_load_si512(kDup2), _mm512_maskz_loadu_ps(hm, x.s[t] + c / 2));
      xsg[t] = _mm512_maskz_loadu_ps(gm, x.sum16[t] + c);
    } else {
      sxg[t] = _mm512_maskz_loadu_ps(gm, x.s[t] + c);
      xsg[t] = _mm512_maskz_loadu_ps(gm, x.sum[t] + c);
    }
  }
  __m512 cs[R * NT];
#pragma GCC unroll 16
  for (int r = 0; r < R; r++) {
    if (pf) {
      prefetch(pf->s[r] + c * ssz);
      prefetch(pf->s[r] + (c + ng) * ssz - 1);
      if (pf->z[r]) prefetch(pf->z[r] + c * zsz);
    }
    const __m512 sv = load16(w.s[r] + c * ssz, scode, gm);
    const __m512 zv = w.z[r] ? load16(w.z[r] + c * zsz, zcode, gm) : _mm512_setzero_ps();
    const __m512 zc = _mm512_fmadd_ps(sv, _mm512_set1_ps(-128.f), zv);
  #pragma GCC unroll 16
    for (int t = 0; t < NT; t++) {
      cs[r * NT + t] = _mm512_mul_ps(sv, sxg[t]);
      acc[r * NT + t] = _mm512_fmadd_ps(zc, xsg[t], acc[r * NT + t]);
    }
  }
  const __m512i off = _mm512_set1_epi8(char(0x80));
  const int64_t col0 = c * GS;
  const int ncols = FULL ? 16 * GS : ng * GS;
  const int nblk = FULL ? 16 * GS / 64 : (ncols + 63) / 64;
#pragma GCC unroll 8
  for (int j = 0; j < nblk; j++) {
    const int nbytes = FULL ? 64 : std::min(64, ncols - 64 * j);
    const __mmask64 bm = nbytes == 64 ? ~__mmask64(0) : (__mmask64(1) << nbytes) - 1;
    const __m512i sp = _mm512_load_si512(G16 ? kSpread[j] : kSpread8[j]);
    const int64_t k = col0 + 64 * j;
    __m512i xv[NT];
  #pragma GCC unroll 16
    for (int t = 0; t < NT; t++) xv[t] = FULL ? _mm512_loadu_si512(x.q[t] + k) : _mm512_maskz_loadu_epi8(bm, x.q[t] + k);
  #pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
      if (pf) prefetch(pf->q[r] + k);
      const __m512i b = FULL ? _mm512_loadu_si512(w.q[r] + k) : _mm512_maskz_loadu_epi8(bm, w.q[r] + k);
      const __m512i u = _mm512_xor_si512(b, off);
#pragma GCC unroll 16
      for (int t = 0; t < NT; t++) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv[t]);
        acc[r * NT + t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(sp, cs[r * NT + t]),
                                          acc[r * NT + t]);
      }
    }
  }
}

// res[r * NT + t] = int8gG row r (NG weight groups) . activation row t; pf (or nullptr): rows to prefetch.
template <int R, int NT, bool G16>
HX_INLINE void q8g_rows(const Rows<R>& w, const Rows<R>* pf, int scode, int zcode, int64_t NG, const QTile& x,
                        float* res) {
  __m512 acc[R * NT];
#pragma GCC unroll 16
  for (int i = 0; i < R * NT; i++) acc[i] = _mm512_setzero_ps();
  int64_t c = 0;
#pragma GCC unroll 1
  for (; c + 16 <= NG; c += 16) q8g_chunk<R, NT, G16, true>(w, pf, scode, zcode, c, 16, x, acc);
  if (c < NG) q8g_chunk<R, NT, G16, false>(w, pf, scode, zcode, c, int(NG - c), x, acc);
  reduce<R * NT>(acc, res);
}

// 32 fp32 values (v0: columns 0..15 of the group, v1: 16..31) -> int8 like quant32 (cpu_moe.cpp) does,
// bit for bit (fp32 multiply by 127 / amax, round half to even). split: even columns -> lo[0..15], odd ->
// hi[0..15] (int4 layout), else columns 0..15 -> lo, 16..31 -> hi. sum16 (or nullptr): the two halves' sums.
inline void quant32v(__m512 v0, __m512 v1, bool split, int8_t* lo, int8_t* hi, float* s, float* sum,
                     float* sum16 = nullptr) {
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  if (split) {
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512 e = _mm512_permutex2var_ps(v0, ev, v1), o = _mm512_permutex2var_ps(v0, od, v1);
    v0 = e;
    v1 = o;
  }
  const __m512 vi = _mm512_set1_ps(inv);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vi)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtepi32_epi8(q1));
  *s = amax / 127.f;
  *sum = *s * float(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
  if (sum16) {
    sum16[0] = *s * float(_mm512_reduce_add_epi32(q0));
    sum16[1] = *s * float(_mm512_reduce_add_epi32(q1));
  }
}

}  // namespace q512
