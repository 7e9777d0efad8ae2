"""Expert weight containers (no compute): dense stacked tensors or quantized ones.

One MoE layer's experts are stored stacked, E experts first:
    w13  [E, 2I, D]  gate_proj rows (first I) then up_proj rows (last I)   (Mixtral: w1 then w3)
    w2   [E, D, I]   down_proj                                              (Mixtral: w2)
An expert y = w2 @ (silu(w13[:I] @ x) * (w13[I:] @ x)).

A weight is either a plain tensor (bf16/fp16/fp32) or a QuantizedWeight:
    fmt "int8":    q int8 [..., N, Kin],           scale [..., N]            w = q * scale
    fmt "int4g32": q uint8 [..., N, Kin/2] (two 4-bit values per byte, low nibble = even column),
                   scale [..., N, Kin/32], zero [..., N, Kin/32]             w = (q - 8) * scale + zero
    fmt "int8g32" / "int8g16": q int8 [..., N, Kin], scale [..., N, Kin/G], zero [..., N, Kin/G] or None
                   (G = 32 / 16 columns per group)                          w = q * scale (+ zero)
    fmt "q4_k":    q uint8 [..., N, Kin/256 * 144]: each row is Kin/256 GGUF Q4_K blocks as in the file,
                   scale = zero = None. Block (144 bytes, 256 weights): d fp16 @0, dmin fp16 @2, 12 bytes @4
                   of 6-bit (sc, m) for 8 sub-blocks of 32 (llama.cpp get_scale_min_k4), 128 bytes @16 of
                   nibbles: 4 chunks of 32 bytes, chunk c's low nibbles = sub-block 2c, high = 2c + 1
                   (byte l of the chunk: weight l of each).       w = d * sc[j] * q - dmin * m[j]
                   4.5 bits per weight; Kin must be a multiple of 256.
    4-bit lookup formats (LUT4: "mxfp4", "iq4_nl", "iq4_xs"): q uint8 [..., N, Kin/B * bytes], each row the
                   GGUF blocks as in the file, scale = zero = None. Every 32-group is 16 bytes of 4-bit
                   indices (byte j: column j in the low nibble, column j + 16 in the high one) into a
                   16-entry int8 table (LUT4_VALUES) times one fp32 scale per 32-group:
                                                                       w = scale_g * table[index]
                   "mxfp4"  (B 32, 17 bytes): e8m0 e @0, indices @1; table = e2m1 doubled (0, 1, 2, 3, 4, 6,
                            8, 12, then negated), scale = 2^(e - 128) (the halving folded in).  4.25 bits
                   "iq4_nl" (B 32, 18 bytes): d fp16 @0, indices @2; table kvalues_iq4nl, scale = d. 4.5 bits
                   "iq4_xs" (B 256, 136 bytes): d fp16 @0, scales_h u16 @2, scales_l 4 bytes @4 (6-bit ls per
                            32-group ib: low 4 bits = nibble ib % 2 of scales_l[ib / 2], high 2 = bits 2 ib of
                            scales_h), indices @8 (16 bytes per 32-group); table kvalues_iq4nl,
                            scale = d * (ls - 32) (fp32, exact), w = scale * table (one rounding). 4.25 bits
  Q4_K maps onto q4_k as is; Q4_0/Q4_1 (and Q4_K beside them) map exactly onto int4g32; Q8_0, Q5_0 (G 32,
  no zero), Q5_1, Q5_K (G 32, zero) and Q6_K (G 16, no zero) exactly onto int8gG, and so does int4g32 (q - 8,
  same scale and zero), so a matrix whose layers mix Q4_K and Q6_K (llama.cpp's Q4_K_M) is int8g16 in every
  layer (loading/gguf_quants.py).
cat(ws, dim) concatenates weights of one format (tensors, or QuantizedWeight part by part; None stays None).

Activation variants (ExpertAct, the one compute here: every expert path's torch form and the oracle's;
ACT_CODES numbers them for the native and Triton kernels; the issue's names silu_glu / clamped_swiglu /
gelu_tanh_glu are accepted as aliases):
    "silu"        h = silu(g) * u                                            (every family but GPT-OSS)
    "swiglu_oai"  g' = min(g, limit), u' = clamp(u, -limit, limit), h = (u' + 1) * g' * sigmoid(alpha g')
                  (GPT-OSS: limit 7.0, alpha 1.702; transformers' GptOssExperts._apply_gate)
    "gelu_tanh"   h = gelu_tanh(g) * u, gelu_tanh(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
                  (GeGLU experts with the tanh approximation, as later architectures use)
with g, u = split(w13 @ x + b13): LayerExperts.b13 [E, 2I] (gate then up, as w13's rows) is the optional
gate/up bias. A down-projection bias is not here: it is an expert-id-indexed table the model adds itself
(models/transformer.py MoEBlock.down_bias), so no expert path carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hotexperts.formats import LUT4_BLOCKS, Q4K_BLOCK, Q4K_BYTES

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)      # e2m1 values, doubled
LUT4_VALUES = {"mxfp4": MXFP4_VALUES, "iq4_nl": KVALUES_IQ4NL, "iq4_xs": KVALUES_IQ4NL}


@dataclass
class QuantizedWeight:
    fmt: str                      # "int8" | "int4g32" | "int8g32" | "int8g16" | "q4_k" | LUT4 ("mxfp4", ...)
    q: torch.Tensor
    scale: torch.Tensor | None    # None for q4_k and LUT4 (their scales live in their blocks)
    zero: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (dequantized) shape."""
        if self.fmt == "int4g32":
            return (*self.q.shape[:-1], self.q.shape[-1] * 2)
        if self.fmt == "q4_k":
            return (*self.q.shape[:-1], self.q.shape[-1] // Q4K_BYTES * Q4K_BLOCK)
        if self.fmt in LUT4_BLOCKS:
            bw, bb = LUT4_BLOCKS[self.fmt]
            return (*self.q.shape[:-1], self.q.shape[-1] // bb * bw)
        return tuple(self.q.shape)

    @property
    def group(self) -> int:
        """Columns per scale: 32 (int4g32), G (int8gG), the whole row (int8); q4_k: its block, 256 (a row's
        length is a multiple of it; each block holds 8 sub-block scales of 32 columns); LUT4: its block (32,
        or 256 for iq4_xs, whose blocks hold 8 sub-block scales of 32 columns)."""
        if self.fmt == "int8":
            return self.q.shape[-1]
        if self.fmt == "q4_k":
            return Q4K_BLOCK
        if self.fmt in LUT4_BLOCKS:
            return LUT4_BLOCKS[self.fmt][0]
        return 32 if self.fmt == "int4g32" else int(self.fmt[5:])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero) if t is not None)

    def __getitem__(self, idx) -> QuantizedWeight:
        """Index the leading (expert) dimensions: w[e] or w[ids]."""
        def take(t):
            return None if t is None else t[idx]

        return QuantizedWeight(self.fmt, self.q[idx], take(self.scale), take(self.zero))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedWeight:
        """Move to a device; scales and zeros keep their dtype."""
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return QuantizedWeight(self.fmt, mv(self.q), mv(self.scale), mv(self.zero))


Weight = torch.Tensor | QuantizedWeight


def cat(ws: list[Weight], dim: int = 0) -> Weight:
    """Concatenate weights of one format along `dim` (0: experts; 1: rows, e.g. gate then up)."""
    if not isinstance(ws[0], QuantizedWeight):
        return torch.cat(ws, dim)

    def part(name):
        ts = [getattr(w, name) for w in ws]
        return None if ts[0] is None else torch.cat(ts, dim)

    return QuantizedWeight(ws[0].fmt, part("q"), part("scale"), part("zero"))


ACT_KINDS = ("silu", "swiglu_oai", "gelu_tanh")
ACT_CODES = {k: i for i, k in enumerate(ACT_KINDS)}           # the kernels' activation enum
ACT_ALIASES = {"silu_glu": "silu", "clamped_swiglu": "swiglu_oai", "gelu_tanh_glu": "gelu_tanh"}


@dataclass(frozen=True)
class ExpertAct:
    """The experts' activation (see the module doc); alpha and limit are read by "swiglu_oai" only."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        object.__setattr__(self, "kind", ACT_ALIASES.get(self.kind, self.kind))
        if self.kind not in ACT_KINDS:
            raise ValueError(f"unknown expert activation {self.kind!r}; known: {', '.join(ACT_KINDS)}")

    @property
    def plain(self) -> bool:
        return self.kind == "silu"

    @property
    def code(self) -> int:
        """The kernels' number for this activation (ACT_CODES)."""
        return ACT_CODES[self.kind]

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up [..., I] -> h [..., I] in their dtype."""
        if self.kind == "silu":
            return F.silu(gate) * up
        if self.kind == "gelu_tanh":
            return F.gelu(gate, approximate="tanh") * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SILU = ExpertAct()


@dataclass
class LayerExperts:
    """All routed experts of one MoE layer, stacked on the leading dimension."""

    w13: Weight   # [E, 2I, D]
    w2: Weight    # [E, D, I]
    b13: torch.Tensor | None = None                  # [E, 2I] gate/up bias (GPT-OSS), float; None = none
    act: ExpertAct = field(default=SILU)

    @property
    def plain(self) -> bool:
        """silu(g) * u without biases: the form every native kernel computes."""
        return self.act.plain and self.b13 is None

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def expert_nbytes(self) -> int:
        def nb(w: Weight) -> int:
            return w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()

        return (nb(self.w13) + nb(self.w2)) // self.num_experts
