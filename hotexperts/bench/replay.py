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
Every other ExpertExecutor hook goes to the inner executor, as do its `plan`, `slots`, `planner`, `prefetch`
and `cache_stats`.
"""

from __future__ import annotations

import numpy as np
import torch

from hotexperts.executor import ExpertExecutor


class RoutingReplay(ExpertExecutor):
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
        self.cursor = 0                                                          # host copy (wraps, seek)
        self.pos = torch.zeros((), dtype=torch.long, device=device)               # device copy (graphs)
        self.wraps = 0
        self._step_tokens = 0
        self._arange: dict[int, torch.Tensor] = {}
        self._step_rows: torch.Tensor | None = None                               # rows of this step
        self._cast: dict[torch.dtype, torch.Tensor] = {}                          # weights per dtype

    @property
    def graph_safe(self) -> bool:
        """Rows are gathered at a device-side cursor, so a graph-safe inner executor stays graph-safe."""
        return bool(self.inner.graph_safe)

    @property
    def on_route(self):
        return self.inner.on_route

    @on_route.setter
    def on_route(self, fn) -> None:
        self.inner.on_route = fn

    def _rows(self, t: int) -> torch.Tensor:
        """[t] trace rows at the device cursor (no host read: capturable in a CUDA graph)."""
        if t not in self._arange:
            self._arange[t] = torch.arange(t, device=self.pos.device)
        return (self._arange[t] + self.pos) % self.num_tokens

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        li = self.layer_index[layer]
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()   # a graph must record it
        if capturing or self._step_rows is None or self._step_rows.shape[0] != t:
            self._step_rows = self._rows(t)                                       # once per step
        if x.dtype not in self._cast:
            self._cast[x.dtype] = self.weights.to(x.dtype)
        rows = self._step_rows
        rid, rw = self.ids[rows, li], self._cast[x.dtype][rows, li]               # [T, K']
        self._step_tokens = t
        return self.inner(layer, x, rid, rw)

    def end_step(self) -> None:
        # no call since the last step = a CUDA-graph replay of a decode step (one token)
        self.cursor += self._step_tokens or 1
        if self.cursor >= self.num_tokens:
            self.wraps += self.cursor // self.num_tokens
            self.cursor %= self.num_tokens
        self.pos.fill_(self.cursor)
        self._step_tokens, self._step_rows = 0, None
        self.inner.end_step()

    def seek(self, position: int) -> None:
        """Place the cursor (e.g. at the first decode token of the trace before a tg run)."""
        self.cursor = position % self.num_tokens
        self.pos.fill_(self.cursor)
        self._step_rows = None

    # ---- the inner executor's hooks and reports ------------------------------------------------------
    def before_step(self) -> None:
        self.inner.before_step()

    def flush(self) -> None:
        self.inner.flush()

    def check_errors(self) -> None:
        self.inner.check_errors()

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict | None:
        return self.inner.stats()

    def export_profile(self, path: str) -> str:
        return self.inner.export_profile(path)

    def wait_for_fills(self) -> None:
        self.inner.wait_for_fills()

    def set_gpu_timing(self, on: bool) -> None:
        self.inner.set_gpu_timing(on)

    @property
    def cache_stats(self):
        return self.inner.cache_stats

    @property
    def plan(self):
        return self.inner.plan

    @property
    def slots(self):
        return self.inner.slots

    @property
    def planner(self):
        return self.inner.planner

    @property
    def prefetch(self):
        return self.inner.prefetch
