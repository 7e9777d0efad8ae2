"""ExpertStore: host (CPU) copies of every routed expert, stacked per MoE layer.

    store.layers            -> [l, ...] MoE decoder-layer indices
    store.layer(l)          -> LayerExperts(w13 [E, 2I, D], w2 [E, D, I])  (tensors or QuantizedWeight)
    store.num_experts       E;  store.expert_nbytes: bytes of one expert;  store.nbytes: all experts
    store.pin()             page-locks the tensors layer by layer when CUDA exists (no-op on CPU-only torch);
                            on failure keeps pageable memory, records it (`pinned`, `layer_pinned(l)`) and
                            warns once.
    store.quantize(fmt)     -> a new ExpertStore holding QuantizedWeight ("int8" | "int4" = "int4g32"),
                            layer by layer (quant.py)
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from hotexperts.quant import quantize_layer
from hotexperts.weights import LayerExperts, QuantizedWeight, Weight

GiB = 1024 ** 3


def weight_nbytes(w: Weight) -> int:
    return w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()


def pin_weight(w: Weight) -> Weight:
    if isinstance(w, QuantizedWeight):
        s, z = (t.pin_memory() if t is not None else None for t in (w.scale, w.zero))   # q4_k: no scale
        return QuantizedWeight(w.fmt, w.q.pin_memory(), s, z)
    return w.pin_memory()


class ExpertStore:
    def __init__(self, layers: dict[int, LayerExperts]):
        if not layers:
            raise ValueError("ExpertStore needs at least one MoE layer")
        self._layers = dict(sorted(layers.items()))
        self._pinned = {l: False for l in self._layers}
        counts = {le.num_experts for le in self._layers.values()}
        if len(counts) != 1:
            raise ValueError(f"every MoE layer must hold the same number of experts, got {sorted(counts)}")

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    def layer(self, l: int) -> LayerExperts:
        return self._layers[l]

    def __getitem__(self, l: int) -> LayerExperts:
        return self._layers[l]

    @property
    def num_experts(self) -> int:
        return next(iter(self._layers.values())).num_experts

    @property
    def expert_nbytes(self) -> int:
        return next(iter(self._layers.values())).expert_nbytes

    @property
    def nbytes(self) -> int:
        return sum(weight_nbytes(le.w13) + weight_nbytes(le.w2) for le in self._layers.values())

    @property
    def pinned(self) -> bool:
        """True when every layer lives in page-locked memory."""
        return all(self._pinned.values())

    def layer_pinned(self, l: int) -> bool:
        return self._pinned[l]

    def pin(self) -> ExpertStore:
        """Page-lock layer by layer; a no-op without CUDA. Returns self."""
        if not torch.cuda.is_available():
            return self
        done = 0
        for l, le in self._layers.items():
            if self._pinned[l]:
                continue
            try:
                self._layers[l] = dataclasses.replace(le, w13=pin_weight(le.w13), w2=pin_weight(le.w2))
            except RuntimeError:
                warnings.warn(f"pinning failed after {done / GiB:.1f} GiB; copies will be staged through a "
                              "pinned buffer", RuntimeWarning, stacklevel=2)
                return self
            self._pinned[l] = True
            done += weight_nbytes(le.w13) + weight_nbytes(le.w2)
        return self

    def quantize(self, fmt: str) -> ExpertStore:
        """A new store with every expert matrix quantized to `fmt` ("int8" | "int4" | "int4g32" | "none")."""
        return ExpertStore({l: quantize_layer(le, fmt) for l, le in self._layers.items()})

    def __repr__(self) -> str:
        return (f"ExpertStore(layers={len(self._layers)}, experts={self.num_experts}, "
                f"{self.nbytes / GiB:.2f} GiB, pinned={self.pinned})")
