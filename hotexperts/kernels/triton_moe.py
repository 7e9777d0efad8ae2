"""Triton MoE kernels that read routed experts in place from stacked slot tensors.

Contract (same as kernels/gpu_moe.py; quantized weights on the decode path only):
    moe_triton(x [T,D], ids [T,K] int64, weights [T,K], w13 [S,2I,D], w2 [S,D,I], slot_of [E] int32 | None,
               out [T,D] | None) -> out [T,D]
    out[t] = sum_k weights[t,k] * w2[s] @ act(w13[s,:I] @ x[t] + bg[e], w13[s,I:] @ x[t] + bu[e]),
    s = slot_of[ids[t,k]], e = ids[t,k]; act (keyword, weights.ExpertAct: silu, GPT-OSS's clamped SwiGLU
    "swiglu_oai", "gelu_tanh"; the ACT constexpr) and the gate/up bias b13 [E, 2I] (keyword, by expert id,
    optional) are applied in the gate/up kernels' epilogue on both paths.
    pairs with ids == -1 or s == -1 contribute 0. out is written (not accumulated). fp32 accumulation.
No host synchronisation: every shape depends only on (T, K, S, D, I), so a call is CUDA-graph capturable.

Two paths, chosen from static shapes (pairs P = T*K, slots S):
  decode  (T == 1 or P <= min(DECODE_MAX_PAIRS, S // 4)): GEMV kernels; each pair reads its expert.
      Weights dense (bf16/fp16/fp32) or QuantizedWeight int8 (per-row scale) / int4g32 / int8gG (scale and
      optional zero per G = 16 or 32 columns) / q4_k (GGUF Q4_K blocks read in place: per block the 6-bit
      scales are unpacked once, per 32-column sub-block w = d sc q - dmin m) / LUT4 mxfp4, iq4_nl, iq4_xs
      (GGUF blocks read in place: per 32-group one scale, 16 index bytes, the values looked up in the
      format's 16-entry fp32 table, an L1-resident gather: triton_dequant.lut4_groups), dequantized in-kernel.
      A: grid (P, cdiv(I, BN)): h[p, n] = silu(x.G[s,n]) * (x.U[s,n]) for a block of rows n, fp32.
      B: grid (T, cdiv(D, BD)): out[t, d] = sum_k w[t,k] * W2[s, d, :] . h[t*K+k]  (one flat loop over
         (k, I-chunk) so loads of different experts overlap; no atomics, deterministic).
      Loops use tl.range(num_stages=STAGES) so GEMV loads are software-pipelined (latency hiding).
  prefill (larger P, dense weights): pairs sorted by slot on the device (torch.sort + searchsorted, fixed
      shapes), each slot's run padded to BLOCK_M rows, then two grouped-GEMM kernels (tl.dot):
      C: grid (blocks, cdiv(I, BN)): h[pair] = silu(X G^T) * (X U^T)       (h in the weight dtype)
      D: grid (blocks, cdiv(D, BN)): y[pair] = w_pair * (h W2^T)           (y [P, D] fp32)
      out = y.view(T, K, D).sum(1)  (deterministic; no atomics).
Weights must have a unit last stride (slot buffers are contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hotexperts.kernels.triton_dequant import LUT4_KIND, lut4_groups, lut4_table, q4k_scales
from hotexperts.weights import SILU, ExpertAct

DECODE_MAX_PAIRS = 32


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pair_slot(ids_ptr, slot_of_ptr, p, HAS_MAP: tl.constexpr):
    """Slot of pair p (int64), -1 when the id or its slot is -1."""
    e = tl.load(ids_ptr + p)
    if HAS_MAP:
        s = tl.load(slot_of_ptr + tl.maximum(e, 0)).to(tl.int64)
        s = tl.where(e >= 0, s, -1)
    else:
        s = e.to(tl.int64)
    return s


@triton.jit
def _down_step(ids_ptr, slot_of_ptr, wts_ptr, dmask, t, j, nc, K, HAS_MAP: tl.constexpr, BD: tl.constexpr):
    """Step j of token t's flat down loop over (k, chunk), nc chunks per pair k: (pair p = t*K + k, its slot
    clamped to >= 0, the chunk c = j % nc, the pair's routing weight (0 when unmapped), vmask [BD] = dmask
    where the pair is mapped)."""
    k = j // nc
    p = t * K + k
    s = _pair_slot(ids_ptr, slot_of_ptr, p, HAS_MAP)
    wt = tl.where(s >= 0, tl.load(wts_ptr + p).to(tl.float32), 0.0)
    vmask = dmask & (tl.zeros([BD], dtype=tl.int64) + s >= 0)          # vector form (interpreter-safe)
    return p, tl.maximum(s, 0), j - k * nc, wt, vmask


@triton.jit
def _act(g, u, ACT: tl.constexpr, alpha, limit):
    """h from fp32 gate and up (weights.ACT_CODES): 0 silu(g) u; 1 GPT-OSS's clamped SwiGLU
    (u' + 1) g' sigmoid(alpha g'), g' = min(g, limit), u' = clamp(u, -limit, limit); 2 gelu_tanh(g) u with
    1 + tanh(z) = 2 sigmoid(2 z)."""
    if ACT == 1:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        h = (uc + 1.0) * (gc / (1.0 + tl.exp(-alpha * gc)))
    elif ACT == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        h = 0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * z))) * u
    else:
        h = g / (1.0 + tl.exp(-g)) * u
    return h


@triton.jit
def _rowdot_lut4(q_ptr, tab_ptr, roff, rmask, v_ptr, n, LK: tl.constexpr, STAGES: tl.constexpr,
                 BR: tl.constexpr, BK: tl.constexpr):
    """[BR] fp32 dots of LUT4 rows (byte offsets roff) with v[0:n] (n a multiple of 32; BK columns a step):
    per group sum_j table[index_j] v_j, times the group's scale."""
    acc = tl.zeros([BR, BK // 32], dtype=tl.float32)
    jj = tl.arange(0, 16)
    for k0 in tl.range(0, n, BK, num_stages=STAGES):
        gi = k0 // 32 + tl.arange(0, BK // 32)                         # [G]
        gmask = gi < n // 32
        m = rmask[:, None] & gmask[None, :]
        sc, qoff = lut4_groups(q_ptr, roff, gi, m, LK)                 # [BR, G]
        q = tl.load(q_ptr + qoff[:, :, None] + jj[None, None, :], mask=m[:, :, None], other=0)   # [BR, G, 16]
        col = gi[:, None] * 32 + jj[None, :]                           # [G, 16]
        vl = tl.load(v_ptr + col, mask=gmask[:, None], other=0.0).to(tl.float32)
        vh = tl.load(v_ptr + col + 16, mask=gmask[:, None], other=0.0).to(tl.float32)
        wl = tl.load(tab_ptr + (q & 15).to(tl.int32))
        wh = tl.load(tab_ptr + (q >> 4).to(tl.int32))
        acc += sc * tl.sum(wl * vl[None] + wh * vh[None], axis=2)
    return tl.sum(acc, axis=1)


@triton.jit
def _rowdot_int4(q_ptr, s_ptr, z_ptr, roff, soff, rmask, v_ptr, n,
                 STAGES: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """Same for int4g32 rows: q bytes (low nibble = even column), w = (q - 8) * scale + zero per 32 columns.
    n and BK are multiples of 32; roff in bytes, soff in groups."""
    acc = tl.zeros([BR, BK // 32], dtype=tl.float32)
    for k0 in tl.range(0, n, BK, num_stages=STAGES):
        j = tl.arange(0, BK // 2)                         # [BK/2] byte index in the block
        cm = k0 + 2 * j < n
        ve = tl.load(v_ptr + k0 + 2 * j, mask=cm, other=0.0).to(tl.float32)
        vo = tl.load(v_ptr + k0 + 2 * j + 1, mask=cm, other=0.0).to(tl.float32)
        qm = rmask[:, None] & cm[None, :]
        q = tl.load(q_ptr + roff[:, None] + (k0 // 2 + j)[None, :], mask=qm, other=0)     # [BR, BK/2] uint8
        lo = (q & 15).to(tl.float32) - 8.0
        hi = (q >> 4).to(tl.float32) - 8.0
        ps = tl.sum(tl.reshape(lo * ve[None, :] + hi * vo[None, :], [BR, BK // 32, 16]), axis=2)   # [BR, G]
        vs = tl.sum(tl.reshape(ve + vo, [BK // 32, 16]), axis=1)                                   # [G]
        gi = k0 // 32 + tl.arange(0, BK // 32)
        gm = rmask[:, None] & (gi < n // 32)[None, :]
        sc = tl.load(s_ptr + soff[:, None] + gi[None, :], mask=gm, other=0.0).to(tl.float32)
        zr = tl.load(z_ptr + soff[:, None] + gi[None, :], mask=gm, other=0.0).to(tl.float32)
        acc += ps * sc + zr * vs[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _rowdot_int8g(q_ptr, s_ptr, z_ptr, roff, soff, rmask, v_ptr, n, GS: tl.constexpr, HAS_Z: tl.constexpr,
                  STAGES: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """Same for int8gG rows: int8 q, w = q * scale (+ zero) per GS columns. n and BK are multiples of GS;
    roff in elements, soff in groups."""
    acc = tl.zeros([BR, BK // GS], dtype=tl.float32)
    for k0 in tl.range(0, n, BK, num_stages=STAGES):
        cols = k0 + tl.arange(0, BK)                       # [BK]
        cm = cols < n
        v = tl.load(v_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + roff[:, None] + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0)
        ps = tl.sum(tl.reshape(q.to(tl.float32) * v[None, :], [BR, BK // GS, GS]), axis=2)      # [BR, G]
        gi = k0 // GS + tl.arange(0, BK // GS)
        gm = rmask[:, None] & (gi < n // GS)[None, :]
        sc = tl.load(s_ptr + soff[:, None] + gi[None, :], mask=gm, other=0.0).to(tl.float32)
        acc += ps * sc
        if HAS_Z:
            vs = tl.sum(tl.reshape(v, [BK // GS, GS]), axis=1)                                  # [G]
            zr = tl.load(z_ptr + soff[:, None] + gi[None, :], mask=gm, other=0.0).to(tl.float32)
            acc += zr * vs[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _q4k_part(q_ptr, boff, m, v_ptr, blk, bm, NB: tl.constexpr):
    """[BR, NB, 4] fp32: rows' Q4_K blocks blk [NB] (mask bm) at byte offsets boff [BR, NB] (mask m) times the
    activations v, per chunk c of a block: sub-block 2c (low nibbles) plus 2c + 1 (high nibbles). The nibbles
    are one [BR, NB, 4, 32] uint8 load (128 contiguous bytes per block: 16-byte vector loads); the header is
    four int32 words per block (triton_dequant.q4k_scales)."""
    cc = tl.arange(0, 4)[None, :, None]
    ll = tl.arange(0, 32)[None, None, :]
    cols = blk[:, None, None].to(tl.int64) * 256 + cc * 64 + ll                 # [NB, 4, 32]: sub-block 2c
    vm = bm[:, None, None]
    ve = tl.load(v_ptr + cols, mask=vm, other=0.0).to(tl.float32)
    vo = tl.load(v_ptr + cols + 32, mask=vm, other=0.0).to(tl.float32)          # sub-block 2c + 1
    ae, ao, be, bo = q4k_scales(q_ptr, boff, m)                                  # [BR, NB, 4]
    q = tl.load(q_ptr + boff[:, :, None, None] + 16 + cc[None] * 32 + ll[None], mask=m[:, :, None, None],
                other=0)                                                         # [BR, NB, 4, 32]
    de = tl.sum((q & 15).to(tl.float32) * ve[None], axis=3)
    do = tl.sum((q >> 4).to(tl.float32) * vo[None], axis=3)
    return ae * de + ao * do - be * tl.sum(ve, axis=2)[None] - bo * tl.sum(vo, axis=2)[None]


@triton.jit
def _gate_up_q4k(q_ptr, roff, uoff, rmask, v_ptr, n, STAGES: tl.constexpr, BR: tl.constexpr,
                 NB: tl.constexpr):
    """Gate and up q4_k rows (byte offsets roff, uoff [BR]) in one pipelined loop over NB blocks at a time:
    ([BR], [BR]) fp32 dots with v[0:n] (n a multiple of 256)."""
    nblk = n // 256
    acc_g = tl.zeros([BR, NB, 4], dtype=tl.float32)
    acc_u = tl.zeros([BR, NB, 4], dtype=tl.float32)
    for b0 in tl.range(0, nblk, NB, num_stages=STAGES):
        blk = b0 + tl.arange(0, NB)
        bm = blk < nblk
        m = rmask[:, None] & bm[None, :]
        bo = blk[None, :].to(tl.int64) * 144
        acc_g += _q4k_part(q_ptr, roff[:, None] + bo, m, v_ptr, blk, bm, NB)
        acc_u += _q4k_part(q_ptr, uoff[:, None] + bo, m, v_ptr, blk, bm, NB)
    return tl.sum(tl.sum(acc_g, axis=2), axis=1), tl.sum(tl.sum(acc_u, axis=2), axis=1)


@triton.jit
def _down_q4k(h_ptr, ids_ptr, slot_of_ptr, wts_ptr, q_ptr, t, rows, dmask, K, I, stride_ws, stride_wd,
              HAS_MAP: tl.constexpr, STAGES: tl.constexpr, BD: tl.constexpr, NB: tl.constexpr):
    """[BD] fp32: sum_k w[t,k] * W2[s_k, rows, :] . h[t*K+k] for q4_k W2, as one flat pipelined loop over
    (k, NB-block chunk) so loads of different experts overlap (I = 768 is only 3 blocks per row)."""
    nblk = I // 256
    nc = tl.cdiv(nblk, NB)
    acc = tl.zeros([BD, NB, 4], dtype=tl.float32)
    for j in tl.range(0, K * nc, num_stages=STAGES):
        p, s0, c, wt, vmask = _down_step(ids_ptr, slot_of_ptr, wts_ptr, dmask, t, j, nc, K, HAS_MAP, BD)
        blk = c * NB + tl.arange(0, NB)
        bm = blk < nblk
        boff = (s0 * stride_ws + rows.to(tl.int64) * stride_wd)[:, None] + blk[None, :].to(tl.int64) * 144
        acc += wt * _q4k_part(q_ptr, boff, vmask[:, None] & bm[None, :], h_ptr + p * I, blk, bm, NB)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _gate_up_dense(q_ptr, s_ptr, roff, soff, uoff, usoff, rmask, v_ptr, n,
                   SCALED: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr,
                   BR: tl.constexpr, BK: tl.constexpr):
    """Gate and up rows in one pipelined loop: ([BR], [BR]) fp32 dots with v[0:n] (int8: times row scale)."""
    acc_g = tl.zeros([BR, BK], dtype=tl.float32)
    acc_u = tl.zeros([BR, BK], dtype=tl.float32)
    for k0 in tl.range(0, n, BK, num_stages=STAGES):
        cols = k0 + tl.arange(0, BK)                      # [BK]
        if EVEN:
            v = tl.load(v_ptr + cols).to(tl.float32)
            m = rmask[:, None]
        else:
            v = tl.load(v_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
            m = rmask[:, None] & (cols < n)[None, :]
        g = tl.load(q_ptr + roff[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(q_ptr + uoff[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc_g += g * v[None, :]
        acc_u += u * v[None, :]
    g1 = tl.sum(acc_g, axis=1)
    u1 = tl.sum(acc_u, axis=1)
    if SCALED:
        g1 = g1 * tl.load(s_ptr + soff, mask=rmask, other=0.0).to(tl.float32)
        u1 = u1 * tl.load(s_ptr + usoff, mask=rmask, other=0.0).to(tl.float32)
    return g1, u1


@triton.jit
def _decode_gate_up(x_ptr, ids_ptr, slot_of_ptr, q_ptr, s_ptr, z_ptr, h_ptr, b_ptr, alpha, limit,
                    K, D, I, stride_xt, stride_ws, stride_wn, stride_ss, stride_sn,
                    HAS_MAP: tl.constexpr, QF: tl.constexpr, EVEN_D: tl.constexpr, STAGES: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr = 32, HAS_Z: tl.constexpr = True,
                    NB: tl.constexpr = 1, LK: tl.constexpr = 0, ACT: tl.constexpr = 0,
                    HAS_B: tl.constexpr = False):
    p = tl.program_id(0)
    nb = tl.program_id(1)
    t = p // K
    s = _pair_slot(ids_ptr, slot_of_ptr, p, HAS_MAP)
    s0 = tl.maximum(s, 0)
    rows = nb * BN + tl.arange(0, BN)                     # [BN] gate rows; up rows are rows + I
    rmask = (rows < I) & (tl.zeros([BN], dtype=tl.int64) + s >= 0)   # vector form (interpreter-safe)
    roff = s0 * stride_ws + rows.to(tl.int64) * stride_wn              # [BN]
    soff = s0 * stride_ss + rows.to(tl.int64) * stride_sn
    uoff = roff + I * stride_wn
    usoff = soff + I * stride_sn
    v_ptr = x_ptr + t * stride_xt
    if QF == 2:
        g = _rowdot_int4(q_ptr, s_ptr, z_ptr, roff, soff, rmask, v_ptr, D, STAGES, BN, BK)
        u = _rowdot_int4(q_ptr, s_ptr, z_ptr, uoff, usoff, rmask, v_ptr, D, STAGES, BN, BK)
    elif QF == 3:
        g = _rowdot_int8g(q_ptr, s_ptr, z_ptr, roff, soff, rmask, v_ptr, D, GS, HAS_Z, STAGES, BN, BK)
        u = _rowdot_int8g(q_ptr, s_ptr, z_ptr, uoff, usoff, rmask, v_ptr, D, GS, HAS_Z, STAGES, BN, BK)
    elif QF == 4:
        g, u = _gate_up_q4k(q_ptr, roff, uoff, rmask, v_ptr, D, STAGES, BN, NB)
    elif QF == 5:                                          # LUT4: s_ptr is the format's table
        g = _rowdot_lut4(q_ptr, s_ptr, roff, rmask, v_ptr, D, LK, STAGES, BN, BK)
        u = _rowdot_lut4(q_ptr, s_ptr, uoff, rmask, v_ptr, D, LK, STAGES, BN, BK)
    else:
        g, u = _gate_up_dense(q_ptr, s_ptr, roff, soff, uoff, usoff, rmask, v_ptr, D,
                              QF == 1, EVEN_D, STAGES, BN, BK)
    if HAS_B:                                              # gate/up bias of the expert id (not the slot)
        boff = tl.maximum(tl.load(ids_ptr + p), 0).to(tl.int64) * (2 * I) + rows
        g += tl.load(b_ptr + boff, mask=rows < I, other=0.0).to(tl.float32)
        u += tl.load(b_ptr + boff + I, mask=rows < I, other=0.0).to(tl.float32)
    h = _act(g, u, ACT, alpha, limit)
    tl.store(h_ptr + p * I + rows, h, mask=rows < I)


@triton.jit
def _down_dense(h_ptr, ids_ptr, slot_of_ptr, wts_ptr, q_ptr, s_ptr, t, rows, dmask, K, I,
                stride_ws, stride_wd, stride_ss, stride_sd, HAS_MAP: tl.constexpr, SCALED: tl.constexpr,
                EVEN: tl.constexpr, STAGES: tl.constexpr, BD: tl.constexpr, BI: tl.constexpr):
    """[BD] fp32: sum_k w[t,k] * W2[s_k, rows, :] . h[t*K+k], as ONE flat pipelined loop over (k, I-chunk)
    so loads of different experts overlap."""
    nc = tl.cdiv(I, BI)
    acc = tl.zeros([BD, BI], dtype=tl.float32)
    for j in tl.range(0, K * nc, num_stages=STAGES):
        p, s0, c, wt, vmask = _down_step(ids_ptr, slot_of_ptr, wts_ptr, dmask, t, j, nc, K, HAS_MAP, BD)
        cols = c * BI + tl.arange(0, BI)
        if EVEN:
            hv = tl.load(h_ptr + p * I + cols)
            m = vmask[:, None]
        else:
            hv = tl.load(h_ptr + p * I + cols, mask=cols < I, other=0.0)
            m = vmask[:, None] & (cols < I)[None, :]
        roff = s0 * stride_ws + rows.to(tl.int64) * stride_wd
        w = tl.load(q_ptr + roff[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if SCALED:
            soff = s0 * stride_ss + rows.to(tl.int64) * stride_sd
            wt = wt * tl.load(s_ptr + soff, mask=vmask, other=0.0).to(tl.float32)   # [BD] row scales
            acc += wt[:, None] * (w * hv[None, :])
        else:
            acc += wt * (w * hv[None, :])
    return tl.sum(acc, axis=1)


@triton.jit
def _decode_down(h_ptr, ids_ptr, slot_of_ptr, wts_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
                 K, D, I, stride_ws, stride_wd, stride_ss, stride_sd, stride_ot,
                 HAS_MAP: tl.constexpr, QF: tl.constexpr, EVEN_I: tl.constexpr, STAGES: tl.constexpr,
                 BD: tl.constexpr, BI: tl.constexpr, GS: tl.constexpr = 32, HAS_Z: tl.constexpr = True,
                 NB: tl.constexpr = 1, LK: tl.constexpr = 0):
    t = tl.program_id(0)
    db = tl.program_id(1)
    rows = db * BD + tl.arange(0, BD)                     # [BD] output features d
    dmask = rows < D
    if QF == 4:
        acc = _down_q4k(h_ptr, ids_ptr, slot_of_ptr, wts_ptr, q_ptr, t, rows, dmask, K, I, stride_ws,
                        stride_wd, HAS_MAP, STAGES, BD, NB)
    elif QF >= 2:
        acc = tl.zeros([BD], dtype=tl.float32)
        for k in range(0, K):
            p = t * K + k
            s = _pair_slot(ids_ptr, slot_of_ptr, p, HAS_MAP)
            s0 = tl.maximum(s, 0)
            vmask = dmask & (tl.zeros([BD], dtype=tl.int64) + s >= 0)    # [BD]
            roff = s0 * stride_ws + rows.to(tl.int64) * stride_wd
            soff = s0 * stride_ss + rows.to(tl.int64) * stride_sd
            if QF == 2:
                r = _rowdot_int4(q_ptr, s_ptr, z_ptr, roff, soff, vmask, h_ptr + p * I, I, STAGES, BD, BI)
            elif QF == 5:
                r = _rowdot_lut4(q_ptr, s_ptr, roff, vmask, h_ptr + p * I, I, LK, STAGES, BD, BI)
            else:
                r = _rowdot_int8g(q_ptr, s_ptr, z_ptr, roff, soff, vmask, h_ptr + p * I, I, GS, HAS_Z,
                                  STAGES, BD, BI)
            wt = tl.load(wts_ptr + p).to(tl.float32)
            acc += tl.where(s >= 0, wt * r, 0.0)
    else:
        acc = _down_dense(h_ptr, ids_ptr, slot_of_ptr, wts_ptr, q_ptr, s_ptr, t, rows, dmask, K, I,
                          stride_ws, stride_wd, stride_ss, stride_sd,
                          HAS_MAP, QF == 1, EVEN_I, STAGES, BD, BI)
    tl.store(out_ptr + t * stride_ot + rows, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _grouped_gate_up(x_ptr, pair_ptr, block_slot_ptr, w13_ptr, h_ptr, ids_ptr, b_ptr, alpha, limit,
                     P, K, D, I, stride_xt, stride_ws, stride_wn, LO, NW,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                     ACT: tl.constexpr = 0, HAS_B: tl.constexpr = False):
    b = tl.program_id(0)
    nb = tl.program_id(1)
    s = tl.load(block_slot_ptr + b).to(tl.int64) - LO     # the window [LO, LO + NW) of slots is w13_ptr's
    if (s < 0) | (s >= NW):
        return
    pair = tl.load(pair_ptr + b * BM + tl.arange(0, BM))  # [BM] pair ids, P = padding
    mmask = pair < P
    tok = tl.where(mmask, pair // K, 0)
    n = nb * BN + tl.arange(0, BN)                        # [BN]
    nmask = n < I
    x_ptrs = x_ptr + tok[:, None] * stride_xt             # [BM, 1]
    g_ptrs = w13_ptr + s * stride_ws + n[None, :].to(tl.int64) * stride_wn   # [1, BN]
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < D
        a = tl.load(x_ptrs + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        wm = kmask[:, None] & nmask[None, :]
        wg = tl.load(g_ptrs + kk[:, None], mask=wm, other=0.0)    # [BK, BN]
        wu = tl.load(u_ptrs + kk[:, None], mask=wm, other=0.0)
        a = a.to(wg.dtype)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PREC)
    if HAS_B:                                             # gate/up bias of each pair's expert id
        e = tl.maximum(tl.load(ids_ptr + tl.where(mmask, pair, 0)), 0).to(tl.int64)
        boff = e[:, None] * (2 * I) + n[None, :]
        bm = mmask[:, None] & nmask[None, :]
        acc_g += tl.load(b_ptr + boff, mask=bm, other=0.0).to(tl.float32)
        acc_u += tl.load(b_ptr + boff + I, mask=bm, other=0.0).to(tl.float32)
    h = _act(acc_g, acc_u, ACT, alpha, limit)
    tl.store(h_ptr + pair[:, None].to(tl.int64) * I + n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _grouped_down(h_ptr, pair_ptr, block_slot_ptr, w2_ptr, wts_ptr, y_ptr,
                  P, D, I, stride_ws, stride_wd, LO, NW,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0)
    nb = tl.program_id(1)
    s = tl.load(block_slot_ptr + b).to(tl.int64) - LO
    if (s < 0) | (s >= NW):
        return
    pair = tl.load(pair_ptr + b * BM + tl.arange(0, BM))
    mmask = pair < P
    prow = tl.where(mmask, pair, 0).to(tl.int64)
    n = nb * BN + tl.arange(0, BN)                        # [BN] output features d
    nmask = n < D
    h_ptrs = h_ptr + prow[:, None] * I                    # [BM, 1]
    w_ptrs = w2_ptr + s * stride_ws + n[None, :].to(tl.int64) * stride_wd   # [1, BN]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, I, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < I
        a = tl.load(h_ptrs + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PREC)
    wt = tl.load(wts_ptr + prow, mask=mmask, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    tl.store(y_ptr + prow[:, None] * D + n[None, :], acc, mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------- configs
def _block(rows: int, groups: int, lo: int, hi: int, target: int = 256) -> int:
    """Largest power-of-two block in [lo, hi] that still gives >= target programs (~2 per H200 SM)."""
    b = hi
    while b > lo and groups * triton.cdiv(rows, b) < target:
        b //= 2
    return b


def decode_config(T: int, K: int, D: int, I: int) -> dict:
    """Block sizes for the GEMV kernels: enough programs to fill the GPU, wide row loads, and fp32
    accumulator tiles of <= 64 values per thread (4 warps) so nothing spills."""
    bn, bd = _block(I, T * K, 8, 32), _block(D, T, 4, 64)
    return {"BN": bn, "BK": min(256, 4096 // bn), "BD": bd, "BI": min(256, 8192 // bd), "num_warps": 4,
            "stages": 3}


def prefill_config(P: int, S: int, D: int, I: int) -> dict:
    """Block sizes for the grouped GEMMs: the M tile follows the average rows per slot (less padding)."""
    avg = P / max(S, 1)
    bm = 16 if avg <= 16 else 32 if avg <= 48 else 64
    return {"BM": bm, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3}


# ----------------------------------------------------------------------------------------------- drivers
def _slots(ids: torch.Tensor, slot_of: torch.Tensor | None) -> torch.Tensor:
    """Slot per pair, -1 when absent. ids [T,K] -> [P] int64 (device ops only)."""
    flat = ids.reshape(-1)
    if slot_of is None:
        return flat.clamp(min=-1)
    s = slot_of.long()[flat.clamp(min=0)]
    return torch.where(flat >= 0, s, -1)


def align_by_slot(slot: torch.Tensor, S: int, BM: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort pairs by slot and pad each slot's run to BM rows, without host synchronisation.

    slot [P] int64 (-1 = skip) -> pair_ids [NB*BM] (P = padding), block_slot [NB] (-1 = unused block),
    NB = cdiv(P, BM) + min(S, P) (a static upper bound).
    """
    P = slot.numel()
    dev = slot.device
    nb = (P + BM - 1) // BM + min(S, P)
    key = torch.where(slot >= 0, slot, S)                              # invalid pairs sort last
    skey, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(skey, torch.arange(S + 1, device=dev, dtype=skey.dtype))   # [S+1]
    counts = bounds[1:] - bounds[:-1]                                  # [S]
    padded = (counts + BM - 1) // BM * BM
    pend = torch.cumsum(padded, 0)                                     # [S]
    pstart = pend - padded
    kv = skey.clamp(max=S - 1)
    dest = pstart[kv] + torch.arange(P, device=dev) - bounds[kv]
    cap = nb * BM
    dest = torch.where(skey < S, dest, cap)                            # invalid pairs -> dump cell
    pair_ids = torch.full((cap + 1,), P, dtype=torch.int64, device=dev)
    pair_ids.scatter_(0, dest, order)
    bstart = torch.arange(nb, device=dev, dtype=pend.dtype) * BM
    block_slot = torch.searchsorted(pend, bstart, right=True)
    block_slot = torch.where(block_slot < S, block_slot, -1)
    return pair_ids[:cap], block_slot


def _unpack(w) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Weight -> (QF, q, scale, zero, constexprs); placeholders repeat q. Duck-typed on QuantizedWeight."""
    fmt = getattr(w, "fmt", None)
    if fmt is None:
        return 0, w, w, w, {}
    if fmt == "int8":
        return 1, w.q, w.scale, w.scale, {}
    if fmt == "int4g32":
        return 2, w.q, w.scale, w.zero, {}
    if fmt in ("int8g32", "int8g16"):
        zero = w.zero if w.zero is not None else w.scale
        return 3, w.q, w.scale, zero, {"GS": int(fmt[5:]), "HAS_Z": w.zero is not None}
    if fmt == "q4_k":
        return 4, w.q, w.q, w.q, {}
    if fmt in LUT4_KIND:                                  # the scale slot carries the format's table
        return 5, w.q, lut4_table(fmt, w.q.device), w.q, {"LK": LUT4_KIND[fmt]}
    raise ValueError(f"unsupported quantized format {fmt!r}")


def _sstrides(qf: int, sc: torch.Tensor) -> tuple[int, int]:
    return (sc.stride(0), sc.stride(1)) if qf in (1, 2, 3) else (0, 0)


def _quant_config(w13, w2) -> dict:
    """Per-format decode blocks from the H200 sweeps (scripts/bench_gpu_moe.py --quant-sweep, Qwen3-30B-A3B
    layer, T=1): int4g32 8 warps (40.7 vs 46.4 us with 4, run 5); int8gG 4 warps and 8 gate/up rows per
    program (int8g32 30.8 vs 33.7 us, int8g16 with zero 33.4 vs 42.7 us with 8 warps and 16 rows, run 17).
    Each kernel takes its own matrix's warps (w13 and w2 may differ, e.g. a Q4_K_M file).
    q4_k (not measured on a GPU yet; the lead's sweep knobs: BN, NB_A, warps_a, BD, NB_B, warps_b, stages):
    kernel A 16 gate + 16 up rows x 2 blocks per step (9.2 KB of weights per step, 384 programs at T=1),
    8 warps; kernel B 8 rows x 4 blocks (one step per expert for I = 768; the 4th block is masked, no
    traffic), 4 warps, 256 programs."""
    f13, f2 = getattr(w13, "fmt", None), getattr(w2, "fmt", None)
    warps = {"int4g32": 8, "int8g32": 4, "int8g16": 4, "q4_k": 8, "mxfp4": 8, "iq4_nl": 8, "iq4_xs": 8}
    out = {"warps_a": warps[f13]} if f13 in warps else {}
    if f2 in warps:
        out["warps_b"] = 4 if f2 == "q4_k" else warps[f2]
    if f13 in ("int8g32", "int8g16"):
        out["BN"] = 8
    if f13 == "q4_k":
        out["NB_A"] = 2
    if f2 == "q4_k":
        out["NB_B"] = 4
    return out


def _variant(act: ExpertAct, b13, like: torch.Tensor) -> tuple[tuple, dict]:
    """(b_ptr, alpha, limit) arguments and the ACT / HAS_B constexprs of a variant; b13 [E, 2I] or None."""
    b = like if b13 is None else b13.contiguous()
    return (b, float(act.alpha), float(act.limit)), {"ACT": act.code, "HAS_B": b13 is not None}


def moe_decode(x, ids, weights, w13, w2, slot_of=None, out=None, cfg: dict | None = None,
               act: ExpertAct = SILU, b13: torch.Tensor | None = None):
    """GEMV path (small T*K); dense, int8, int4g32, int8gG or q4_k weights. See module docstring.
    cfg keys (decode_config, _quant_config): BN, BK, BD, BI, num_warps, stages, warps_a, warps_b, and for q4_k
    NB_A / NB_B (Q4_K blocks of 256 columns per loop step of kernel A / B)."""
    T, K = ids.shape
    S, I2, D = w13.shape
    I = I2 // 2
    tuned = _quant_config(w13, w2) if not (cfg and "num_warps" in cfg) else {}   # a caller's warps win
    cfg = {**decode_config(T, K, D, I), **tuned, **(cfg or {})}
    ids = ids.contiguous()
    weights = weights.contiguous()
    out = torch.empty(T, D, dtype=x.dtype, device=x.device) if out is None else out
    h = torch.empty(T * K, I, dtype=torch.float32, device=x.device)       # [P, I]
    smap = slot_of if slot_of is not None else ids
    qa, q13, s13, z13, ka = _unpack(w13)
    qb, q2, s2, z2, kb = _unpack(w2)
    if qa == 4:                                                          # q4_k: blocks per loop step
        ka["NB"] = cfg.get("NB_A", 2)
    if qb == 4:
        kb["NB"] = cfg.get("NB_B", 4)
    bk = max(64, cfg["BK"] * 2) if qa in (2, 5) else cfg["BK"]           # 4-bit: same bytes per load
    bi = max(64, cfg["BI"] * 2) if qb in (2, 5) else cfg["BI"]
    grid_a = (T * K, triton.cdiv(I, cfg["BN"]))
    vargs, vk = _variant(act, b13, h)
    _decode_gate_up[grid_a](x, ids, smap, q13, s13, z13, h, *vargs, K, D, I, x.stride(0), q13.stride(0),
                            q13.stride(1), *_sstrides(qa, s13),
                            HAS_MAP=slot_of is not None, QF=qa, EVEN_D=D % bk == 0, STAGES=cfg["stages"],
                            BN=cfg["BN"], BK=bk, num_warps=cfg.get("warps_a", cfg["num_warps"]), **ka, **vk)
    grid_b = (T, triton.cdiv(D, cfg["BD"]))
    _decode_down[grid_b](h, ids, smap, weights, q2, s2, z2, out, K, D, I, q2.stride(0), q2.stride(1),
                         *_sstrides(qb, s2), out.stride(0),
                         HAS_MAP=slot_of is not None, QF=qb, EVEN_I=I % bi == 0, STAGES=cfg["stages"],
                         BD=cfg["BD"], BI=bi, num_warps=cfg.get("warps_b", cfg["num_warps"]), **kb)
    return out


def moe_prefill(x, ids, weights, w13, w2, slot_of=None, out=None, cfg: dict | None = None,
                act: ExpertAct = SILU, b13: torch.Tensor | None = None):
    """Sorted grouped-GEMM path (large T*K). See module docstring."""
    S, I2, _ = w13.shape
    gp = GroupedPass(x, _slots(ids, slot_of).view(ids.shape), weights, S, I2 // 2, w13.dtype, cfg,
                     ids=ids, act=act, b13=b13)
    gp.run(0, w13, w2)
    return gp.result(out)


class GroupedPass:
    """The prefill path in windows: pairs sorted by slot ONCE (ranks [T,K] in [0, U), -1 = skip), then
    `run(lo, w13, w2)` computes the pairs of slots [lo, lo + len(w13)) with those weights (w13[j] is slot
    lo + j). Each pair is computed by the one window holding its slot; `result()` sums them per token. The
    chunked dequantized path (gpu_moe.dequant_chunks_moe) runs one window per chunk: one sort per layer
    instead of one per chunk, and four launches per chunk. act / b13 (with the pairs' expert ids [T, K]): the
    variant, applied in the gate/up kernel's epilogue."""

    def __init__(self, x, ranks, weights, U: int, I: int, wdtype: torch.dtype, cfg: dict | None = None, *,
                 ids: torch.Tensor | None = None, act: ExpertAct = SILU, b13: torch.Tensor | None = None):
        self.x = x if x.stride(-1) == 1 else x.contiguous()
        self.T, self.K = ranks.shape
        P, D = self.T * self.K, x.shape[1]
        self.P, self.D, self.I = P, D, I
        self.cfg = cfg or prefill_config(P, U, D, I)
        self.pair_ids, self.block_slot = align_by_slot(ranks.reshape(-1), U, self.cfg["BM"])
        self.weights = weights.contiguous()
        self.h = torch.empty(P, I, dtype=wdtype, device=x.device)            # [P, I]
        self.y = torch.zeros(P, D, dtype=torch.float32, device=x.device)     # [P, D]; skipped pairs stay 0
        if b13 is not None and ids is None:
            raise ValueError("GroupedPass: a gate/up bias needs the pairs' expert ids")
        self.ids = (ids if ids is not None else ranks).reshape(-1).contiguous()
        self.vargs, self.vk = _variant(act, b13, self.y)

    def run(self, lo: int, w13, w2) -> None:
        cfg, nb, P, D, I = self.cfg, self.block_slot.numel(), self.P, self.D, self.I
        BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
        # fp32 weights multiply in full fp32 ("ieee"), not TF32 (Triton's default): they are the exact path
        kw = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
              "PREC": "ieee" if w13.dtype == torch.float32 else "tf32"}
        nw = w13.shape[0]
        _grouped_gate_up[(nb, triton.cdiv(I, BN))](self.x, self.pair_ids, self.block_slot, w13, self.h,
                                                   self.ids, *self.vargs, P, self.K, D, I, self.x.stride(0),
                                                   w13.stride(0), w13.stride(1), lo, nw, BM=BM, BN=BN, BK=BK,
                                                   **kw, **self.vk)
        _grouped_down[(nb, triton.cdiv(D, BN))](self.h, self.pair_ids, self.block_slot, w2, self.weights,
                                                self.y, P, D, I, w2.stride(0), w2.stride(1), lo, nw,
                                                BM=BM, BN=BN, BK=BK, **kw)

    def result(self, out=None):
        res = self.y.view(self.T, self.K, self.D).sum(1)
        if out is None:
            return res.to(self.x.dtype)
        return out.copy_(res)


def uses_decode(T: int, K: int, S: int) -> bool:
    """GEMV path when every pair likely has its own expert (one token, or few pairs among many slots);
    else the grouped path, which reads each slot once however many pairs use it."""
    return T == 1 or T * K <= min(DECODE_MAX_PAIRS, S // 4)


def supports(ids: torch.Tensor, w13, w2) -> bool:
    """Quantized slots (int8, int4g32, int8gG, q4_k, LUT4) run on the decode path only (prompt batches over
    them:
    gpu_moe.dequant_chunks_moe); dense weights on both paths."""
    dense = getattr(w13, "fmt", None) is None and getattr(w2, "fmt", None) is None
    return dense or uses_decode(ids.shape[0], ids.shape[1], w13.shape[0])


def moe_triton(x, ids, weights, w13, w2, slot_of=None, out=None, *, act: ExpertAct = SILU,
               b13: torch.Tensor | None = None):
    """Pick the path from static shapes (see uses_decode)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is not None and out.stride(-1) != 1:
        return out.copy_(moe_triton(x, ids, weights, w13, w2, slot_of, act=act, b13=b13))
    if uses_decode(ids.shape[0], ids.shape[1], w13.shape[0]):
        return moe_decode(x, ids, weights, w13, w2, slot_of, out, act=act, b13=b13)
    if not supports(ids, w13, w2):
        raise NotImplementedError("grouped Triton MoE path needs dense weights")
    return moe_prefill(x, ids, weights, w13, w2, slot_of, out, act=act, b13=b13)
