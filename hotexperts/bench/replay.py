"""Routing replay: an executor wrapper that substitutes recorded (or synthetic) router choices.

Speed must be real and routing must be real, separately: a random-weight model's own router collapses onto
a few experts, so benchmarks replay the router's choices from a RoutingTrace while every byte of compute and
every transfer stays real. The model is untouched (it still runs its router); only the (ids, weights) handed
to the inner executor are replaced.

Contract:
    replay = RoutingReplay(inner, trace, moe_layers, device)
    replay(layer, x [T, D], ids [T, K], weights [T, K]) -> inner(layer, x, ids' [T, K'], weights' [T, K'])
        ids' / weights' are the trace's rows for the next T token positions (K' = the trace's top-k); the
        cursor advances by T after each forward (end_step). Past the trace's end the cursor wraps around
        (`wraps` counts it, and the report says so). Missing cells (-1) contribute nothing.
"""

from __future__ import annotations

import numpy as np
import torch


class RoutingReplay:
    def __init__(self, inner, trace, moe_layers: list[int] | tuple[int, ...], device: torch.device | str):
        ids = np.asarray(trace.ids)                      # [N, Lm, K] int16, -1 = missing
        if ids.shape[1] != len(moe_layers):
            raise ValueError(
                f"trace has {ids.shape[1]} MoE layers but the model has {len(moe_layers)}; "
                "pick a trace recorded from a model of the same shape"
            )
        w = np.nan_to_num(np.asarray(trace.weights, dtype=np.float32), nan=0.0)
        w = np.where(ids >= 0, w, 0.0)
        w = w / np.clip(w.sum(-1, keepdims=True), 1e-9, None)   # rows renormalised over the known cells
        self.inner = inner
        self.layer_index = {layer: i for i, layer in enumerate(moe_layers)}
        self.ids = torch.as_tensor(ids.astype(np.int64), device=device)          # [N, Lm, K]
        self.weights = torch.as_tensor(w, device=device)                         # [N, Lm, K] fp32
        self.num_tokens = ids.shape[0]
        self.top_k = ids.shape[2]
        self.cursor = 0
        self.wraps = 0
        self._step_tokens = 0

    @property
    def graph_safe(self) -> bool:
        return False  # the cursor moves on the host

    @property
    def on_route(self):
        return getattr(self.inner, "on_route", None)

    @on_route.setter
    def on_route(self, fn) -> None:
        self.inner.on_route = fn

    def _rows(self, t: int) -> torch.Tensor:
        idx = (torch.arange(t) + self.cursor) % self.num_tokens
        return idx

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        li = self.layer_index[layer]
        if self.cursor + t <= self.num_tokens:
            rid = self.ids[self.cursor:self.cursor + t, li]
            rw = self.weights[self.cursor:self.cursor + t, li]
        else:
            rows = self._rows(t).to(self.ids.device)
            rid, rw = self.ids[rows, li], self.weights[rows, li]
        self._step_tokens = t
        return self.inner(layer, x, rid, rw.to(x.dtype))

    def end_step(self) -> None:
        self.cursor += self._step_tokens
        if self.cursor >= self.num_tokens:
            self.wraps += self.cursor // self.num_tokens
            self.cursor %= self.num_tokens
        self._step_tokens = 0
        self.inner.end_step()

    def seek(self, position: int) -> None:
        """Place the cursor (e.g. at the first decode token of the trace before a tg run)."""
        self.cursor = position % self.num_tokens

    def __getattr__(self, name):
        # stats(), slots, ... of the inner executor stay reachable through the wrapper
        return getattr(self.inner, name)
