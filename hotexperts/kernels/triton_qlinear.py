"""Triton GEMV over int8 dense weights with group scales, read in place (kernels/qlinear.py is the contract).

    gemv(x [T, K], q [N, K] int8, scale [N, K/G] (int8 per row: [N], G = K), zero [N, K/G] | None,
         bias [N] | None, G, out [T, N]) -> out
    out[t, n] = sum_g scale[n, g] * (q[n, gG:(g+1)G] . x[t, gG:(g+1)G]) (+ zero[n, g] * sum(x[t, group g]))
                + bias[n]; fp32 accumulation, one launch, no host synchronisation (CUDA-graph capturable).
Grid (cdiv(N, BN), T): each program streams BN rows in BK-column blocks (16-byte int8 loads per lane,
software-pipelined); BN is small for narrow matrices (k_proj: 512 rows) so every SM has rows to read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, G: tl.constexpr, HAS_Z: tl.constexpr,
                 HAS_B: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    pid, t = tl.program_id(0), tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)                              # [BN]
    rmask = rows < N
    ng = K // G
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        cols = k0 + tl.arange(0, BK)                                # [BK]
        cmask = cols < K
        x = tl.load(x_ptr + t * K + cols, mask=cmask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0).to(tl.float32)      # [BN, BK]
        ps = tl.sum(tl.reshape(q * x[None, :], [BN, BK // G, G]), axis=2)             # [BN, BK/G]
        gi = k0 // G + tl.arange(0, BK // G)
        gm = rmask[:, None] & (gi < ng)[None, :]
        sc = tl.load(s_ptr + rows[:, None] * ng + gi[None, :], mask=gm, other=0.0).to(tl.float32)
        part = ps * sc
        if HAS_Z:
            xs = tl.sum(tl.reshape(x, [BK // G, G]), axis=1)                          # [BK/G]
            zr = tl.load(z_ptr + rows[:, None] * ng + gi[None, :], mask=gm, other=0.0).to(tl.float32)
            part += zr * xs[None, :]
        acc += tl.sum(part, axis=1)
    if HAS_B:
        acc += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * N + rows, acc.to(out_ptr.dtype.element_ty), mask=rmask)


def config(N: int, K: int, G: int) -> dict:
    """Blocks by shape: enough programs for every SM on narrow matrices, 256+ columns per step."""
    bk = max(G, min(512, triton.next_power_of_2(K)))
    bn = 1
    while bn < 16 and N // (bn * 2) >= 512:                         # >= 512 programs before widening
        bn *= 2
    return {"BN": bn, "BK": bk, "STAGES": 3, "num_warps": 4}


def gemv(x, q, scale, zero, bias, group: int, out: torch.Tensor) -> torch.Tensor:
    T, K = x.shape
    N = q.shape[0]
    if scale.dim() == 1:                                            # int8 per row: one group of K
        scale, group = scale[:, None], K
    cfg = config(N, K, group)
    bk = cfg.pop("BK")
    if group > bk or bk % group or K % group:
        raise ValueError(f"qlinear: group {group} does not divide the block {bk} / K {K}")
    grid = (triton.cdiv(N, cfg["BN"]), T)
    dummy = scale
    _gemv_kernel[grid](x, q, scale, zero if zero is not None else dummy, bias if bias is not None else dummy,
                       out, N, K, G=group, HAS_Z=zero is not None, HAS_B=bias is not None, BK=bk, **cfg)
    return out
