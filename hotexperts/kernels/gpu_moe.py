"""Fused MoE over experts held in stacked slots, read in place (GPU: Triton; anywhere: torch fallback).

Contract (docs/architecture.md, "Kernel contracts"):
    gpu_moe(x [T,D], ids [T,K] int64, weights [T,K], w13 [S,2I,D], w2 [S,D,I], slot_of [E] int32 | None,
            out [T,D] | None) -> out [T,D]
    out[t] = sum over k with s = slot_of[ids[t,k]] >= 0 of weights[t,k] * w2[s] @ (silu(g) * u),
             g, u = split(w13[s] @ x[t]) (first I rows gate, last I rows up).
    slot_of None = identity (S == E). ids == -1 or slot -1 contribute 0 (even if the slot holds NaNs).
    Variants (keywords): act (weights.ExpertAct, default silu(g) * u; GPT-OSS "swiglu_oai", "gelu_tanh") and
    b13 [E, 2I] (gate/up bias, indexed by the expert id, not the slot: the whole table stays on the device, so
    slots and staging copy weights only). Every backend computes them: the Triton gate/up kernels (decode
    GEMV and grouped prompt GEMM, also over dequantized chunks) in their epilogue, the torch path with act.
    out is written, not accumulated. Result dtype = x.dtype; accumulation in fp32 (fp64 for fp64 inputs).
    w13 / w2 may be dense tensors or QuantizedWeight (int8, int4g32, int8gG, q4_k, LUT4 mxfp4 / iq4_nl /
    iq4_xs: GGUF blocks in the slots at native size; the fallback dequantizes the slots used).

Backends ("auto" picks the first that applies):
    triton: CUDA tensors, contiguous weights, triton importable; dense bf16/fp16/fp32 weights on both
            paths, QuantizedWeight only on the decode (GEMV) path. No host synchronisation: CUDA-graph
            capturable for fixed (T, K).
    torch:  everything else. "gather" mode (index_select + bmm over the T*K pairs; no host sync) when the
            gathered weights stay small, else "loop" mode over the distinct slots (one host sync).
"""

from __future__ import annotations

import torch

from hotexperts.kernels.optional import triton_module
from hotexperts.quant import dequantize
from hotexperts.weights import SILU, ExpertAct, QuantizedWeight, Weight

DEQUANT_CHUNK_BYTES = 256 << 20     # quantized prompt batches: dequantized experts held at a time (bf16)
DEQUANT_CHUNK_MAX = 32              # ... and at most this many (Qwen3-30B-A3B: 27 fit; Mixtral: 1)
GATHER_LIMIT_BYTES = 256 << 20       # torch fallback: gather the pairs' experts up to this many bytes
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _triton_module():
    """hotexperts.kernels.triton_moe, or None when triton cannot be imported."""
    return triton_module("triton_moe")


def triton_available() -> bool:
    return _triton_module() is not None


def gpu_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: Weight, w2: Weight,
            slot_of: torch.Tensor | None = None, out: torch.Tensor | None = None,
            *, backend: str = "auto", used: list[int] | None = None, more: tuple = (),
            act: ExpertAct = SILU, b13: torch.Tensor | None = None,
            dequant_chunk: int | None = None) -> torch.Tensor:
    """See module docstring. backend: "auto" | "triton" | "torch" (KernelOptions.gpu_moe).
    dequant_chunk: experts a quantized prompt batch dequantizes at a time (None: dequant_chunks_moe's
    default; the VRAM plan passes the chunk it budgeted, experts/solve.py).
    used: host list of the slots this call may read (prompt batches over quantized slots then need no host
    sync to find them); None = find them on the device. more: further pools (w13, w2, slot_of, used) whose
    pairs are added: one pass on the quantized prompt path, else one call per pool summed in fp32. The
    pools must hold disjoint experts (e.g. staged beside resident): the one-pass path counts a pair in its
    first pool only, the summing path in every pool that maps it."""
    var = {"act": act, "b13": b13}
    if backend == "auto" and _quantized_prefill(x, ids, w13, w2) and not _triton_ok(x, ids, w13, w2) and all(
            _quantized_prefill(x, ids, a, b) for a, b, _, _ in more):
        return dequant_chunks_moe(x, ids, weights, w13, w2, slot_of, out, chunk=dequant_chunk, used=used,
                                  more=more, **var)
    if more:
        kw = {"backend": backend, "dequant_chunk": dequant_chunk, **var}
        y = gpu_moe(x, ids, weights, w13, w2, slot_of, used=used, **kw).float()
        for a, b, so, u in more:
            y += gpu_moe(x, ids, weights, a, b, so, used=u, **kw).float()
        return y.to(x.dtype) if out is None else out.copy_(y)
    if backend == "auto":
        backend = "triton" if _triton_ok(x, ids, w13, w2) else "torch"
    if backend == "triton":
        mod = _triton_module()
        if mod is None:
            raise RuntimeError("gpu_moe: backend 'triton' requested but triton cannot be imported")
        return mod.moe_triton(x, ids, weights, w13, w2, slot_of, out, **var)
    return torch_moe(x, ids, weights, w13, w2, slot_of, out, **var)


def _quantized_prefill(x, ids, w13, w2) -> bool:
    """Quantized slots, a prompt-sized batch, CUDA + Triton: the grouped kernel over dequantized chunks."""
    return (x.is_cuda and triton_available() and isinstance(w13, QuantizedWeight)
            and isinstance(w2, QuantizedWeight) and w13.q.is_cuda)


def dequant_chunks_moe(x, ids, weights, w13: QuantizedWeight, w2: QuantizedWeight, slot_of=None, out=None,
                       chunk: int | None = None, used: list[int] | None = None, more: tuple = (),
                       act: ExpertAct = SILU, b13: torch.Tensor | None = None):
    """Prompt batches over quantized slots: the slots this call routes to get consecutive ranks, the pairs
    are sorted by rank once (triton_moe.GroupedPass), and each chunk of `chunk` ranks (default: as many
    experts as DEQUANT_CHUNK_BYTES hold, at most DEQUANT_CHUNK_MAX) is dequantized into a bf16 buffer and
    computed (2 dequantize + 2 grouped-GEMM launches per chunk). Bounded VRAM (chunk experts); one fp32
    sum at the end. The slot list is `used` (host) when given, else found on the device (one host sync);
    unrouted slots in `used` just cost their dequantize.
    more: further pools (w13, w2, slot_of, used) read in the same pass, e.g. the staged experts beside the
    resident ones: a pair counts in the first pool whose slot_of maps its expert (the caller keeps them
    disjoint). A given `used` must list every slot the pool's routed pairs map to: a pair whose slot is
    missing from it contributes 0."""
    from hotexperts.kernels.triton_dequant import dequant_slots

    mod = _triton_module()
    pools = [(w13, w2, slot_of, used)] + list(more)
    ranks, lists = _pool_ranks(x, ids, pools)                         # [T, K], per pool [n_j] slots
    U = sum(int(li.numel()) for li in lists)
    I = w2.shape[2]                                                  # logical shapes
    wdt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    gp = mod.GroupedPass(x, ranks, weights, max(U, 1), I, wdt, ids=ids, act=act, b13=b13)
    if chunk is None:
        per = (w13.shape[1] * w13.shape[2] + w2.shape[1] * I) * torch.finfo(wdt).bits // 8
        chunk = max(1, min(DEQUANT_CHUNK_MAX, DEQUANT_CHUNK_BYTES // per))
    C = min(chunk, max(U, 1))
    d13 = torch.empty((C, *w13.shape[1:]), dtype=wdt, device=x.device)       # [C, 2I, D] dequantized
    d2 = torch.empty((C, w2.shape[1], I), dtype=wdt, device=x.device)        # [C, D, I]
    for c0 in range(0, U, chunk):
        c1, off = min(U, c0 + chunk), 0
        for (p13, p2, _, _), li in zip(pools, lists, strict=True):
            a, b = max(c0, off), min(c1, off + li.numel())                  # this pool's part of the chunk
            if a < b:
                idx = li[a - off:b - off]
                dequant_slots(p13, idx, wdt, out=d13[a - c0:b - c0])
                dequant_slots(p2, idx, wdt, out=d2[a - c0:b - c0])
            off += li.numel()
        gp.run(c0, d13[:c1 - c0], d2[:c1 - c0])
    return gp.result(out)


def _pool_ranks(x, ids, pools) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ranks [T, K] int64: pool j's used slots get ranks off_j .. off_j + n_j - 1 (pools in order); -1 for
    pairs no pool holds. Also each pool's used slots as a device int64 tensor."""
    ranks, lists, off = None, [], 0
    for w13, _, slot_of, used in pools:
        slots = _pair_slots(ids, slot_of)                                   # [T, K]
        if used is None:
            li = torch.unique(slots[slots >= 0])                            # [U] slots, host sync
        elif isinstance(used, torch.Tensor):
            li = used.to(device=x.device, dtype=torch.long)
        else:
            # A blocking copy from pageable memory, on purpose: a non_blocking copy from a temporary pinned
            # tensor leaves the device reading host memory that is freed when this function returns (and under
            # CUDA-graph capture the graph would keep reading it on every replay). The host list differs per
            # call, so no persistent buffer could be captured either; a capture now fails loudly instead.
            # The cost: one stream sync per pool and prompt chunk, as the used=None path's torch.unique.
            li = torch.tensor(sorted(used), dtype=torch.long, device=x.device)
        table = torch.full((w13.shape[0],), -1, dtype=torch.long, device=x.device)
        table[li] = torch.arange(off, off + li.numel(), device=x.device)
        r = torch.where(slots >= 0, table[slots.clamp(min=0)], -1)
        ranks = r if ranks is None else torch.where(ranks >= 0, ranks, r)
        lists.append(li)
        off += li.numel()
    return ranks, lists


def _triton_ok(x: torch.Tensor, ids: torch.Tensor, w13: Weight, w2: Weight) -> bool:
    if not (x.is_cuda and triton_available()):
        return False
    for w in (w13, w2):
        t = w.q if isinstance(w, QuantizedWeight) else w
        if not (t.is_cuda and t.is_contiguous()):
            return False
        if not isinstance(w, QuantizedWeight) and w.dtype not in _TRITON_DTYPES:
            return False
    return _triton_module().supports(ids, w13, w2)


# ------------------------------------------------------------------------------------------ torch fallback
def _dequant(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense copy of a (sliced) QuantizedWeight: the same fp32 math as the CPU kernel, then cast."""
    return dequantize(w, torch.float32).to(dtype)


def _take(w: Weight, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w[idx] as a dense tensor of dtype. idx [N] int64 -> [N, rows, cols]."""
    if isinstance(w, QuantizedWeight):
        return _dequant(w[idx], dtype)
    return w.index_select(0, idx).to(dtype)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pair_slots(ids: torch.Tensor, slot_of: torch.Tensor | None) -> torch.Tensor:
    """ids [T,K] -> slots [T,K] int64, -1 where the id is -1 or the expert is not resident."""
    if slot_of is None:
        return ids.clamp(min=-1)
    s = slot_of.long()[ids.clamp(min=0)]
    return torch.where(ids >= 0, s, -1)


def torch_moe(x, ids, weights, w13: Weight, w2: Weight, slot_of=None, out=None, mode: str = "auto",
              act: ExpertAct = SILU, b13: torch.Tensor | None = None):
    """Reference-exact torch implementation of the contract. mode: "auto" | "gather" | "loop"."""
    T, K = ids.shape
    slots = _pair_slots(ids, slot_of)                                  # [T, K]
    if mode == "auto":
        per_expert = _nbytes(w13) // w13.shape[0] + _nbytes(w2) // w2.shape[0]
        mode = "gather" if T * K * per_expert * 2 <= GATHER_LIMIT_BYTES else "loop"
    fn = _moe_gather if mode == "gather" else _moe_loop
    bias = None if b13 is None else b13[ids.clamp(min=0)]              # [T, K, 2I] by expert id
    res = fn(x, slots, weights, w13, w2, act, bias)                    # [T, D] accumulation dtype
    if out is None:
        return res.to(x.dtype)
    return out.copy_(res)


def _nbytes(w: Weight) -> int:
    return w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()


def _expert(w13d: torch.Tensor, w2d: torch.Tensor, xs: torch.Tensor, act: ExpertAct = SILU,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batched SwiGLU expert: w13d [N,2I,D], w2d [N,D,I], xs [N,M,D], bias [N,M,2I] | None -> [N,M,D]."""
    gu = torch.bmm(xs, w13d.transpose(1, 2))                           # [N, M, 2I]
    if bias is not None:
        gu = gu + bias.to(gu.dtype)
    return torch.bmm(act(*gu.chunk(2, dim=-1)), w2d.transpose(1, 2))


def _moe_gather(x, slots, weights, w13, w2, act=SILU, bias=None):
    """index_select + bmm over all pairs (no host sync)."""
    T, K = slots.shape
    acc = _acc_dtype(x)
    flat = slots.reshape(-1)                                           # [P]
    idx = flat.clamp(min=0)
    xs = x.to(acc).repeat_interleave(K, dim=0).unsqueeze(1)            # [P, 1, D]
    pb = None if bias is None else bias.reshape(T * K, 1, -1)         # [P, 1, 2I]
    y = _expert(_take(w13, idx, acc), _take(w2, idx, acc), xs, act, pb).squeeze(1)   # [P, D]
    y = y * weights.reshape(-1, 1).to(acc)
    y = torch.where((flat >= 0).unsqueeze(1), y, 0.0)
    return y.view(T, K, -1).sum(1)


def _moe_loop(x, slots, weights, w13, w2, act=SILU, bias=None):
    """One batched matmul per distinct slot (host sync for the slot list); weights read once each."""
    T, K = slots.shape
    acc = _acc_dtype(x)
    flat = slots.reshape(-1)
    wflat = weights.reshape(-1).to(acc)
    res = torch.zeros(T, x.shape[1], dtype=acc, device=x.device)       # [T, D]
    for s in torch.unique(flat[flat >= 0]).tolist():
        pairs = (flat == s).nonzero().squeeze(1)                       # [M]
        tok = pairs // K
        sid = torch.tensor([s], device=x.device)
        pb = None if bias is None else bias.reshape(T * K, -1)[pairs].unsqueeze(0)       # [1, M, 2I]
        y = _expert(_take(w13, sid, acc), _take(w2, sid, acc), x[tok].to(acc).unsqueeze(0), act, pb)[0]
        res.index_add_(0, tok, y * wflat[pairs].unsqueeze(1))
    return res
