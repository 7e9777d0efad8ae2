"""Fused CPU MoE: one call computes all of a layer's CPU-side (token, expert) pairs.

cpu_moe(x [T, D], ids [T, K] int64, weights [T, K], experts: LayerExperts, out [T, D] | None,
        act_quant: bool | None = None) -> out
    y[t] = sum_k weights[t, k] * W2_e act(G_e x_t + bg_e, U_e x_t + bu_e), e = ids[t, k]; ids == -1 is
    skipped. experts.w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I]: fp32/bf16/fp16 tensors or
    QuantizedWeight ("int8", "int4g32", "int8g32", "int8g16", "q4_k": GGUF Q4_K blocks read as they are; K a
    multiple of 256; LUT4 "mxfp4" / "iq4_nl" / "iq4_xs": GGUF blocks read as they are, table lookup), on the
    CPU. x is bf16/fp16/fp32; accumulation is fp32.
    `out` (x's shape; any float dtype, may be pinned) is written, not accumulated.

Expert variants (weights.LayerExperts.act / .b13): act is silu (default), GPT-OSS's clamped SwiGLU
"swiglu_oai" (alpha, limit) or "gelu_tanh"; b13 [E, 2I] the optional gate/up bias (by expert id). Every
backend computes every variant: the extension gets act_args(experts) (weights.ACT_CODES, alpha, limit, b13
as fp32), the torch path calls experts.act. A down bias is the model's (weights.py).

Backends (`cpu_moe_backend(isa)`): "ext-<simd>" — the project's C++ extension (csrc/cpu_moe.cpp, built on
first use for `options.cpu_isa`; threaded with OpenMP, GIL released during the call) — or "torch", a grouped
pass of torch ops (`_weight_int8pack_mm` for int8, dequantize for int4) used when the extension cannot be
built or a shape is unsupported (D or I not a multiple of 32); the reason is warned once.
Every knob comes from `options` (config.KernelOptions, frozen; default DEFAULT_KERNELS): threads
(`options.threads()`), the integer path (`act_quant`; the call's own `act_quant` argument overrides it),
prefetch distance, ISA build. Nothing here is process-wide state.

Activation quantization: for int8 / int4g32 / q4_k weights (and int8gG, LUT4 on AVX-512 VNNI builds) the
extension quantizes x and h = act(g, u) to int8 with one fp32 scale per 32-group and uses integer dot
products (AVX-512 VNNI / AVX2); error ~0.3-1% relative per output ("within quantization tolerance").
Auto (None) = on when the extension has an integer dot (`cpu_moe_int_dot() != "none"`); bf16/fp32 weights
always take the exact fp32 path, and so does everything with act_quant=False.
`options.prefetch_rows`: the integer path prefetches weights n steps ahead (default 2, 0 = off; 512-bit
path: a step is 4 rows of 4 streams, prefetched into L2 across unit and expert boundaries; 256-bit path:
n rows).
"""

from __future__ import annotations

import warnings

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.errors import HotExpertsError
from hotexperts.kernels.cpu_build import load_error, load_extension
from hotexperts.quant import dequantize
from hotexperts.weights import LayerExperts, QuantizedWeight, Weight

_FMT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, "int8": 3, "int4g32": 4, "int8g32": 5,
        "int8g16": 5, "q4_k": 6, "mxfp4": 7, "iq4_nl": 8, "iq4_xs": 9}
_warned: set[str] = set()


def cpu_moe_int_dot(isa: str = "native") -> str:
    """The extension's integer dot ("avx512vnni", "avxvnni", "avx2") or "none" (no integer path)."""
    mod = load_extension(isa)
    return mod.int_dot() if mod is not None else "none"


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def cpu_moe_backend(isa: str = "native") -> str:
    """"ext-avx512" / "ext-avx2" / "ext-scalar" when the C++ extension loads, else "torch"."""
    mod = load_extension(isa)
    return f"ext-{mod.simd()}" if mod is not None else "torch"


def _parts(w: Weight):
    """(format code, q, scale, zero) for the extension, or None if it cannot read this weight (scale and zero
    may be None: q4_k has neither, int8 and int8gG may lack the zero)."""
    if isinstance(w, QuantizedWeight):
        if w.fmt not in _FMT or w.q.device.type != "cpu":
            return None
        scale, zero = (None if t is None else t.contiguous() for t in (w.scale, w.zero))
        return _FMT[w.fmt], w.q.contiguous(), scale, zero
    if w.dtype not in _FMT or w.device.type != "cpu":
        return None
    return _FMT[w.dtype], w.contiguous(), None, None


def act_args(experts: LayerExperts) -> tuple[int, float, float, torch.Tensor | None]:
    """The extension's (activation code, alpha, limit, b13 float32 contiguous [E, 2I] | None) of a layer."""
    b13 = experts.b13
    if b13 is not None:
        E, I2 = experts.w13.shape[0], experts.w13.shape[1]
        if tuple(b13.shape) != (E, I2):
            raise HotExpertsError(f"cpu_moe: expert gate/up bias must be [{E}, {I2}], got {list(b13.shape)}")
        b13 = b13.to(device="cpu", dtype=torch.float32).contiguous()
    return experts.act.code, float(experts.act.alpha), float(experts.act.limit), b13


def _ext_reason(x: torch.Tensor, experts: LayerExperts, parts, isa: str) -> str | None:
    """Why the extension cannot run this call (None = it can)."""
    if load_extension(isa) is None:
        return f"C++ extension unavailable ({load_error(isa)})"
    if x.dtype not in _FMT or x.device.type != "cpu":
        return f"input dtype/device {x.dtype}/{x.device} unsupported"
    if x.shape[1] % 32 or experts.w2.shape[-1] % 32:
        return "hidden or intermediate size is not a multiple of 32"
    if parts[0] is None or parts[1] is None:
        return "expert weight format unsupported"
    return None


def cpu_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LayerExperts,
            out: torch.Tensor | None = None, act_quant: bool | None = None, *,
            options: KernelOptions = DEFAULT_KERNELS) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(x)
    parts = (_parts(experts.w13), _parts(experts.w2))
    reason = _ext_reason(x, experts, parts, options.cpu_isa)
    if reason is not None:
        _warn_once(f"cpu_moe: running the plain torch fallback (slow): {reason}")
        return cpu_moe_torch(x, ids, weights, experts, out)
    if act_quant is None:
        act_quant = options.use_act_quant()              # auto: on; the C++ side has no int path without AVX2
    dst = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    if ids.dtype != torch.int64:
        ids = ids.long()
    _check_ids(ids, experts.w13.shape[0])
    err = load_extension(options.cpu_isa).forward(
        x.contiguous(), ids.contiguous(), weights.contiguous(), *parts[0], *parts[1], dst, options.threads(),
        bool(act_quant), options.prefetch_rows, *act_args(experts))
    if err:                                  # the C++ side reports instead of throwing (GIL released)
        raise RuntimeError(err)
    if dst is not out:
        out.copy_(dst)
    return out


def _check_ids(ids: torch.Tensor, num_experts: int) -> None:
    """Validated here, not in C++: an exception thrown inside the GIL-released extension call crashed the
    process on the H200 host (torch 2.11) even when caught there."""
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= num_experts):
        bad = ids[(ids < -1) | (ids >= num_experts)][0]
        raise RuntimeError(f"cpu_moe: expert id {int(bad)} out of range [-1, {num_experts})")


def _expert_matmul(a: torch.Tensor, w: Weight, e: int) -> torch.Tensor:
    """a [n, Kin] (fp32 or fp64) @ w[e].T -> [n, N] in a's dtype."""
    if isinstance(w, QuantizedWeight) and w.fmt == "int8" and a.dtype == torch.float32:
        return torch.ops.aten._weight_int8pack_mm(a, w.q[e], w.scale[e].float())
    return a @ dequantize(w[e], a.dtype).T


def cpu_moe_torch(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LayerExperts,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The fallback: one grouped pass over the active experts with torch ops (same contract as cpu_moe)."""
    T, K = ids.shape
    flat = ids.reshape(-1)
    keep = flat >= 0
    tok = torch.arange(T, device=ids.device).repeat_interleave(K)[keep]        # [P]
    exp, wt = flat[keep], weights.reshape(-1)[keep].float()                      # [P]
    order = torch.argsort(exp, stable=True)
    tok, exp, wt = tok[order], exp[order], wt[order]
    uniq, counts = torch.unique_consecutive(exp, return_counts=True)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, y = x.to(acc), torch.zeros(x.shape, dtype=acc)
    b13, act = experts.b13, experts.act
    for e, tk, wk in zip(uniq.tolist(), tok.split(counts.tolist()), wt.split(counts.tolist()), strict=True):
        gu = _expert_matmul(xf[tk], experts.w13, e)                               # [n, 2I]
        if b13 is not None:
            gu = gu + b13[e].to(acc)
        y.index_add_(0, tk, _expert_matmul(act(*gu.chunk(2, dim=-1)), experts.w2, e) * wk[:, None])
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)
