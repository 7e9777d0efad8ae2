// The CPU MoE kernel's entry point as other translation units of the extension see it (cpu_worker.cpp).
// forward_checked: one fused call over all of a layer's routed (token, expert) pairs (see cpu_moe.cpp);
// returns "" on success, else the error message (it never throws: callers run without the GIL).
#pragma once
#include <torch/extension.h>

#include <string>

std::string forward_checked(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts, int64_t f13,
                            const at::Tensor& q13, const c10::optional<at::Tensor>& s13,
                            const c10::optional<at::Tensor>& z13, int64_t f2, const at::Tensor& q2,
                            const c10::optional<at::Tensor>& s2, const c10::optional<at::Tensor>& z2,
                            at::Tensor out, int64_t nthreads, bool act_quant, int64_t prefetch_rows);

// Registers the CPU expert worker (cpu_worker.cpp) on the extension module.
void register_worker(pybind11::module_& m);
