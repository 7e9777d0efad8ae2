"""Weight-only quantization of expert matrices into the QuantizedWeight formats (weights.py). The format
names, block sizes and bytes per weight are formats.py's (the one vocabulary, torch-free); this module
quantizes and dequantizes them.

quantize_int8(w[..., N, K])     -> "int8":    q int8, scale fp32 [..., N] (symmetric, per output row)
quantize_int4g32(w[..., N, K])  -> "int4g32": q uint8 [..., N, K/2] (low nibble = even column),
                                   scale, zero [..., N, K/32] (fp16 by default), w = (q - 8) * scale + zero
quantize_int8g(w[..., N, K], group=32) -> "int8gG": q int8 [..., N, K], scale [..., N, K/G] (symmetric,
                                   fp16 by default; zero None), w = q * scale
int8g_from_int4g32(qw, group)    -> the same weights as "int8gG" (q - 8, scale and zero repeated): exact
quantize_q4_k(w[..., N, K])     -> "q4_k": GGUF Q4_K blocks (K a multiple of 256; the GGUF writers' packer)
quantize_lut4(w[..., N, K], fmt) -> a 4-bit lookup weight (weights.py LUT4: "mxfp4" as gguf's quantizer
                                   does it, "iq4_nl" / "iq4_xs" with the largest |w| of a 32-group on
                                   kvalue -127 and nearest-value indices; K a multiple of 32, 256 for iq4_xs)
dequantize(qw, dtype)           -> the float tensor the formats stand for (fp32 by default); q4_k and LUT4 bit
                                   for bit as gguf.quants.dequantize: w = (d * sc) * q - dmin * m in fp32;
                                   LUT4 w = scale * table[index]
lut4_parts(q bytes, fmt)        -> (scale fp32 [..., N, K/32], index uint8 [..., N, K/32, 32]) of LUT4 blocks
k_scales(bytes [..., 12])       -> Q4_K/Q5_K 6-bit (sc, m) [..., 8] (llama.cpp get_scale_min_k4)
quantize_layer(LayerExperts, fmt), fmt in formats.QUANTIZE_FORMATS ("none", "int4" = int4g32, each store
                                   format)

GGUF blocks of 32 map onto int4g32 exactly (w = a * q + b per block, q in 0..15):
    Q4_0: a = d, b = -8 d;   Q4_1: a = d, b = m;   Q4_K sub-block: a = d * sc, b = -dmin * m
int4g32_from_affine(q, a, b) builds the weight from such (unpacked q, a, b); pack_int4/unpack_int4 convert
between one value per byte and our nibble layout (GGUF's own layout differs: low nibbles = first 16).
"""

from __future__ import annotations

import dataclasses

import torch

from hotexperts.formats import INT8G, LUT4_BLOCKS, Q4K_BLOCK, Q4K_BYTES, QUANTIZE_FORMATS
from hotexperts.weights import LUT4_VALUES, LayerExperts, QuantizedWeight, Weight, cat


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    wf = w.float()                                                  # [..., N, K]
    scale = wf.abs().amax(dim=-1) / 127.0                           # [..., N]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scale)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] values 0..15 (any int dtype) -> [..., K/2] uint8, low nibble = even column."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] uint8 values 0..15."""
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


def quantize_int4g32(w: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Asymmetric 4-bit per group of 32 columns; exact for values already on a group's grid."""
    if w.shape[-1] % 32:
        raise ValueError(f"int4g32 needs the last dimension to be a multiple of 32, got {w.shape[-1]}")
    g = w.float().unflatten(-1, (-1, 32))                            # [..., N, G, 32]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                          # [..., N, G]
    scale = ((hi - lo) / 15.0).to(scale_dtype)
    zero = (lo + 8.0 * scale.float()).to(scale_dtype)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.round((g - z) / torch.where(s > 0, s, torch.ones_like(s)) + 8.0).clamp_(0, 15)
    return QuantizedWeight("int4g32", pack_int4(q.flatten(-2)), scale, zero)


def int4g32_from_affine(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """q [..., N, K] in 0..15, a, b [..., N, K/32] with w = a * q + b (GGUF Q4_0/Q4_1/Q4_K form)."""
    a32 = a.float()
    zero = (b.float() + 8.0 * a32).to(scale_dtype)
    return QuantizedWeight("int4g32", pack_int4(q), a32.to(scale_dtype), zero)


def quantize_int8g(w: torch.Tensor, group: int = 32,
                   scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Symmetric int8 per group of `group` columns (scale = amax / 127; no zero)."""
    if w.shape[-1] % group:
        raise ValueError(f"int8g{group} needs the last dimension to be a multiple of {group}, "
                         f"got {w.shape[-1]}")
    g = w.float().unflatten(-1, (-1, group))                         # [..., N, G, group]
    scale = (g.abs().amax(dim=-1) / 127.0).to(scale_dtype)           # [..., N, G]
    s = scale.float().unsqueeze(-1)
    q = torch.round(g / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-128, 127).to(torch.int8)
    return QuantizedWeight(f"int8g{group}", q.flatten(-2), scale)


def int8g_from_int4g32(qw: QuantizedWeight, group: int = 32) -> QuantizedWeight:
    """An int4g32 weight as int8gG with the same values: q - 8 (int8), scale and zero per 32 repeated for
    G = 16. Exact: (q - 8) * scale + zero is the same product in both formats."""
    if group not in (16, 32):
        raise ValueError(f"int8g group must be 16 or 32, got {group}")
    q = (unpack_int4(qw.q).to(torch.int16) - 8).to(torch.int8)
    rep = 32 // group
    return QuantizedWeight(f"int8g{group}", q, qw.scale.repeat_interleave(rep, -1),
                           qw.zero.repeat_interleave(rep, -1))


def quantize_q4_k(w: torch.Tensor) -> QuantizedWeight:
    """GGUF Q4_K of w [..., N, K] (K a multiple of 256): the min/max packer gguf_export writes files with."""
    if w.shape[-1] % Q4K_BLOCK:
        raise ValueError(f"q4_k needs the last dimension to be a multiple of 256, got {w.shape[-1]}")
    blocks = pack_q4_k(w.float().unflatten(-1, (-1, Q4K_BLOCK)))    # [..., N, K/256, 144]
    return QuantizedWeight("q4_k", blocks.flatten(-2).contiguous(), None)


def k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K packed bytes [..., 12] uint8 -> (sc, m) [..., 8] 6-bit ints (llama.cpp get_scale_min_k4)."""
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((lo_sc & 63, (hi & 15) | ((lo_sc >> 6) << 4)), -1)
    m = torch.cat((lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)), -1)
    return sc, m


def _dequantize_q4_k(q: torch.Tensor) -> torch.Tensor:
    """q4_k bytes [..., N, nb * 144] -> fp32 [..., N, nb * 256], the same fp32 operations as gguf's numpy
    (a = d * sc and b = dmin * m are exact, so are a * q; one rounding in the subtraction)."""
    b = q.unflatten(-1, (-1, Q4K_BYTES))                             # [..., N, nb, 144]
    half = lambda at: b[..., at:at + 2].contiguous().view(torch.float16).float()  # noqa: E731  [.., nb, 1]
    sc, m = k_scales(b[..., 4:16])                                   # [..., N, nb, 8]
    a, z = half(0) * sc.float(), half(2) * m.float()
    qs = b[..., 16:].unflatten(-1, (4, 1, 32))                       # chunk c, byte l
    nib = torch.cat((qs & 15, qs >> 4), -2).flatten(-3, -2).float()  # [..., N, nb, 8, 32]: sub-block 2c + h
    return (a.unsqueeze(-1) * nib - z.unsqueeze(-1)).flatten(-3)


def dequantize(qw: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(qw, torch.Tensor):
        return qw.to(dtype)
    if qw.fmt == "int8":
        return (qw.q.float() * qw.scale.float().unsqueeze(-1)).to(dtype)
    if qw.fmt == "int4g32":
        q = unpack_int4(qw.q).float().unflatten(-1, (-1, 32))       # [..., N, G, 32]
        w = (q - 8.0) * qw.scale.float().unsqueeze(-1) + qw.zero.float().unsqueeze(-1)
        return w.flatten(-2).to(dtype)
    if qw.fmt in INT8G:
        q = qw.q.float().unflatten(-1, (-1, qw.group))              # [..., N, G, group]
        w = q * qw.scale.float().unsqueeze(-1)
        if qw.zero is not None:
            w = w + qw.zero.float().unsqueeze(-1)
        return w.flatten(-2).to(dtype)
    if qw.fmt == "q4_k":
        return _dequantize_q4_k(qw.q).to(dtype)
    if qw.fmt in LUT4_BLOCKS:
        scale, idx = lut4_parts(qw.q, qw.fmt)
        table = torch.tensor(LUT4_VALUES[qw.fmt], dtype=torch.float32, device=idx.device)
        return (scale.unsqueeze(-1) * table[idx.long()]).flatten(-2).to(dtype)
    raise ValueError(f"unknown quantized format {qw.fmt!r}")


def _quantize(w: Weight, fmt: str, chunk: int = 8) -> Weight:
    if fmt == "none" or isinstance(w, QuantizedWeight):
        return w
    if fmt in INT8G:
        fn = lambda t: quantize_int8g(t, INT8G[fmt])  # noqa: E731
    elif fmt in LUT4_BLOCKS:
        fn = lambda t: quantize_lut4(t, fmt)  # noqa: E731
    else:
        fn = {"int8": quantize_int8, "q4_k": quantize_q4_k}.get(fmt, quantize_int4g32)
    return cat([fn(w[i:i + chunk]) for i in range(0, w.shape[0], chunk)])  # bounded fp32 temporaries


def quantize_layer(layer: LayerExperts, fmt: str) -> LayerExperts:
    """Quantize both stacked matrices of a layer ("none" returns it unchanged)."""
    if fmt not in QUANTIZE_FORMATS:
        raise ValueError(f"unknown expert quantization {fmt!r}; choose one of {', '.join(QUANTIZE_FORMATS)}")
    return dataclasses.replace(layer, w13=_quantize(layer.w13, fmt), w2=_quantize(layer.w2, fmt))


# ---- the K-quant block packers (GGUF's layouts; loading/gguf_quants.py writes files with them) ----

def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> uint8 [..., 2] (fp16 bits)."""
    return x.half().unsqueeze(-1).view(torch.uint8)


def scale_of(amax: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-block scale d (rounded to fp16) and its safe reciprocal for `levels` integer steps."""
    d = (amax / levels).half().float()
    return d, torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)


def pack_k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(sc, m) [..., 8] 6-bit -> [..., 12] bytes (inverse of k_scales)."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    return torch.cat((sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                      (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)), -1)


def min_max_k(x: torch.Tensor, qmax: int):
    """Q4_K/Q5_K grid of x [..., nb, 256]: (q [..., nb, 256] d, dmin [..., nb], sc, m [..., nb, 8])."""
    g = x.unflatten(-1, (8, 32))                                   # [..., nb, 8, 32]
    lo = g.amin(-1).clamp(max=0.0)                                 # w = d sc q - dmin m, m >= 0
    step, off = (g.amax(-1) - lo) / qmax, -lo                      # [..., nb, 8]
    d, inv_d = scale_of(step.amax(-1), 63)
    dmin, inv_dmin = scale_of(off.amax(-1), 63)
    sc = torch.round(step * inv_d[..., None]).clamp(0, 63)
    m = torch.round(off * inv_dmin[..., None]).clamp(0, 63)
    a, b = d[..., None] * sc, dmin[..., None] * m                  # [..., nb, 8]
    q = torch.round((g + b[..., None]) / torch.where(a > 0, a, 1.0)[..., None]).clamp(0, qmax)
    return q.to(torch.uint8).flatten(-2), d, dmin, sc, m


def pack_q4_k(x: torch.Tensor) -> torch.Tensor:                  # x [..., nb, 256] -> [..., nb, 144]
    q, d, dmin, sc, m = min_max_k(x, 15)
    c = q.unflatten(-1, (4, 2, 32))                                # chunk, (low, high) sub-block, 32
    qs = (c[..., 0, :] | (c[..., 1, :] << 4)).flatten(-2)
    return torch.cat((fp16_bytes(d), fp16_bytes(dmin), pack_k_scales(sc, m), qs), -1)


# ---- the 4-bit lookup formats (weights.py LUT4: GGUF MXFP4, IQ4_NL, IQ4_XS blocks) ----

def _ggml_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes (byte j: index j low, j + 16 high) -> [..., 32] uint8 indices."""
    return torch.cat((qs & 15, qs >> 4), -1)


def _pack_ggml_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """[..., 32] indices 0..15 -> [..., 16] bytes (inverse of _ggml_nibbles)."""
    idx = idx.to(torch.uint8)
    return idx[..., :16] | (idx[..., 16:] << 4)


def _half_at(b: torch.Tensor, at: int) -> torch.Tensor:
    """fp16 at byte `at` of blocks b [..., nb, bytes] -> fp32 [..., nb]."""
    return b[..., at:at + 2].contiguous().view(torch.float16).float().squeeze(-1)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """e8m0 exponents (uint8) -> 2^(e - 128) fp32, exactly (ggml_e8m0_to_fp32_half; e < 2: subnormals)."""
    e = e.to(torch.int32)
    return torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)


def iq4_xs_ls(b: torch.Tensor) -> torch.Tensor:
    """IQ4_XS blocks [..., nb, 136] -> the 6-bit sub-block scales ls [..., nb, 8] (int32, 0..63)."""
    hi = b[..., 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF       # [..., nb, 1]
    lo = b[..., 4:8].to(torch.int32)                                                # [..., nb, 4]
    i = torch.arange(8, device=b.device)
    return ((lo[..., i // 2] >> (4 * (i % 2))) & 15) | (((hi >> (2 * i)) & 3) << 4)


def lut4_parts(q: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LUT4 bytes [..., N, nb * bytes] -> (scale fp32 [..., N, G], index uint8 [..., N, G, 32]), G = K/32."""
    bw, bb = LUT4_BLOCKS[fmt]
    b = q.unflatten(-1, (-1, bb))                                   # [..., N, nb, bb]
    if fmt == "iq4_xs":
        scale = _half_at(b, 0).unsqueeze(-1) * (iq4_xs_ls(b) - 32).float()        # [..., N, nb, 8]
        idx = _ggml_nibbles(b[..., 8:].unflatten(-1, (8, 16)))                      # [..., N, nb, 8, 32]
        return scale.flatten(-2), idx.flatten(-3, -2)
    scale = e8m0_half(b[..., 0]) if fmt == "mxfp4" else _half_at(b, 0)             # [..., N, nb]
    return scale, _ggml_nibbles(b[..., bb - 16:])


def _nearest(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Index of the table value nearest x / scale: x [..., 32], scale [..., 1] -> [..., 32] (first if tie)."""
    table = torch.tensor(LUT4_VALUES[fmt], dtype=torch.float32, device=x.device)
    return (scale.unsqueeze(-1) * table - x.unsqueeze(-1)).abs().argmin(-1)


def _peak(g: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per 32-group g [..., 32] -> [...]."""
    return g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _pack_mxfp4(g: torch.Tensor) -> torch.Tensor:                   # g [..., nb, 32] -> [..., nb, 17]
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2 + 127, 0.0).clamp(0, 254).to(torch.uint8)
    idx = _nearest(g, e8m0_half(e).unsqueeze(-1), "mxfp4")
    return torch.cat((e.unsqueeze(-1), _pack_ggml_nibbles(idx)), -1)


def _pack_iq4_nl(g: torch.Tensor) -> torch.Tensor:                  # g [..., nb, 32] -> [..., nb, 18]
    d = (_peak(g) / -127.0).half().float()
    return torch.cat((fp16_bytes(d), _pack_ggml_nibbles(_nearest(g, d.unsqueeze(-1), "iq4_nl"))), -1)


def _pack_iq4_xs(g: torch.Tensor) -> torch.Tensor:                  # g [..., nb, 256] -> [..., nb, 136]
    sub = g.unflatten(-1, (8, 32))                                  # [..., nb, 8, 32]
    dsub = _peak(sub) / -127.0                                      # [..., nb, 8]
    d = (_peak(dsub) / -32.0).half().float()                        # [..., nb]
    safe = torch.where(d != 0, d, 1.0).unsqueeze(-1)
    ls = torch.round(dsub / safe).clamp(-32, 31).to(torch.int32) + 32              # [..., nb, 8]
    dl = d.unsqueeze(-1) * (ls - 32).float()
    idx = _nearest(sub, dl.unsqueeze(-1), "iq4_xs")                 # [..., nb, 8, 32]
    scales_l = (ls[..., 0::2] & 15) | ((ls[..., 1::2] & 15) << 4)  # [..., nb, 4]
    scales_h = sum(((ls[..., i] >> 4) & 3) << (2 * i) for i in range(8))          # [..., nb]
    h = torch.stack((scales_h & 0xFF, scales_h >> 8), -1)
    return torch.cat((fp16_bytes(d), h.to(torch.uint8), scales_l.to(torch.uint8),
                      _pack_ggml_nibbles(idx).flatten(-2)), -1)


LUT4_PACKERS = {"mxfp4": _pack_mxfp4, "iq4_nl": _pack_iq4_nl, "iq4_xs": _pack_iq4_xs}


def quantize_lut4(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """w [..., N, K] -> LUT4 weight `fmt` (see the module doc); the GGUF writers' packer for these types."""
    bw = LUT4_BLOCKS[fmt][0]
    if w.shape[-1] % bw:
        raise ValueError(f"{fmt} needs the last dimension to be a multiple of {bw}, got {w.shape[-1]}")
    blocks = LUT4_PACKERS[fmt](w.float().unflatten(-1, (-1, bw)))  # [..., N, K/bw, bytes]
    return QuantizedWeight(fmt, blocks.flatten(-2).contiguous(), None)
