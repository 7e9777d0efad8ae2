"""Dequantize selected experts of a quantized slot pool on the device, in one Triton launch per matrix.

    dequant_slots(w: QuantizedWeight [S, N, Kc], idx [C] int64, dtype, out=None) -> [C, N, Kc] dtype
    int4g32: w = (q - 8) * scale + zero per 32 columns; int8: w = q * scale per row;
    int8gG: w = q * scale (+ zero) per G = 16 or 32 columns;
    q4_k (q [S, N, Kc/256 * 144], GGUF Q4_K blocks): w = (d * sc_j) * q - dmin * m_j per sub-block j of 32;
    LUT4 mxfp4 / iq4_nl / iq4_xs (q [S, N, Kc/B * bytes], GGUF blocks, weights.py): w = scale_g * table[index]
    per 32-group g (the 16-entry fp32 table read through L1, lut4_table).
The math is fp32 and rounds once to `dtype`, like experts/quant.dequantize(w[idx], float32).to(dtype)
(the product (q - 8) * scale is exact in fp32, so a fused multiply-add gives the same bits). Prompt batches
over quantized slots (kernels/gpu_moe.dequant_chunks_moe) use it: the torch-op version wrote fp32
temporaries several times over (~2-3 ms per 16 Qwen3-30B-A3B experts on the H200).
Grid (C, cdiv(N, BR)); each program walks its rows' columns in blocks of BK (a multiple of 32); q4_k: NB
Q4_K blocks (256 columns each) at a time; LUT4: BK / 32 groups at a time. q4k_scales and lut4_groups are
shared with the decode GEMV (triton_moe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hotexperts.weights import LUT4_VALUES

Q4K_BLOCK = (8, 512, 4)     # q4_k dequantize: rows, columns (2 blocks), warps per program (not yet swept)
LUT4_KIND = {"mxfp4": 0, "iq4_nl": 1, "iq4_xs": 2}    # the kernels' LK constexpr
_TABLES: dict = {}


def lut4_table(fmt: str, device) -> torch.Tensor:
    """The format's 16 table values as fp32 on `device`, made once per (format, device): no copy per call, so
    a call inside a CUDA graph capture reads a tensor made before it."""
    key = (fmt, str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(LUT4_VALUES[fmt], dtype=torch.float32).to(device)
    return _TABLES[key]


@triton.jit
def _program_rows(idx_ptr, N, BR: tl.constexpr):
    """This program's place in a dequantize grid (C, cdiv(N, BR)): (c, the output expert index; e = idx[c],
    the slot it reads, int64; its BR rows as int64 [BR]; their mask rows < N [BR])."""
    c = tl.program_id(0)
    e = tl.load(idx_ptr + c).to(tl.int64)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    return c, e, rows.to(tl.int64), rows < N


@triton.jit
def lut4_groups(q_ptr, roff, gi, m, LK: tl.constexpr):
    """LUT4 rows at byte offsets roff [BR], 32-groups gi [G] (mask m [BR, G]) -> (scale fp32 [BR, G], byte
    offset of the group's 16 index bytes [BR, G]). LK 0 MXFP4 (17-byte blocks: e8m0 e, scale 2^(e - 128) built
    as fp32 bits), 1 IQ4_NL (18 bytes: fp16 d), 2 IQ4_XS (136 bytes per 8 groups: d, scales_h, scales_l, the
    groups' indices; scale d (ls - 32))."""
    r = roff[:, None]
    if LK == 0:
        boff = r + gi[None, :].to(tl.int64) * 17
        e = tl.load(q_ptr + boff, mask=m, other=0).to(tl.int32)
        scale = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
        qoff = boff + 1
    elif LK == 1:
        boff = r + gi[None, :].to(tl.int64) * 18
        lo = tl.load(q_ptr + boff, mask=m, other=0).to(tl.int32)
        hi = tl.load(q_ptr + boff + 1, mask=m, other=0).to(tl.int32)
        scale = (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        qoff = boff + 2
    else:
        ib = gi[None, :] % 8
        boff = r + (gi[None, :] // 8).to(tl.int64) * 136
        b0 = tl.load(q_ptr + boff, mask=m, other=0).to(tl.int32)
        b1 = tl.load(q_ptr + boff + 1, mask=m, other=0).to(tl.int32)
        sh = tl.load(q_ptr + boff + 2, mask=m, other=0).to(tl.int32) | (
            tl.load(q_ptr + boff + 3, mask=m, other=0).to(tl.int32) << 8)
        sl = tl.load(q_ptr + boff + 4 + ib // 2, mask=m, other=0).to(tl.int32)
        ls = ((sl >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
        d = (b0 | (b1 << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        scale = d * (ls - 32).to(tl.float32)
        qoff = boff + 8 + ib * 16
    return scale, qoff


@triton.jit
def _lut4_kernel(q_ptr, tab_ptr, idx_ptr, out_ptr, N, KC, sq_e, sq_n, so_e, so_n, LK: tl.constexpr,
                 BR: tl.constexpr, BG: tl.constexpr):
    c, e, r64, rmask = _program_rows(idx_ptr, N, BR)                 # [BR] rows of slot e
    jj = tl.arange(0, 16)[None, None, :]
    for g0 in range(0, KC // 32, BG):
        gi = g0 + tl.arange(0, BG)                                    # [BG]
        m = rmask[:, None] & (gi < KC // 32)[None, :]                 # [BR, BG]
        sc, qoff = lut4_groups(q_ptr, e * sq_e + r64 * sq_n, gi, m, LK)
        m3 = m[:, :, None]
        q = tl.load(q_ptr + qoff[:, :, None] + jj, mask=m3, other=0)    # [BR, BG, 16]
        lo = sc[:, :, None] * tl.load(tab_ptr + (q & 15).to(tl.int32))
        hi = sc[:, :, None] * tl.load(tab_ptr + (q >> 4).to(tl.int32))
        optr = out_ptr + c * so_e + r64[:, None, None] * so_n + gi[None, :, None].to(tl.int64) * 32 + jj
        tl.store(optr, lo.to(out_ptr.dtype.element_ty), mask=m3)
        tl.store(optr + 16, hi.to(out_ptr.dtype.element_ty), mask=m3)


@triton.jit
def q4k_scales(q_ptr, boff, m):
    """Q4_K block headers at byte offsets boff [BR, NB] (masked by m) -> (ae, ao, be, bo) [BR, NB, 4] fp32:
    chunk c's sub-blocks 2c (low nibbles: w = ae q - be) and 2c + 1 (high: w = ao q - bo); a = d * sc and
    b = dmin * m are exact in fp32. The header is 4 int32 words: d | dmin << 16, then the 12 bytes of 6-bit
    scales, decoded with llama.cpp's masks and shifts (get_scale_min_k4)."""
    hp = (q_ptr + boff).to(tl.pointer_type(tl.int32))                 # blocks are 144 = 9 * 16 bytes
    w0 = tl.load(hp, mask=m, other=0)
    u0 = tl.load(hp + 1, mask=m, other=0)
    u1 = tl.load(hp + 2, mask=m, other=0)
    u2 = tl.load(hp + 3, mask=m, other=0)
    d = (w0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    sc_lo = u0 & 0x3F3F3F3F                                           # bytes: sc0 .. sc3
    sc_hi = (u2 & 0x0F0F0F0F) | (((u0 >> 6) & 0x03030303) << 4)      # sc4 .. sc7
    m_lo = u1 & 0x3F3F3F3F
    m_hi = ((u2 >> 4) & 0x0F0F0F0F) | (((u1 >> 6) & 0x03030303) << 4)
    c = tl.arange(0, 4)[None, None, :]                                # chunk: sub-blocks 2c, 2c + 1
    sh = (c % 2) * 16                                                 # sc_{2c} is byte 2 (c % 2) of its word
    ws = tl.where(c < 2, sc_lo[:, :, None], sc_hi[:, :, None])
    wm = tl.where(c < 2, m_lo[:, :, None], m_hi[:, :, None])
    d3, dm3 = d[:, :, None], dmin[:, :, None]
    ae = d3 * ((ws >> sh) & 0xFF).to(tl.float32)
    ao = d3 * ((ws >> (sh + 8)) & 0xFF).to(tl.float32)
    be = dm3 * ((wm >> sh) & 0xFF).to(tl.float32)
    bo = dm3 * ((wm >> (sh + 8)) & 0xFF).to(tl.float32)
    return ae, ao, be, bo


@triton.jit
def _q4k_kernel(q_ptr, idx_ptr, out_ptr, N, KC, sq_e, sq_n, so_e, so_n, BR: tl.constexpr, NB: tl.constexpr):
    c, e, r64, rmask = _program_rows(idx_ptr, N, BR)                 # [BR] rows of slot e
    nblk = KC // 256
    cc = tl.arange(0, 4)[None, None, :, None]                         # chunk
    ll = tl.arange(0, 32)[None, None, None, :]                        # byte in the chunk
    for b0 in range(0, nblk, NB):
        blk = b0 + tl.arange(0, NB)                                   # [NB]
        m = rmask[:, None] & (blk < nblk)[None, :]                    # [BR, NB]
        boff = e * sq_e + r64[:, None] * sq_n + blk[None, :].to(tl.int64) * 144
        ae, ao, be, bo = q4k_scales(q_ptr, boff, m)                   # [BR, NB, 4]
        m4 = m[:, :, None, None]
        q = tl.load(q_ptr + boff[:, :, None, None] + 16 + cc * 32 + ll, mask=m4, other=0)   # [BR, NB, 4, 32]
        we = ae[:, :, :, None] * (q & 15).to(tl.float32) - be[:, :, :, None]
        wo = ao[:, :, :, None] * (q >> 4).to(tl.float32) - bo[:, :, :, None]
        col = blk[None, :, None, None].to(tl.int64) * 256 + cc * 64 + ll                    # sub-block 2c
        optr = out_ptr + c * so_e + r64[:, None, None, None] * so_n + col
        tl.store(optr, we.to(out_ptr.dtype.element_ty), mask=m4)
        tl.store(optr + 32, wo.to(out_ptr.dtype.element_ty), mask=m4)                      # 2c + 1


@triton.jit
def _int4_kernel(q_ptr, s_ptr, z_ptr, idx_ptr, out_ptr, N, KC, sq_e, sq_n, ss_e, ss_n, so_e, so_n,
                 BR: tl.constexpr, BK: tl.constexpr):
    c, e, r64, rmask = _program_rows(idx_ptr, N, BR)                 # [BR] rows of slot e
    for k0 in range(0, KC, BK):
        j = tl.arange(0, BK // 2)                                     # byte j holds columns 2j, 2j+1
        cm = k0 + 2 * j < KC
        m = rmask[:, None] & cm[None, :]
        qb = tl.load(q_ptr + e * sq_e + r64[:, None] * sq_n + (k0 // 2 + j)[None, :], mask=m, other=0)
        g = (k0 + 2 * j) // 32
        sc = tl.load(s_ptr + e * ss_e + r64[:, None] * ss_n + g[None, :], mask=m, other=0.0).to(tl.float32)
        zr = tl.load(z_ptr + e * ss_e + r64[:, None] * ss_n + g[None, :], mask=m, other=0.0).to(tl.float32)
        lo = ((qb & 15).to(tl.float32) - 8.0) * sc + zr
        hi = ((qb >> 4).to(tl.float32) - 8.0) * sc + zr
        w = tl.reshape(tl.join(lo, hi), [BR, BK])                      # interleave: even, odd columns
        col = k0 + tl.arange(0, BK)
        om = rmask[:, None] & (col < KC)[None, :]
        tl.store(out_ptr + c * so_e + r64[:, None] * so_n + col[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=om)


@triton.jit
def _int8_kernel(q_ptr, s_ptr, idx_ptr, out_ptr, N, KC, sq_e, sq_n, ss_e, so_e, so_n,
                 BR: tl.constexpr, BK: tl.constexpr):
    c, e, r64, rmask = _program_rows(idx_ptr, N, BR)                 # [BR] rows of slot e
    sc = tl.load(s_ptr + e * ss_e + r64, mask=rmask, other=0.0).to(tl.float32)     # [BR]
    for k0 in range(0, KC, BK):
        col = k0 + tl.arange(0, BK)
        m = rmask[:, None] & (col < KC)[None, :]
        q = tl.load(q_ptr + e * sq_e + r64[:, None] * sq_n + col[None, :], mask=m, other=0).to(tl.float32)
        tl.store(out_ptr + c * so_e + r64[:, None] * so_n + col[None, :],
                 (q * sc[:, None]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _int8g_kernel(q_ptr, s_ptr, z_ptr, idx_ptr, out_ptr, N, KC, sq_e, sq_n, ss_e, ss_n, so_e, so_n,
                  GS: tl.constexpr, HAS_Z: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    c, e, r64, rmask = _program_rows(idx_ptr, N, BR)                 # [BR] rows of slot e
    for k0 in range(0, KC, BK):
        col = k0 + tl.arange(0, BK)
        m = rmask[:, None] & (col < KC)[None, :]
        q = tl.load(q_ptr + e * sq_e + r64[:, None] * sq_n + col[None, :], mask=m, other=0).to(tl.float32)
        soff = e * ss_e + r64[:, None] * ss_n + (col // GS)[None, :]
        w = q * tl.load(s_ptr + soff, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            w += tl.load(z_ptr + soff, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + c * so_e + r64[:, None] * so_n + col[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=m)


def dequant_slots(w, idx: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None, *,
                  block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """See module docstring. w: QuantizedWeight with contiguous q / scale / zero on one device. out: a
    [C, N, Kc] buffer of `dtype` with unit last stride to write into (e.g. part of a chunk buffer).
    block: (rows, columns, warps) per program (BK a multiple of 64); default: (8, 256, 4) for rows of 2048+
    columns, else (16, 256, 4) — the fastest in scripts/bench_dequant.py's sweep on the H200 (run 14:
    Qwen3-30B-A3B w13 146 vs 240 µs for 27 experts with the old (16, 128); w2 54 µs either way).
    q4_k: columns per program step = NB * 256 (NB = BK // 256, at least 1; default Q4K_BLOCK)."""
    S, N, KC = w.shape
    C = idx.numel()
    if out is None:
        out = torch.empty(C, N, KC, dtype=dtype, device=w.q.device)
    elif out.shape != (C, N, KC) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"dequant_slots: out must be [{C}, {N}, {KC}] {dtype} with unit last stride")
    if C == 0:
        return out
    idx = idx.to(torch.int64).contiguous()
    if w.fmt in LUT4_KIND:
        q = w.q.contiguous()
        BR, BK, warps = block or (8, 256, 4)
        _lut4_kernel[(C, triton.cdiv(N, BR))](q, lut4_table(w.fmt, q.device), idx, out, N, KC, q.stride(0),
                                             q.stride(1), out.stride(0), out.stride(1), LK=LUT4_KIND[w.fmt],
                                             BR=BR, BG=max(1, BK // 32), num_warps=warps)
        return out
    if w.fmt == "q4_k":
        q = w.q.contiguous()
        BR, BK, warps = block or Q4K_BLOCK
        _q4k_kernel[(C, triton.cdiv(N, BR))](q, idx, out, N, KC, q.stride(0), q.stride(1), out.stride(0),
                                            out.stride(1), BR=BR, NB=max(1, BK // 256), num_warps=warps)
        return out
    BR, BK, warps = block or ((8, 256, 4) if KC >= 2048 else (16, 256, 4))
    grid = (C, triton.cdiv(N, BR))
    q, s = w.q.contiguous(), w.scale.contiguous()
    if w.fmt == "int4g32":
        z = w.zero.contiguous()
        _int4_kernel[grid](q, s, z, idx, out, N, KC, q.stride(0), q.stride(1), s.stride(0), s.stride(1),
                           out.stride(0), out.stride(1), BR=BR, BK=BK, num_warps=warps)
    elif w.fmt in ("int8g32", "int8g16"):
        z = w.zero.contiguous() if w.zero is not None else s
        _int8g_kernel[grid](q, s, z, idx, out, N, KC, q.stride(0), q.stride(1), s.stride(0), s.stride(1),
                            out.stride(0), out.stride(1), GS=w.group, HAS_Z=w.zero is not None,
                            BR=BR, BK=BK, num_warps=warps)
    elif w.fmt == "int8":
        _int8_kernel[grid](q, s, idx, out, N, KC, q.stride(0), q.stride(1), s.stride(0), out.stride(0),
                           out.stride(1), BR=BR, BK=BK, num_warps=warps)
    else:
        raise ValueError(f"dequant_slots: unsupported format {w.fmt!r}")
    return out
