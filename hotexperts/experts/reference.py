"""DenseExecutor: every routed expert of every MoE layer on one device; the test oracle.

executor(layer, x [T,D], ids [T,K], weights [T,K]) -> y [T,D] = sum_k weights[t,k] * expert_{ids[t,k]}(x[t]),
computed like transformers: loop over the experts actually hit (ascending id), gather their tokens,
y.index_add_ their weighted outputs. ids == -1 contributes 0. QuantizedWeight experts are dequantized once.
The activation and the gate/up bias are the layer's (LayerExperts.act, .b13: h = act(split(w13 x + b13))).
on_route(layer, ids, weights), if set, is called before computing; `plan` (the PlacementPlan it runs, when
experts/build.py made it) is the constructor's. It synchronises with the host
(ids.unique()), so it is never graph_safe; fine for an oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hotexperts.executor import ExpertExecutor
from hotexperts.quant import dequantize
from hotexperts.weights import LayerExperts, QuantizedWeight, Weight


def _dense(w: Weight, device, dtype) -> torch.Tensor:
    if isinstance(w, QuantizedWeight):
        w = dequantize(w)
    return w.to(device=device, dtype=dtype)


class DenseExecutor(ExpertExecutor):
    def __init__(self, layers: dict[int, LayerExperts], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, plan=None):
        self.device, self.dtype, self.plan = torch.device(device), dtype, plan
        self.w13 = {i: _dense(le.w13, device, dtype) for i, le in layers.items()}    # [E, 2I, D]
        self.w2 = {i: _dense(le.w2, device, dtype) for i, le in layers.items()}      # [E, D, I]
        self.b13 = {i: None if le.b13 is None else le.b13.to(device=device, dtype=dtype)
                    for i, le in layers.items()}                                      # [E, 2I] | None
        self.act = {i: le.act for i, le in layers.items()}

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.on_route is not None:
            self.on_route(layer, ids, weights)
        w13, w2, b13, act = self.w13[layer], self.w2[layer], self.b13[layer], self.act[layer]
        h = x.to(self.dtype)
        y = torch.zeros_like(h)                                             # [T, D]
        for e in ids.unique().tolist():                                     # host sync: fine for an oracle
            if e < 0:
                continue
            tok, k = torch.where(ids == e)                                  # tokens routed to e
            gu = F.linear(h[tok], w13[e], None if b13 is None else b13[e])  # [n, 2I]
            out = F.linear(act(*gu.chunk(2, dim=-1)), w2[e])                # [n, D]
            y.index_add_(0, tok, out * weights[tok, k, None].to(self.dtype))
        return y.to(x.dtype)
