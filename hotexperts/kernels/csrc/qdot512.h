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
// q4_k rows (GGUF Q4_K blocks of 256 weights, 144 bytes: d, dmin fp16, 12 bytes of 6-bit (sc, m) x 8,
// 128 bytes of nibbles: chunk c of 32 bytes holds sub-block 2c in its low nibbles, 2c + 1 in its high ones):
// one zmm q = chunks 2h, 2h + 1 (half h of the block) = 128-bit lanes [c0a c0b c1a c1b] (a, b: bytes 0..15 and
// 16..31 of a chunk). A = [c0a c0a c1a c1a] & [0F F0 0F F0] and B = the same of the b lanes (one vshufi64x2 and
// one and each) hold, per 128-bit lane, sub-blocks 4h, 4h + 1, 4h + 2, 4h + 3 (columns 0..15 in A, 16..31 in
// B); the high nibbles stay in place (q & 0xF0 = 16 q_hi: the odd sub-blocks' activation scales carry 1/16).
// The activations are stored to match (q4k_act_pos: per 4 groups their first halves, then their second
// halves), so vpdpbusd(vpdpbusd(0, A, xa), B, xb) leaves sub-block 4h + k's sum in int32 lanes 4k..4k+3, as
// int4g32's blocks do (kSpread). Per block the 4 rows' headers are decoded at once (q4k_dec4, one zmm) into
// dm = [d sc_0..7 | dmin m_0..7] per row; per token dm * [sx_0..7 | xsum_0..7] gives d sc_j sx_j in lanes
// 0..7 (spread 4 lanes per sub-block with one vpermps per half) and the min terms dmin m_j xsum_j in lanes
// 8..15, subtracted from the accumulator (only its total is used). Lane sums <= 8 * 240 * 127: exact.
//
// LUT4 rows (lut4.h: MXFP4 / IQ4_NL / IQ4_XS blocks, 16 index bytes + one scale per 32-group): per block of
// 4 groups one zmm b holds the 4 groups' index bytes (128-bit lane k = group g0 + k; IQ4_XS: one 64-byte load,
// else 4 unaligned 16-byte loads). lo = b & 15 indexes columns 0..15, hi = b >> 4 columns 16..31; the 16-entry
// table, offset to u8 (t + 128: 1..255) and broadcast to every 128-bit lane, is looked up with one vpshufb
// each (the 16 entries fit one lane, as llama.cpp does for IQ4_NL; with VBMI one vpermb each, no mask). The activations are stored in the int4
// block layout without the even/odd split (q4_group_pos: per 4 groups their first halves, then their second
// halves), so vpdpbusd(vpdpbusd(0, T[lo], x_lo), T[hi], x_hi) leaves group g0 + k's sum in lanes 4k..4k+3.
// Per group: sum_j w_j x_j = s_g sx_g sum_j (t_j + 128) xq_j - 128 s_g xsum_g; the first term is FMA'd with
// s_g sx_g spread over its 4 lanes (kSpread), the second once per 16 groups into the same accumulator (only
// its total is used). Lane sums <= 8 * 255 * 127 < 2^31: exact.
//
// Prefetch: the caller names the rows it reads a few steps later; they go to L2 (prefetcht1): into L1
// (prefetcht0) they were evicted before use and measured no better than no prefetch (docs/cpu-kernel.md).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "lut4.h"
#include "simd.h"

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
// q4_k: dwords 0, 4, 8, 12 (rows 0..3's d|dmin) to lanes 0..3
alignas(64) inline constexpr int32_t kQ4kHdr[16] = {0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
// q4_k: [d_r x8 | dmin_r x8] from [d_0, dmin_0, d_1, dmin_1, ...]
alignas(64) inline constexpr int32_t kQ4kDD[4][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5}, {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7}};
// q4_k: byte 4i of the result <- byte 16 r + i of the decoded scales (row r's sc_0..7, m_0..7 as int32 lanes)
#define HX_Q4K_ROW(r)                                                                                          \
  {16 * r + 0, 0, 0, 0, 16 * r + 1, 0, 0, 0, 16 * r + 2, 0, 0, 0, 16 * r + 3, 0, 0, 0, 16 * r + 4, 0, 0, 0,     \
   16 * r + 5, 0, 0, 0, 16 * r + 6, 0, 0, 0, 16 * r + 7, 0, 0, 0, 16 * r + 8, 0, 0, 0, 16 * r + 9, 0, 0, 0,     \
   16 * r + 10, 0, 0, 0, 16 * r + 11, 0, 0, 0, 16 * r + 12, 0, 0, 0, 16 * r + 13, 0, 0, 0, 16 * r + 14, 0, 0, 0, \
   16 * r + 15, 0, 0, 0}
alignas(64) inline constexpr uint8_t kQ4kSm[4][64] = {HX_Q4K_ROW(0), HX_Q4K_ROW(1), HX_Q4K_ROW(2), HX_Q4K_ROW(3)};
#undef HX_Q4K_ROW
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

// Where 32-group g's first and last 16 bytes live in a q4_k-layout activation row: per 128 columns (4 groups),
// the 4 groups' first halves (64 bytes), then their second halves.
inline void q4k_act_pos(int64_t g, int64_t& lo, int64_t& hi) {
  lo = (g / 4) * 128 + (g % 4) * 16;
  hi = lo + 64;
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

// One weight row's 4-group block times NT activation rows, the step int4g32, q4_k and LUT4 rows share:
// acc[t] += float(lo . xl[t] + hi . xh[t]) * spread(cs[t]), two vpdpbusd (u8 weights lo/hi x s8 activations)
// leaving group k's partial sums in int32 lanes 4k..4k+3, and sp (kSpread[j]) spreading the groups' scales
// cs[t] (s_g sx_g of a 16-group chunk) over those lanes. acc and cs point at the row's NT entries.
template <int NT>
HX_INLINE void dot2_spread(__m512i lo, __m512i hi, const __m512i* xl, const __m512i* xh, __m512i sp,
                           const __m512* cs, __m512* acc) {
#pragma GCC unroll 16
  for (int t = 0; t < NT; t++) {
    const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl[t]), hi, xh[t]);
    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(sp, cs[t]), acc[t]);
  }
}

// A chunk's activation scales and zero term for NT tokens (int4g32 and LUT4 rows; lanes = the chunk's 16
// groups from group c, those outside gm 0): cs[t] = sv * sx_t, acc[t] += zc * xsum_t.
template <int NT>
HX_INLINE void chunk_scales(__m512 sv, __m512 zc, const QTile& x, int64_t c, __mmask16 gm, __m512* cs,
                            __m512* acc) {
#pragma GCC unroll 16
  for (int t = 0; t < NT; t++) {
    cs[t] = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(gm, x.s[t] + c));
    acc[t] = _mm512_fmadd_ps(zc, _mm512_maskz_loadu_ps(gm, x.sum[t] + c), acc[t]);
  }
}

// The NT tokens' activation bytes of the block of nb groups from group g0 (q4_group_pos layout: their 16 nb
// first bytes, then 16 nb second ones; bm masks 16 nb bytes): FULL (nb = 4) two unmasked 64-byte loads each.
template <int NT, bool FULL>
HX_INLINE void act_block(const QTile& x, int64_t g0, int nb, __mmask64 bm, __m512i* xl, __m512i* xh) {
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
    chunk_scales<NT>(sv, zc, x, c, gm, cs + r * NT, acc + r * NT);
  }
  const int nblk = FULL ? 4 : (ng + 3) / 4;
#pragma GCC unroll 4
  for (int j = 0; j < nblk; j++) {
    const int nb = FULL ? 4 : std::min(4, ng - 4 * j);  // groups in this block (< 4: the row's last one)
    const int64_t g0 = c + 4 * j;
    const __mmask64 bm = nb == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * nb)) - 1;
    const __m512i sp = _mm512_load_si512(kSpread[j]);
    __m512i xl[NT], xh[NT];
    act_block<NT, FULL>(x, g0, nb, bm, xl, xh);
  #pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
      if (pf) prefetch(pf->q[r] + g0 * 16);
      const uint8_t* qp = w.q[r] + g0 * 16;
      const __m512i b = FULL ? _mm512_loadu_si512(qp) : _mm512_maskz_loadu_epi8(bm, qp);
      const __m512i lo = _mm512_and_si512(b, m4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
      dot2_spread<NT>(lo, hi, xl, xh, sp, cs + r * NT, acc + r * NT);
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

// Decode 4 rows' Q4_K headers at once: h lane r = bytes 0..15 of row r's block [d|dmin, s0-3, s4-7, s8-11] ->
// lane r = [sc0-3, sc4-7, m0-3, m4-7] (llama.cpp's masks and shifts, per 32-bit lane).
HX_INLINE __m512i q4k_dec4(__m512i h) {
  const __m512i P = _mm512_shuffle_epi32(h, _MM_PERM_ENUM(_MM_SHUFFLE(3, 2, 3, 1)));      // s0-3, s8-11, s4-7, s8-11
  const __m512i Q = _mm512_shuffle_epi32(h, _MM_PERM_ENUM(_MM_SHUFFLE(2, 2, 1, 1)));      // s0-3, s0-3, s4-7, s4-7
  const __m512i lowp = _mm512_and_si512(_mm512_srlv_epi32(P, _mm512_set4_epi32(4, 0, 0, 0)),
                                        _mm512_set4_epi32(0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f));
  const __m512i highp = _mm512_slli_epi32(
      _mm512_and_si512(_mm512_srli_epi32(Q, 6), _mm512_set4_epi32(0x03030303, 0, 0x03030303, 0)), 4);
  return _mm512_or_si512(lowp, highp);
}

// res[r * NT + t] = q4_k row r (NB blocks) . activation row t (q4k layout, see q4k_act_pos); pf: rows to prefetch.
template <int R, int NT>
HX_INLINE void q4k_rows(const Rows<R>& w, const Rows<R>* pf, int64_t NB, const QTile& x, float* res) {
  constexpr int64_t QB = 144;
  const int64_t lo4 = 0x0F0F0F0F0F0F0F0Fll, hi4 = int64_t(0xF0F0F0F0F0F0F0F0ull);
  const __m512i mk = _mm512_set_epi64(hi4, hi4, lo4, lo4, hi4, hi4, lo4, lo4);   // 128-bit lanes 0F F0 0F F0
  const __m512i hsel = _mm512_load_si512(kQ4kHdr);
  __m512 acc[R * NT];
#pragma GCC unroll 16
  for (int i = 0; i < R * NT; i++) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 1
  for (int64_t b = 0; b < NB; b++) {
    __m512 xs[NT];                                       // [sx_0..7 | xsum_0..7] of the block's sub-blocks
#pragma GCC unroll 16
    for (int t = 0; t < NT; t++)
      xs[t] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x.s[t] + 8 * b)),
                                 _mm256_loadu_ps(x.sum[t] + 8 * b), 1);
    __m512i h4 = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q[0] + b * QB)));
    if constexpr (R > 1) h4 = _mm512_inserti32x4(h4, _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q[1 % R] + b * QB)), 1);
    if constexpr (R > 2) h4 = _mm512_inserti32x4(h4, _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q[2 % R] + b * QB)), 2);
    if constexpr (R > 3) h4 = _mm512_inserti32x4(h4, _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q[3 % R] + b * QB)), 3);
    const __m512i dec = q4k_dec4(h4);
    const __m512 dd = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi32(hsel, h4)));   // d_r, dmin_r
    __m512 cs[R * NT];                                   // lanes 0..7: d sc_j sx_j; 8..15: dmin m_j xsum_j
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
      if (pf) {
        const uint8_t* pb = pf->q[r] + b * QB;
        prefetch(pb);
        prefetch(pb + 64);
        prefetch(pb + QB - 1);
      }
      const __m512 sm = _mm512_cvtepi32_ps(
          _mm512_maskz_permutexvar_epi8(0x1111111111111111ull, _mm512_load_si512(kQ4kSm[r]), dec));
      const __m512 dm = _mm512_mul_ps(sm, _mm512_permutexvar_ps(_mm512_load_si512(kQ4kDD[r]), dd));
#pragma GCC unroll 16
      for (int t = 0; t < NT; t++) {
        cs[r * NT + t] = _mm512_mul_ps(dm, xs[t]);
        acc[r * NT + t] = _mm512_mask_sub_ps(acc[r * NT + t], 0xFF00, acc[r * NT + t], cs[r * NT + t]);
      }
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
      const __m512i sp = _mm512_load_si512(kSpread[h]);
      __m512i xa[NT], xb[NT];
#pragma GCC unroll 16
      for (int t = 0; t < NT; t++) {
        xa[t] = _mm512_loadu_si512(x.q[t] + b * 256 + h * 128);
        xb[t] = _mm512_loadu_si512(x.q[t] + b * 256 + h * 128 + 64);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; r++) {
        const __m512i q = _mm512_loadu_si512(w.q[r] + b * QB + 16 + 64 * h);
        const __m512i A = _mm512_and_si512(_mm512_shuffle_i64x2(q, q, _MM_SHUFFLE(2, 2, 0, 0)), mk);
        const __m512i B = _mm512_and_si512(_mm512_shuffle_i64x2(q, q, _MM_SHUFFLE(3, 3, 1, 1)), mk);
        dot2_spread<NT>(A, B, xa, xb, sp, cs + r * NT, acc + r * NT);
      }
    }
  }
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

#if defined(__AVX512VBMI__)
// vpermt2b indices: byte 16 k + i <- byte k bb + i of a span of 4 blocks of bb bytes (group k's indices)
template <int BB>
struct SpanIdx {
  alignas(64) uint8_t v[64];
  constexpr SpanIdx() : v() {
    for (int k = 0; k < 4; k++)
      for (int i = 0; i < 16; i++) v[16 * k + i] = uint8_t(k * BB + i);
  }
};
inline constexpr SpanIdx<17> kSpan17{};
inline constexpr SpanIdx<18> kSpan18{};

HX_INLINE __mmask64 low_bytes(int n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }
#endif

// The index bytes of LUT4 groups g0 .. g0 + nb - 1 (nb <= 4; g0 a multiple of 4), one group per 128-bit lane
// (lanes past nb: any bytes; their activations are 0). IQ4_XS: one 64-byte load (the 4 groups of one
// super-block); MXFP4 / IQ4_NL with VBMI: the span of 4 blocks in two loads (the second, and a short span,
// masked: no read past the row) and one vpermt2b; without VBMI 4 loads of 16 bytes.
HX_INLINE __m512i lut_indices4(const uint8_t* row, int kind, int64_t g0, int nb) {
  const uint8_t* p = lut4::indices(row, kind, g0);
  if (kind == lut4::IQ4XS && nb == 4) return _mm512_loadu_si512(p);
#if defined(__AVX512VBMI__)
  const int bb = kind == lut4::MXFP4 ? 17 : 18, span = (nb - 1) * bb + 16;
  const __m512i a = _mm512_maskz_loadu_epi8(low_bytes(span), p);
  const __m512i b = span > 64 ? _mm512_maskz_loadu_epi8(low_bytes(span - 64), p + 64) : _mm512_setzero_si512();
  const __m512i idx = _mm512_load_si512(bb == 17 ? kSpan17.v : kSpan18.v);
  return _mm512_permutex2var_epi8(a, idx, b);
#else
  auto ld = [&](int k) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut4::indices(row, kind, g0 + k))); };
  __m512i b = _mm512_castsi128_si512(ld(0));
  b = _mm512_inserti32x4(b, nb > 1 ? ld(1) : _mm_setzero_si128(), 1);
  b = _mm512_inserti32x4(b, nb > 2 ? ld(2) : _mm_setzero_si128(), 2);
  return _mm512_inserti32x4(b, nb > 3 ? ld(3) : _mm_setzero_si128(), 3);
#endif
}

// The u8 table (t + 128) of 4 nibble values looked up per byte: vpermb reads the low 6 bits of each index and
// the table repeats every 16 bytes, so no mask is needed (without VBMI: vpshufb after & 15).
HX_INLINE __m512i lut_lookup(__m512i tab, __m512i nib) {
#if defined(__AVX512VBMI__)
  return _mm512_permutexvar_epi8(nib, tab);
#else
  return _mm512_shuffle_epi8(tab, _mm512_and_si512(nib, _mm512_set1_epi8(15)));
#endif
}

// The fp32 scales of LUT4 groups c .. c + 15 (lanes outside gm: 0), lut4::scale's values, gathered: MXFP4 the
// e8m0 byte (2^(e - 128) built as bits), IQ4_NL the fp16 d, IQ4_XS d and the 6-bit ls of each sub-block (c is a
// multiple of 16: two super-blocks).
HX_INLINE __m512 lut_scales16(const uint8_t* row, int kind, int64_t c, __mmask16 gm) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i zero = _mm512_setzero_si512();
  if (kind == lut4::IQ4XS) {
    const __m512i ib = _mm512_and_si512(lane, _mm512_set1_epi32(7));
    const __m512i off = _mm512_mullo_epi32(_mm512_srli_epi32(lane, 3), _mm512_set1_epi32(136));
    const uint8_t* base = row + (c >> 3) * 136;
    const __m512i dsh = _mm512_mask_i32gather_epi32(zero, gm, off, base, 1);          // d | scales_h << 16
    const __m512i sl4 = _mm512_mask_i32gather_epi32(zero, gm, off, base + 4, 1);      // scales_l[0..3]
    const __m512i lo = _mm512_and_si512(_mm512_srlv_epi32(sl4, _mm512_slli_epi32(ib, 2)), _mm512_set1_epi32(15));
    const __m512i hi = _mm512_and_si512(_mm512_srlv_epi32(_mm512_srli_epi32(dsh, 16), _mm512_slli_epi32(ib, 1)),
                                        _mm512_set1_epi32(3));
    const __m512i ls = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_and_si512(dsh, _mm512_set1_epi32(0xFFFF))));
    return _mm512_maskz_mul_ps(gm, d, _mm512_cvtepi32_ps(ls));
  }
  const int bb = kind == lut4::MXFP4 ? 17 : 18;
  const __m512i off = _mm512_mullo_epi32(lane, _mm512_set1_epi32(bb));
  const __m512i v = _mm512_mask_i32gather_epi32(zero, gm, off, row + c * bb, 1);
  if (kind == lut4::IQ4NL) return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF))));
  const __m512i e = _mm512_and_si512(v, _mm512_set1_epi32(0xFF));                     // e8m0 / 2 as fp32 bits
  const __m512i big = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
  const __m512i sub = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
  const __m512i bits = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(2)), big, sub);
  return _mm512_maskz_mov_ps(gm, _mm512_castsi512_ps(bits));
}

// One chunk of up to 16 groups from group c on of LUT4 rows (FULL: exactly 16); tab: the u8 table in every lane.
template <int R, int NT, bool FULL>
HX_INLINE void lut_chunk(const Rows<R>& w, const Rows<R>* pf, int kind, int64_t c, int ng, const QTile& x,
                         __m512i tab, __m512* acc) {
  const __mmask16 gm = FULL ? __mmask16(0xFFFF) : __mmask16((1u << ng) - 1);
  __m512 cs[R * NT];                                     // s_g * sx_g of the chunk's 16 groups
#pragma GCC unroll 16
  for (int r = 0; r < R; r++) {
    const __m512 sv = lut_scales16(w.q[r], kind, c, gm);
    const __m512 zc = _mm512_mul_ps(sv, _mm512_set1_ps(-128.f));
    chunk_scales<NT>(sv, zc, x, c, gm, cs + r * NT, acc + r * NT);
  }
  const int nblk = FULL ? 4 : (ng + 3) / 4;
#pragma GCC unroll 4
  for (int j = 0; j < nblk; j++) {
    const int nb = FULL ? 4 : std::min(4, ng - 4 * j);
    const int64_t g0 = c + 4 * j;
    const __mmask64 bm = nb == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * nb)) - 1;
    const __m512i sp = _mm512_load_si512(kSpread[j]);
    __m512i xl[NT], xh[NT];
    act_block<NT, FULL>(x, g0, nb, bm, xl, xh);
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
      if (pf) prefetch(lut4::indices(pf->q[r], kind, g0));
      const __m512i b = lut_indices4(w.q[r], kind, g0, nb);
      const __m512i lo = lut_lookup(tab, b), hi = lut_lookup(tab, _mm512_srli_epi16(b, 4));
      dot2_spread<NT>(lo, hi, xl, xh, sp, cs + r * NT, acc + r * NT);
    }
  }
}

// res[r * NT + t] = LUT4 row r (G groups, format kind) . activation row t (q4_group_pos layout, unsplit).
template <int R, int NT>
HX_INLINE void lut_rows(const Rows<R>& w, const Rows<R>* pf, int kind, int64_t G, const QTile& x, float* res) {
  const __m512i tab = _mm512_xor_si512(
      _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lut4::kValues[kind]))),
      _mm512_set1_epi8(char(0x80)));                     // t + 128 as u8
  __m512 acc[R * NT];
#pragma GCC unroll 16
  for (int i = 0; i < R * NT; i++) acc[i] = _mm512_setzero_ps();
  int64_t c = 0;
#pragma GCC unroll 1
  for (; c + 16 <= G; c += 16) lut_chunk<R, NT, true>(w, pf, kind, c, 16, x, tab, acc);
  if (c < G) lut_chunk<R, NT, false>(w, pf, kind, c, int(G - c), x, tab, acc);
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
