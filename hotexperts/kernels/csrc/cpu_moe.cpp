// Fused CPU MoE for one layer: every routed (token, expert) pair of the call in ONE call.
//
//   y[t] = sum_k w[t,k] * W2_e (silu(G_e x_t) * (U_e x_t)),  e = ids[t,k]; ids == -1 is skipped.
//
// Weights (contiguous, E experts stacked):  w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I].
// Formats: f32, bf16, f16, int8 (per-row scale), int4g32 (q [N, K/2] uint8, low nibble = even column;
// scale, zero [N, K/32]; w = (q - 8) * scale + zero). Activations and accumulation are fp32.
//
// Plan: (0) group pairs by expert (counting sort); (1) h = silu(G x) * (U x) in parallel over
// (active expert x block of I rows); (2) y in parallel over blocks of D output rows, each unit looping over
// all active experts, so every output element has one writer and `out` is written, not accumulated.
// Each weight row is read once per call and used for up to 4 tokens at a time (token tiles).
// int4 rows hold even columns in low nibbles, so their input vector is permuted per 32-group
// (16 even columns, then 16 odd) once per call. The GIL is released by the binding.
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

enum Fmt : int { F32 = 0, BF16 = 1, F16 = 2, I8 = 3, I4 = 4 };

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

WDesc describe(int64_t fmt, const at::Tensor& q, const c10::optional<at::Tensor>& s,
               const c10::optional<at::Tensor>& z, int64_t N, int64_t K) {
  TORCH_CHECK(q.is_contiguous() && q.device().is_cpu(), "cpu_moe: weights must be contiguous CPU tensors");
  WDesc w{int(fmt), q.data_ptr()};
  w.E = q.size(0);
  w.N = N;
  w.K = K;
  if (fmt == I8 || fmt == I4) {
    TORCH_CHECK(s.has_value() && s->is_contiguous(), "cpu_moe: quantized weight needs a contiguous scale");
    w.s = s->data_ptr();
    w.scode = float_code(s->scalar_type());
  }
  if (fmt == I4) {
    TORCH_CHECK(z.has_value() && z->is_contiguous(), "cpu_moe: int4g32 weight needs a contiguous zero");
    w.z = z->data_ptr();
    w.zcode = float_code(z->scalar_type());
  }
  return w;
}

struct Pairs {                       // (token, expert) pairs sorted by expert
  std::vector<int64_t> expert;       // active experts
  std::vector<int64_t> start;        // [n_active + 1] offsets into tok/wt
  std::vector<int64_t> tok;
  std::vector<float> wt;
};

Pairs group_pairs(const int64_t* ids, const at::Tensor& wts, int64_t T, int64_t K, int64_t E) {
  const int wcode = float_code(wts.scalar_type());
  const void* wp = wts.data_ptr();
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t i = 0; i < T * K; i++) {
    TORCH_CHECK(ids[i] >= -1 && ids[i] < E, "cpu_moe: expert id ", ids[i], " out of range [-1, ", E, ")");
    if (ids[i] >= 0) count[ids[i] + 1]++;
  }
  Pairs p;
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
  return p;
}

// Stage 1 unit: h rows [r0, r1) of active expert a for all its tokens.
void gate_up_unit(const WDesc& w13, const Pairs& p, int64_t a, int64_t r0, int64_t r1, const float* xin,
                  int64_t D, float* h, int64_t I, bool perm_h) {
  const int64_t e = p.expert[a], b = p.start[a], n = p.start[a + 1] - b;
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    const int nt = int(std::min<int64_t>(4, n - t0));
    const float* xs[4];
    for (int j = 0; j < nt; j++) xs[j] = xin + p.tok[b + t0 + j] * D;
    for (int64_t r = r0; r < r1; r++) {
      float g[4], u[4];
      row_dot_n(w13, e, r, xs, nt, g);
      row_dot_n(w13, e, I + r, xs, nt, u);
      const int64_t c = perm_h ? perm_col(r) : r;
      for (int j = 0; j < nt; j++) h[(b + t0 + j) * I + c] = g[j] / (1.f + std::exp(-g[j])) * u[j];
    }
  }
}

// Stage 2 unit: output rows [d0, d1) of every token, summed over all active experts.
void down_unit(const WDesc& w2, const Pairs& p, int64_t d0, int64_t d1, const float* h, int64_t I,
               float* acc, int64_t T) {
  const int64_t R = d1 - d0;
  std::fill(acc, acc + T * R, 0.f);
  for (size_t a = 0; a < p.expert.size(); a++) {
    const int64_t e = p.expert[a], b = p.start[a], n = p.start[a + 1] - b;
    for (int64_t t0 = 0; t0 < n; t0 += 4) {
      const int nt = int(std::min<int64_t>(4, n - t0));
      const float* hs[4];
      for (int j = 0; j < nt; j++) hs[j] = h + (b + t0 + j) * I;
      for (int64_t d = d0; d < d1; d++) {
        float y[4];
        row_dot_n(w2, e, d, hs, nt, y);
        for (int j = 0; j < nt; j++) acc[p.tok[b + t0 + j] * R + (d - d0)] += p.wt[b + t0 + j] * y[j];
      }
    }
  }
}

constexpr int64_t RB1 = 16, RB2 = 16;   // rows per parallel unit (stage 1: of I; stage 2: of D)

at::Tensor forward(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts, int64_t f13,
                   const at::Tensor& q13, const c10::optional<at::Tensor>& s13,
                   const c10::optional<at::Tensor>& z13, int64_t f2, const at::Tensor& q2,
                   const c10::optional<at::Tensor>& s2, const c10::optional<at::Tensor>& z2, at::Tensor out,
                   int64_t nthreads) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous(), "cpu_moe: x, out must be contiguous [T, D]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && wts.is_contiguous(),
              "cpu_moe: ids must be contiguous int64, weights contiguous");
  const int64_t T = x.size(0), D = x.size(1), K = ids.size(1);
  const int64_t I = (f2 == I4 ? q2.size(2) * 2 : q2.size(2));
  TORCH_CHECK(D % 32 == 0 && I % 32 == 0, "cpu_moe: D and I must be multiples of 32");
  const WDesc w13 = describe(f13, q13, s13, z13, 2 * I, D), w2 = describe(f2, q2, s2, z2, D, I);
  TORCH_CHECK(ids.size(0) == T && wts.size(0) == T && wts.size(1) == K && out.size(0) == T && out.size(1) == D,
              "cpu_moe: shape mismatch between x, ids, weights, out");
  const Pairs p = group_pairs(ids.data_ptr<int64_t>(), wts, T, K, w13.E);
  const int64_t nA = p.expert.size(), P = p.tok.size();

  // x -> fp32 (permuted per 32-group when w13 is int4)
  std::vector<float> xin(T * D);
  const int xcode = float_code(x.scalar_type()), ocode = float_code(out.scalar_type());
  for (int64_t i = 0; i < T * D; i++) xin[f13 == I4 ? (i / D) * D + perm_col(i % D) : i] = ld(x.data_ptr(), xcode, i);
  std::vector<float> h(P * I);
  const int64_t nb1 = (I + RB1 - 1) / RB1, nb2 = (D + RB2 - 1) / RB2;
  void* op = out.data_ptr();

#pragma omp parallel num_threads(int(nthreads))
  {
    std::vector<float> acc(T * RB2);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < nA * nb1; u++) {
      const int64_t a = u / nb1, r0 = (u % nb1) * RB1;
      gate_up_unit(w13, p, a, r0, std::min(I, r0 + RB1), xin.data(), D, h.data(), I, f2 == I4);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < nb2; u++) {
      const int64_t d0 = u * RB2, d1 = std::min(D, d0 + RB2);
      down_unit(w2, p, d0, d1, h.data(), I, acc.data(), T);
      for (int64_t t = 0; t < T; t++)
        for (int64_t d = d0; d < d1; d++) st(op, ocode, t * D + d, acc[t * (d1 - d0) + d - d0]);
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>(),
        "fused MoE layer: forward(x, ids, weights, f13, q13, s13, z13, f2, q2, s2, z2, out, nthreads)");
  m.def("simd", []() { return std::string(HX_SIMD); });
  m.def("max_threads", []() { return omp_get_max_threads(); });
}
