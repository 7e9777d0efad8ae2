// 4-bit lookup expert rows (weights.py LUT4: GGUF MXFP4 / IQ4_NL / IQ4_XS blocks read in place, every path).
//
// A row of K weights is K / B blocks as in the file. Every 32-group g of the row is 16 index bytes (byte j:
// column j in the low nibble, column j + 16 in the high one) into a 16-entry int8 table, times one fp32
// scale per group:  w = scale_g * table[index]  (the product rounded once, as gguf and quant.dequantize do).
//   MXFP4  (B 32,  17 bytes): e8m0 e @0, indices @1           scale = 2^(e - 128)   table: e2m1 doubled
//   IQ4_NL (B 32,  18 bytes): d fp16 @0, indices @2           scale = d             table: kvalues_iq4nl
//   IQ4_XS (B 256, 136 bytes): d fp16 @0, scales_h u16 @2, scales_l @4, indices @8 (16 bytes per group)
//                                                             scale = d (ls - 32)   table: kvalues_iq4nl
// kind = format code - 7 (cpu_moe.cpp Fmt: MXF4 = 7, IQ4NL = 8, IQ4XS = 9).
#pragma once
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace lut4 {

enum Kind : int { MXFP4 = 0, IQ4NL = 1, IQ4XS = 2 };

alignas(16) inline constexpr int8_t kValues[3][16] = {
    {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12},
    {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113},
    {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113}};
inline constexpr int64_t kBlockW[3] = {32, 32, 256};     // weights per block
inline constexpr int64_t kBlockB[3] = {17, 18, 136};     // bytes per block

inline int64_t row_bytes(int kind, int64_t K) { return K / kBlockW[kind] * kBlockB[kind]; }

// The 16 index bytes of 32-group g of a row.
inline const uint8_t* indices(const uint8_t* row, int kind, int64_t g) {
  switch (kind) {
    case MXFP4: return row + g * 17 + 1;
    case IQ4NL: return row + g * 18 + 2;
    default: return row + (g >> 3) * 136 + 8 + (g & 7) * 16;
  }
}

// ggml_e8m0_to_fp32_half: 2^(e - 128), exact (e < 2: subnormals).
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : uint32_t(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The fp32 scale of 32-group g of a row.
inline float scale(const uint8_t* row, int kind, int64_t g) {
  uint16_t h;
  switch (kind) {
    case MXFP4: return e8m0_half(row[g * 17]);
    case IQ4NL: std::memcpy(&h, row + g * 18, 2); return h2f(h);
    default: {
      const uint8_t* b = row + (g >> 3) * 136;
      const int ib = int(g & 7);
      uint16_t sh;
      std::memcpy(&h, b, 2);
      std::memcpy(&sh, b + 2, 2);
      const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
      return h2f(h) * float(ls - 32);
    }
  }
}

// The 32 weights of group g as fp32 (w[j] = column j), the same products as quant.dequantize.
inline void group_weights(const uint8_t* row, int kind, int64_t g, float* w) {
  const float s = scale(row, kind, g);
  const uint8_t* q = indices(row, kind, g);
  const int8_t* tab = kValues[kind];
  for (int j = 0; j < 16; j++) {
    w[j] = s * float(tab[q[j] & 15]);
    w[j + 16] = s * float(tab[q[j] >> 4]);
  }
}

}  // namespace lut4
