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
  Q4_0/Q4_1/Q4_K map exactly onto int4g32; Q8_0, Q5_0 (G 32, no zero), Q5_1, Q5_K (G 32, zero) and Q6_K
  (G 16, no zero) exactly onto int8gG, and so does int4g32 (q - 8, same scale and zero), so a matrix whose
  layers mix Q4_K and Q6_K (llama.cpp's Q4_K_M) is int8g16 in every layer (loading/gguf_quants.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    fmt: str                      # "int8" | "int4g32" | "int8g32" | "int8g16"
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (dequantized) shape."""
        if self.fmt == "int4g32":
            return (*self.q.shape[:-1], self.q.shape[-1] * 2)
        return tuple(self.q.shape)

    @property
    def group(self) -> int:
        """Columns per scale: 32 (int4g32), G (int8gG), the whole row (int8)."""
        if self.fmt == "int8":
            return self.q.shape[-1]
        return 32 if self.fmt == "int4g32" else int(self.fmt[5:])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero) if t is not None)

    def __getitem__(self, idx) -> QuantizedWeight:
        """Index the leading (expert) dimensions: w[e] or w[ids]."""
        z = self.zero[idx] if self.zero is not None else None
        return QuantizedWeight(self.fmt, self.q[idx], self.scale[idx], z)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedWeight:
        """Move to a device; scales and zeros keep their dtype."""
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return QuantizedWeight(self.fmt, mv(self.q), mv(self.scale), mv(self.zero))


Weight = torch.Tensor | QuantizedWeight


@dataclass
class LayerExperts:
    """All routed experts of one MoE layer, stacked on the leading dimension."""

    w13: Weight   # [E, 2I, D]
    w2: Weight    # [E, D, I]

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def expert_nbytes(self) -> int:
        def nb(w: Weight) -> int:
            return w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()

        return (nb(self.w13) + nb(self.w2)) // self.num_experts
