"""GGML block formats <-> our weights: Q4_K as is (q4_k), exact int4g32 (Q4_0/Q4_1, and Q4_K beside them) and
int8gG (Q8_0, Q5_*, Q6_K, and the Q4 types when a matrix mixes them with those), dequantization for the rest.

A GGUF matrix [..., N, K] is stored row by row, each row K/bs blocks of `bs` weights (32 or 256), as bytes
`raw` uint8 [..., N, K/bs * block_bytes] (gguf's ReaderTensor.data for block types).

    to_q4_k(raw)                    -> QuantizedWeight "q4_k": the Q4_K bytes [..., N, K/256 * 144] (a view)
    LUT4_TYPES, native_format(types) -> the LUT4 format ("mxfp4", "iq4_nl", "iq4_xs") a matrix whose layers
                                       are all of one of those types keeps, else None
    to_lut4(raw, qtype)             -> QuantizedWeight of that format: the file's blocks (a view), native size
    FAST_TYPES                      ggml types that map exactly onto int4g32 (experts stay 4-bit)
    to_int4g32(raw, qtype, scale_dtype=float16) -> QuantizedWeight "int4g32" (w = (q - 8) * scale + zero)
    INT8_TYPES, int8_spec(types) -> (group, zero?) of the int8gG format a set of types maps onto, or None
    to_int8g(raw, qtype, group, zero, scale_dtype=float16) -> QuantizedWeight "int8gG" (w = q * scale + zero)
    dequantize(raw, qtype, shape, name) -> float32 tensor [..., N, K]   (SUPPORTED: what gguf.quants reads)
    check_supported(qtype, name)    one ModelLoadError naming the tensor for other types (I32, Q8_K, ...)
    quantize(w[..., N, K] float32, qtype) -> raw uint8 [..., N, bytes]  (writers; Q4_K/Q5_K/Q6_K and
                                       MXFP4/IQ4_NL/IQ4_XS packed here, quant.quantize_lut4)

Exact mapping: every GGML 4-bit block of 32 is w = a * q + b with q in 0..15:
    Q4_0  (18 B / 32):  d fp16, 16 B nibbles                      a = d,       b = -8 d
    Q4_1  (20 B / 32):  d, m fp16, 16 B nibbles                   a = d,       b = m
    Q4_K  (144 B / 256): d, dmin fp16, 12 B 6-bit (sc, m) x 8, 128 B nibbles    a = d sc, b = -dmin m
In a GGML block, byte j holds element j (low nibble) and element j + 16 (high nibble); Q4_K's 128 bytes are
4 chunks of 32 bytes, each low nibbles = sub-block 2c, high nibbles = sub-block 2c + 1.
The 5/6/8-bit blocks are w = a * q + b with integer q that fits int8 (int8gG keeps q, a and b):
    Q8_0  (34 B / 32):  d fp16, 32 int8                            a = d,       b = 0,   q in -128..127
    Q5_0  (22 B / 32):  d, qh (bit j: 5th bit of weight j), nibbles  a = d,     b = 0,   q - 16 in -16..15
    Q5_1  (24 B / 32):  d, m, qh, nibbles                          a = d,       b = m,   q in 0..31
    Q5_K  (176 B / 256): d, dmin, 12 B (sc, m) x 8, qh 32 B (bit j of byte l: sub-block j, weight l),
                         128 B nibbles as Q4_K                     a = d sc,    b = -dmin m  (groups of 32)
    Q6_K  (210 B / 256): ql 128 B, qh 64 B, 16 int8 scales, d      a = d sc,    b = 0,   q - 32 in -32..31,
                         groups of 16; per 128-weight half: ql[l] low/high nibble = weights l / l + 64,
                         ql[l + 32] = l + 32 / l + 96, qh[l] bits 2k..2k+1 = 5th-6th bit of weight l + 32 k
    IQ4_NL (18 B / 32): d, nibbles as Q4_0 (non-linear: q = KVALUES[nibble])   a = d,    b = 0
    IQ4_XS (136 B / 256): d, scales_h u16, scales_l 4 B (6-bit ls per 32: low 4 bits, then 2 high bits),
                         128 B nibbles (16 B per 32: low nibbles = first 16)  a = d (ls - 32), b = 0
    MXFP4 (17 B / 32):  e8m0 exponent e, nibbles (e2m1 doubled: q = MXFP4_VALUES[nibble])
                                                                       a = 2^(e - 128), b = 0 (bf16: exact)
a and b are computed in float32 (exact: fp16 x 6-bit ints) and stored as scale = a, zero = b + 8 a in
`scale_dtype`: float16 by default (Q4_0 stays bit-exact; Q4_1/Q4_K round scale/zero to 11 bits, a relative
error of 2^-11 of the group's range, below bf16 activation rounding), float32 for bit-tight equality.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from hotexperts.errors import ModelLoadError
from hotexperts.quant import (
    LUT4_PACKERS,
    fp16_bytes,
    int8g_from_int4g32,
    k_scales,
    min_max_k,
    pack_k_scales,
    pack_q4_k,
    scale_of,
)
from hotexperts.weights import KVALUES_IQ4NL, LUT4_BLOCKS, MXFP4_VALUES, Q4K_BYTES, QuantizedWeight

Q = GGMLQuantizationType
FAST_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
SUPPORTED = (*FLOAT_TYPES, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
             Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS,
             Q.TQ1_0, Q.TQ2_0, Q.MXFP4)         # all but FLOAT_TYPES go through gguf.quants.dequantize


def block_bytes(qtype: Q) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


def _tensor(raw: np.ndarray) -> torch.Tensor:
    """A torch view of (read-only, memory-mapped) numpy data; callers only read it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # "non-writable array": we never write to it
        return torch.from_numpy(raw)


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    """fp16 at byte offset `at` of each block b [..., nb, bytes] -> float32 [..., nb, 1]."""
    return b[..., at:at + 2].contiguous().view(torch.float16).float()


def _repack(qs: torch.Tensor, group: int) -> torch.Tensor:
    """GGML nibbles -> ours. qs [..., n*group/2] bytes; in each group of `group` weights (group/2 bytes)
    byte j holds weights j (low) and j + group/2 (high); ours: byte m holds weights 2m (low), 2m+1 (high)."""
    v = qs.view(torch.int16).unflatten(-1, (-1, group // 4))       # [..., n, group/4]: even | odd << 8
    first = (v & 0x0F) | ((v >> 4) & 0xF0)                         # weights 0 .. group/2 - 1
    second = ((v >> 4) & 0x0F) | ((v >> 8) & 0xF0)                 # weights group/2 .. group - 1
    return torch.cat((first, second), -1).to(torch.uint8).flatten(-2)


def _affine_q4_0(b):                     # b [..., nb, 18] -> packed [..., nb, 16], a, b [..., nb, 1]
    d = _half(b, 0)
    return _repack(b[..., 2:18], 32), d, -8.0 * d


def _affine_q4_1(b):                               # b [..., nb, 20]
    return _repack(b[..., 4:20], 32), _half(b, 0), _half(b, 2)


def _affine_q4_k(b):                     # b [..., nb, 144] -> packed [..., nb, 128], a, b [..., nb, 8]
    sc, m = k_scales(b[..., 4:16])
    return _repack(b[..., 16:144], 64), _half(b, 0) * sc.float(), -(_half(b, 2) * m.float())


_AFFINE = {Q.Q4_0: _affine_q4_0, Q.Q4_1: _affine_q4_1, Q.Q4_K: _affine_q4_k}


def to_q4_k(raw: np.ndarray) -> QuantizedWeight:
    """A Q4_K matrix raw [..., N, K/256 * 144] as our "q4_k" weight: the file's bytes, no conversion. The
    tensor is a view of `raw` (e.g. of the memory map): concatenate or clone it before keeping it."""
    if raw.dtype != np.uint8 or raw.shape[-1] % Q4K_BYTES:
        raise ModelLoadError(f"Q4_K data must be uint8 rows of 144-byte blocks, got {raw.dtype} {raw.shape}")
    return QuantizedWeight("q4_k", _tensor(raw), None)


LUT4_TYPES = {Q.MXFP4: "mxfp4", Q.IQ4_NL: "iq4_nl", Q.IQ4_XS: "iq4_xs"}   # kept at native size


def native_format(types) -> str | None:
    """The LUT4 format a matrix keeps when every layer's tensors are one LUT4 type, else None."""
    types = set(types)
    return LUT4_TYPES.get(next(iter(types))) if len(types) == 1 else None


def to_lut4(raw: np.ndarray, qtype: Q) -> QuantizedWeight:
    """An MXFP4 / IQ4_NL / IQ4_XS matrix raw [..., N, K/B * bytes] as our LUT4 weight: the file's blocks, no
    conversion (a view of `raw`: concatenate or clone it before keeping it)."""
    fmt = LUT4_TYPES.get(qtype)
    if fmt is None:
        names = ", ".join(t.name for t in LUT4_TYPES)
        raise ModelLoadError(f"{qtype.name} is not a 4-bit lookup type ({names})")
    bb = LUT4_BLOCKS[fmt][1]
    if raw.dtype != np.uint8 or raw.shape[-1] % bb:
        raise ModelLoadError(f"{qtype.name} data must be uint8 rows of {bb}-byte blocks, got {raw.dtype} "
                             f"{raw.shape}")
    return QuantizedWeight(fmt, _tensor(raw), None)


def to_int4g32(raw: np.ndarray, qtype: Q, scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Exact int4g32 of a Q4_0/Q4_1/Q4_K matrix raw [..., N, bytes]: byte-level repacking with torch ops
    (vectorised, multi-threaded; no loop over blocks and no unpacked one-value-per-byte temporary)."""
    if qtype not in _AFFINE:
        raise ModelLoadError(f"{qtype.name} does not map onto int4g32")
    bs = block_bytes(qtype)[1]
    blocks = _tensor(raw).unflatten(-1, (-1, bs))                  # [..., N, nb, bs]
    q, a, b = _AFFINE[qtype](blocks)                    # q [..., N, nb, bytes]; a, b [..., N, nb, g]
    scale = a.flatten(-2)                                          # [..., N, K/32] float32
    zero = (b.flatten(-2) + 8.0 * scale).to(scale_dtype)
    return QuantizedWeight("int4g32", q.flatten(-2), scale.to(scale_dtype), zero)


INT8_TYPES = {Q.Q8_0: (32, False), Q.Q5_0: (32, False), Q.Q5_1: (32, True), Q.Q5_K: (32, True),
              Q.Q6_K: (16, False), Q.IQ4_NL: (32, False), Q.IQ4_XS: (32, False), Q.MXFP4: (32, False)}
KVALUES = KVALUES_IQ4NL                                                              # IQ4_NL / IQ4_XS
_Q4_AS_INT8 = {Q.Q4_0: (32, True), Q.Q4_1: (32, True), Q.Q4_K: (32, True)}   # through int4g32 (zero = b + 8a)


def int8_spec(types) -> tuple[int, bool] | None:
    """The int8gG format (group, with zero?) every type in `types` maps onto exactly, or None."""
    specs = [INT8_TYPES.get(t) or _Q4_AS_INT8.get(t) for t in types]
    if not specs or any(sp is None for sp in specs):
        return None
    return min(g for g, _ in specs), any(z for _, z in specs)


def _bits(b: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """n little-endian bits from byte offset `at` of each block b [..., nb, bytes] -> [..., nb, n] 0/1."""
    by = b[..., at:at + n // 8].to(torch.int16)                    # [..., nb, n/8]
    return ((by.unsqueeze(-1) >> torch.arange(8, dtype=torch.int16)) & 1).flatten(-2)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """GGML nibbles [..., 16 m] (byte j: weight j low, j + 16 m high) -> [..., 32 m] int16 values 0..15."""
    qs = qs.to(torch.int16)
    return torch.cat((qs & 15, qs >> 4), -1)


def _int8_q8_0(b):                        # b [..., nb, 34] -> q [..., nb, 32], a [..., nb, 1], b None
    return b[..., 2:34].contiguous().view(torch.int8).to(torch.int16), _half(b, 0), None


def _int8_q5_0(b):                        # b [..., nb, 22]
    return (_nibbles(b[..., 6:22]) | (_bits(b, 2, 32) << 4)) - 16, _half(b, 0), None


def _int8_q5_1(b):                        # b [..., nb, 24]
    return _nibbles(b[..., 8:24]) | (_bits(b, 4, 32) << 4), _half(b, 0), _half(b, 2)


def _int8_q5_k(b):                        # b [..., nb, 176] -> q [..., nb, 256], a, b [..., nb, 8]
    sc, m = k_scales(b[..., 4:16])
    qs = b[..., 48:176].to(torch.int16).unflatten(-1, (4, 32))     # chunk c: sub-blocks 2c (low), 2c+1 (high)
    low = torch.stack((qs & 15, qs >> 4), -2).flatten(-3, -2)      # [..., nb, 8, 32]
    qh = b[..., 16:48].to(torch.int16).unsqueeze(-2)               # [..., nb, 1, 32]
    high = (qh >> torch.arange(8, dtype=torch.int16)[:, None]) & 1  # [..., nb, 8, 32]
    return (low | (high << 4)).flatten(-2), _half(b, 0) * sc.float(), -(_half(b, 2) * m.float())


def _int8_q6_k(b):                        # b [..., nb, 210] -> q [..., nb, 256], a [..., nb, 16]
    ql = b[..., 0:128].to(torch.int16).unflatten(-1, (2, 2, 32))   # half, (l | l + 32), l
    qh = b[..., 128:192].to(torch.int16).unflatten(-1, (2, 32))    # half, l
    lo = torch.cat((ql & 15, ql >> 4), -2)                         # [..., 2, 4, 32]: quarters 0, 1, 2, 3
    hi = (qh.unsqueeze(-2) >> (2 * torch.arange(4, dtype=torch.int16))[:, None]) & 3
    q = (lo | (hi << 4)) - 32
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    return q.flatten(-3), _half(b, 208) * sc, None


def _lut(nib: torch.Tensor, values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int16)[nib.long()]


def _int8_iq4_nl(b):                      # b [..., nb, 18]
    return _lut(_nibbles(b[..., 2:18]), KVALUES), _half(b, 0), None


def _int8_iq4_xs(b):                      # b [..., nb, 136] -> q [..., nb, 256], a [..., nb, 8]
    hi = b[..., 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF          # [..., nb, 1]
    lo = b[..., 4:8].to(torch.int32)                                                  # [..., nb, 4]
    i = torch.arange(8)
    ls = ((lo[..., i // 2] >> (4 * (i % 2))) & 15) | (((hi >> (2 * i)) & 3) << 4)    # [..., nb, 8]
    q = _nibbles(b[..., 8:136].unflatten(-1, (8, 16))).flatten(-2)                   # [..., nb, 256]
    return _lut(q, KVALUES), _half(b, 0) * (ls - 32).float(), None


def _int8_mxfp4(b):                       # b [..., nb, 17]
    e = b[..., 0:1].to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)                        # e8m0 / 2, as fp32 bits
    return _lut(_nibbles(b[..., 1:17]), MXFP4_VALUES), bits.view(torch.float32), None


_INT8 = {Q.Q8_0: _int8_q8_0, Q.Q5_0: _int8_q5_0, Q.Q5_1: _int8_q5_1, Q.Q5_K: _int8_q5_k, Q.Q6_K: _int8_q6_k,
         Q.IQ4_NL: _int8_iq4_nl, Q.IQ4_XS: _int8_iq4_xs, Q.MXFP4: _int8_mxfp4}


def to_int8g(raw: np.ndarray, qtype: Q, group: int, zero: bool,
             scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Exact int8gG (G = group, 16 or 32) of a matrix raw [..., N, bytes] of a type int8_spec accepts; a
    type with 32-groups repeats its scales for G = 16; zero=True stores a zero (0 where the type has none)."""
    if qtype in _Q4_AS_INT8:
        return int8g_from_int4g32(to_int4g32(raw, qtype, scale_dtype), group)
    if qtype not in _INT8 or INT8_TYPES[qtype][0] < group:
        raise ModelLoadError(f"{qtype.name} does not map onto int8g{group}")
    blocks = _tensor(raw).unflatten(-1, (-1, block_bytes(qtype)[1]))   # [..., N, nb, bytes]
    q, a, b = _INT8[qtype](blocks)
    rep = INT8_TYPES[qtype][0] // group
    scale = a.flatten(-2).repeat_interleave(rep, -1)                 # [..., N, K/group] float32
    if zero:
        b = torch.zeros_like(a) if b is None else b.expand_as(a)
        b = b.flatten(-2).repeat_interleave(rep, -1).to(scale_dtype)
    else:
        b = None
    return QuantizedWeight(f"int8g{group}", q.flatten(-2).to(torch.int8), scale.to(scale_dtype), b)


def check_supported(qtype: Q, name: str = "tensor") -> None:
    """One clear ModelLoadError for a type we cannot read (integer tensors, Q8_1/Q8_K, ...)."""
    if qtype not in SUPPORTED:
        raise ModelLoadError(f"{name} has GGUF type {qtype.name}, which is not supported; supported: "
                             + ", ".join(t.name for t in SUPPORTED))


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """float32 tensor of `shape` from a GGUF tensor's data (block bytes or a float array)."""
    check_supported(qtype, name)
    if qtype in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(raw, dtype=np.float32).reshape(shape))     # a copy: raw is read-only
    if qtype == Q.BF16:      # gguf's reader hands BF16 as raw bytes
        u16 = np.ascontiguousarray(raw).view(np.uint16).reshape(shape)
        return torch.from_numpy(u16.astype(np.int32) << 16).view(torch.float32)
    try:
        w = quants.dequantize(np.ascontiguousarray(raw), qtype)
    except NotImplementedError as e:
        raise ModelLoadError(f"{name}: GGUF type {qtype.name} cannot be dequantized (gguf package)") from e
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(shape))


# ---- packers (writers and tests), torch ops ----

def quantize(w: np.ndarray | torch.Tensor, qtype: Q) -> np.ndarray:
    """float [..., N, K] -> block bytes [..., N, K/bs * block_bytes] (or a float array for F32/F16).
    Our packers run where w lives (a CUDA tensor packs on the GPU); gguf's run in numpy."""
    if qtype in _PACKERS:
        x = torch.as_tensor(w).float()
        blocks = _PACKERS[qtype](x.unflatten(-1, (-1, block_bytes(qtype)[0])))   # [..., N, nb, block_bytes]
        return blocks.flatten(-2).cpu().numpy()
    return quants.quantize(np.ascontiguousarray(torch.as_tensor(w).float().cpu().numpy()), qtype)


def _pack_q5_k(x: torch.Tensor) -> torch.Tensor:                  # x [..., nb, 256] -> [..., nb, 176]
    q, d, dmin, sc, m = min_max_k(x, 31)
    c = q.unflatten(-1, (4, 2, 32))                                # chunk c, sub-block 2c + h, l
    qs = ((c[..., 0, :] & 15) | ((c[..., 1, :] & 15) << 4)).flatten(-2)
    bits = (c >> 4).flatten(-3, -2)                                # [..., nb, 8, 32]: high bit of sub-block j
    qh = sum(bits[..., j, :] << j for j in range(8)).to(torch.uint8)   # [..., nb, 32], bit j = sub-block j
    return torch.cat((fp16_bytes(d), fp16_bytes(dmin), pack_k_scales(sc, m), qh, qs), -1)


def _pack_q6_k(x: torch.Tensor) -> torch.Tensor:                  # x [..., nb, 256] -> [..., nb, 210]
    g = x.unflatten(-1, (16, 16))                                  # 16 groups of 16 (symmetric)
    step = g.abs().amax(-1) / 31.0                                 # [..., nb, 16]
    d, inv_d = scale_of(step.amax(-1), 127)
    sc = torch.round(step * inv_d[..., None]).clamp(0, 127)       # int8 scales >= 0
    a = d[..., None] * sc
    q = torch.round(g / torch.where(a > 0, a, 1.0)[..., None]).clamp(-32, 31) + 32
    q = q.to(torch.uint8).reshape(*x.shape[:-1], 2, 4, 32)         # half h, quarter k, l
    ql = torch.cat(((q[..., 0, :] & 15) | ((q[..., 2, :] & 15) << 4),
                    (q[..., 1, :] & 15) | ((q[..., 3, :] & 15) << 4)), -1)          # [..., 2, 64]
    qh = sum((q[..., k, :] >> 4) << (2 * k) for k in range(4)).to(torch.uint8)     # [..., 2, 32]
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat((ql.flatten(-2), qh.flatten(-2), scales, fp16_bytes(d)), -1)


_PACKERS = {Q.Q4_K: pack_q4_k, Q.Q5_K: _pack_q5_k, Q.Q6_K: _pack_q6_k,
            **{t: LUT4_PACKERS[f] for t, f in LUT4_TYPES.items()}}
