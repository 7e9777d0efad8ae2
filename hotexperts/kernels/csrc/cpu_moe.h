// The CPU MoE kernel's entry point as other translation units of the extension see it (cpu_worker.cpp).
// forward_checked: one fused call over all of a layer's routed (token, expert) pairs (see cpu_moe.cpp);
// returns "" on success, else the error message (it never throws: callers run without the GIL).
#pragma once
#include <torch/extension.h>

#include <string>

// The experts' activation (weights.ACT_CODES: 0 silu, 1 GPT-OSS clamped SwiGLU, 2 gelu_tanh; alpha and limit
// are read by 1) and the optional gate/up bias b13 [E, 2I] float32 by expert id.
struct ExpertAct {
  int64_t code = 0;
  double alpha = 1.702, limit = 7.0;
  c10::optional<at::Tensor> b13;
};

std::string forward_checked(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts, int64_t f13,
                            const at::Tensor& q13, const c10::optional<at::Tensor>& s13,
                            const c10::optional<at::Tensor>& z13, int64_t f2, const at::Tensor& q2,
                            const c10::optional<at::Tensor>& s2, const c10::optional<at::Tensor>& z2,
                            at::Tensor out, int64_t nthreads, bool act_quant, int64_t prefetch_rows,
                            const ExpertAct& act);

// Registers the CPU expert worker (cpu_worker.cpp) on the extension module.
void register_worker(pybind11::module_& m);
