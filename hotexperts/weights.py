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
  Q4_K maps onto q4_k as is; Q4_0/Q4_1 (and Q4_K beside them) map exactly onto int4g32; Q8_0, Q5_0 (G 32,
  no zero), Q5_1, Q5_K (G 32, zero) and Q6_K (G 16, no zero) exactly onto int8gG, and so does int4g32 (q - 8,
  same scale and zero), so a matrix whose layers mix Q4_K and Q6_K (llama.cpp's Q4_K_M) is int8g16 in every
  layer (loading/gguf_quants.py).
cat(ws, dim) concatenates weights of one format (tensors, or QuantizedWeight part by part; None stays None).

Activation variants (ExpertAct, the one compute here: every expert path's torch form and the oracle's):
    "silu"        h = silu(g) * u                                            (every family but GPT-OSS)
    "swiglu_oai"  g' = min(g, limit), u' = clamp(u, -limit, limit), h = (u' + 1) * g' * sigmoid(alpha g')
                  (GPT-OSS: limit 7.0, alpha 1.702; transformers' GptOssExperts._apply_gate)
with g, u = split(w13 @ x + b13): LayerExperts.b13 [E, 2I] (gate then up, as w13's rows) is the optional
gate/up bias. A down-projection bias is not here: it is an expert-id-indexed table the model adds itself
(models/transformer.py MoEBlock.down_bias), so no expert path carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Q4K_BLOCK, Q4K_BYTES = 256, 144          # q4_k: weights and bytes per block


@dataclass
class QuantizedWeight:
    fmt: str                      # "int8" | "int4g32" | "int8g32" | "int8g16" | "q4_k"
    q: torch.Tensor
    scale: torch.Tensor | None    # None for q4_k (its scales live in its blocks)
    zero: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (dequantized) shape."""
        if self.fmt == "int4g32":
            return (*self.q.shape[:-1], self.q.shape[-1] * 2)
        if self.fmt == "q4_k":
            return (*self.q.shape[:-1], self.q.shape[-1] // Q4K_BYTES * Q4K_BLOCK)
        return tuple(self.q.shape)

    @property
    def group(self) -> int:
        """Columns per scale: 32 (int4g32), G (int8gG), the whole row (int8); q4_k: its block, 256 (a row's
        length is a multiple of it; each block holds 8 sub-block scales of 32 columns)."""
        if self.fmt == "int8":
            return self.q.shape[-1]
        if self.fmt == "q4_k":
            return Q4K_BLOCK
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


ACT_KINDS = ("silu", "swiglu_oai")


@dataclass(frozen=True)
class ExpertAct:
    """The experts' activation (see the module doc); alpha and limit are read by "swiglu_oai" only."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        if self.kind not in ACT_KINDS:
            raise ValueError(f"unknown expert activation {self.kind!r}; known: {', '.join(ACT_KINDS)}")

    @property
    def plain(self) -> bool:
        return self.kind == "silu"

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up [..., I] -> h [..., I] in their dtype."""
        if self.kind == "silu":
            return F.silu(gate) * up
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
