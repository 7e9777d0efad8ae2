"""GpuExecutor: every routed expert resident on one device, computed by the fused `gpu_moe` kernel.

The `--experts gpu` placement (the speed reference). Each MoE layer's stacked experts (w13 [E,2I,D],
w2 [E,D,I], dense or QuantizedWeight) are moved to the device once; a call is one fused launch per matrix
over the routed experts, read in place (slot_of = None: expert id == slot). On CUDA with Triton there is no
host synchronisation, so the engine captures the decode step in a CUDA graph (`graph_safe`).
DenseExecutor (experts/reference.py) stays the test oracle; both compute the same sum.
"""

from __future__ import annotations

import torch

from hotexperts.experts.weights import LayerExperts, QuantizedWeight
from hotexperts.kernels.gpu_moe import gpu_moe, triton_available


def _to(w, device, dtype):
    if isinstance(w, QuantizedWeight):
        return w.to(device)
    return w.to(device=device, dtype=dtype).contiguous()


class GpuExecutor:
    def __init__(self, layers: dict[int, LayerExperts], device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.layers = {l: LayerExperts(_to(le.w13, self.device, dtype), _to(le.w2, self.device, dtype))
                       for l, le in layers.items()}
        self.on_route = None
        self.graph_safe = self.device.type == "cuda" and triton_available()

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.on_route is not None:
            self.on_route(layer, ids, weights)
        le = self.layers[layer]
        return gpu_moe(x, ids, weights, le.w13, le.w2)       # x [T,D], ids/weights [T,K] -> [T,D]

    def end_step(self) -> None:
        pass

    def stats(self) -> None:
        return None
