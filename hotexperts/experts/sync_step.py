"""SyncStep: one MoE layer of the synchronous hybrid path: hits on the GPU (one fused kernel over the slots),
misses on the CPU (one call for the whole layer), at the same time; the two partial sums are added.

    y = SyncStep(cache)(layer, x [T,D], ids [T,K], weights [T,K], step, prompt) -> [T, D]

    1. D2H of ids [T,K], weights [T,K] and x [T,D] into pinned buffers (skipped when the layer cannot miss
       and is not managed by the planner), queued BEFORE the GPU part so it does not wait for it
    2. GPU part: gpu_moe(x, ids, weights, slots.w13, slots.w2, slot_of) -> misses contribute 0 (async); a
       verify step (T > 1, not a prompt) on CUDA: the T = 1 step's GEMV kernels (worker_decode.step_moe),
       so draft and verify share one kernel family
    3. wait for the D2H only; hits per the slot table's host mirror; ids of hits masked to -1; ONE cpu_moe
       call for all misses into a pinned output (GIL released while the GPU works)
    4. H2D of the CPU partial (non_blocking) and add        -> the exact sum of the same experts
    5. planner.observe(step, layer, ids, prompt, tokens=T, hits) (the mirror equals residency.resident)
Layers with every expert resident skip 1/3/4 when unmanaged; layers with none skip 2. Used for prompt
chunks that do not stream and for decode steps without the native worker (`--moe-decode sync`).
"""

from __future__ import annotations

import time
import warnings

import torch

from hotexperts.experts.cache import ExpertCache
from hotexperts.experts.worker_decode import step_moe


class HostBuffers:
    """Pinned (on CUDA) host buffers for one layer's round trip, grown on demand and reused."""

    def __init__(self, pin: bool):
        self.pin, self.bufs = pin, {}

    def get(self, name: str, shape, dtype) -> torch.Tensor:
        b = self.bufs.get(name)
        n = 1
        for s in shape:
            n *= s
        if b is None or b.numel() < n or b.dtype != dtype:
            try:
                b = torch.empty(max(n, 1), dtype=dtype, pin_memory=self.pin)
            except RuntimeError:
                warnings.warn("cannot pin the round-trip buffers; using pageable memory (slower)",
                              RuntimeWarning, stacklevel=3)
                self.pin = False
                b = torch.empty(max(n, 1), dtype=dtype)
            self.bufs[name] = b
        return b[:n].view(shape)


def slot_hits(cache: ExpertCache, layer: int, h_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[T, K] bool: the cell's expert has a usable slot (host mirror); -1 cells are never hits."""
    return (cache.slots.mirror(layer)[h_ids.clamp(min=0)] >= 0) & valid


class SyncStep:
    def __init__(self, cache: ExpertCache):
        self.cache = cache
        self.host = HostBuffers(pin=cache.cuda)
        self._d2h_done = None

    def __call__(self, layer, x, ids, weights, step: int, prompt: bool) -> torch.Tensor:
        c = self.cache
        T, K = ids.shape
        n_res = c.resident_count(layer)
        managed = layer in c.managed
        can_miss = n_res < c.E
        host = self._to_host(x, ids, weights, with_x=can_miss) if (can_miss or managed) else None
        y = None
        if n_res > 0:
            y = self._gpu_part(layer, x, ids, weights, prompt)
        if host is None:
            c.count(layer, T * K, 0)
            return y
        h_ids, h_w, h_x, ready = host
        if ready is not None:
            ready.synchronize()                              # the D2H only: queued before the GPU part
        valid = h_ids >= 0                                   # [T, K]; -1 = a missing cell of a replayed trace
        hit = slot_hits(c, layer, h_ids, valid) if n_res > 0 else None
        n_valid = int(valid.sum())
        n_hit = int(hit.sum()) if hit is not None else 0
        c.count(layer, n_hit, n_valid - n_hit)
        if n_hit < n_valid:
            part = self._cpu_part(layer, h_x, h_ids if hit is None else h_ids.masked_fill(hit, -1), h_w)
            y = part if y is None else y + part
        if managed:
            flags = hit[valid].tolist() if hit is not None else [False] * n_valid
            c.observe(step, layer, h_ids.flatten().tolist(), prompt, T, flags)
        return y if y is not None else torch.zeros_like(x)     # no slot and no routed cell: the part is 0

    def _to_host(self, x, ids, weights, with_x: bool):
        """Queue the D2H copies into pinned buffers; returns (ids, weights, x, event) on the host."""
        if not self.cache.cuda:
            return ids, weights, x, None
        h_ids = self.host.get("ids", tuple(ids.shape), ids.dtype)
        h_w = self.host.get("w", tuple(weights.shape), weights.dtype)
        h_ids.copy_(ids, non_blocking=True)
        h_w.copy_(weights, non_blocking=True)
        h_x = None
        if with_x:
            h_x = self.host.get("x", tuple(x.shape), x.dtype)
            h_x.copy_(x, non_blocking=True)
        if self._d2h_done is None:
            self._d2h_done = torch.cuda.Event()              # one event, re-recorded every layer
        self._d2h_done.record()
        return h_ids, h_w, h_x, self._d2h_done

    def _gpu_part(self, layer, x, ids, weights, prompt: bool) -> torch.Tensor:
        c, s = self.cache, self.cache.slots
        timed = c.time_gpu and c.cuda and c.stats is not None
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        if prompt:
            y = c.gpu_moe(x, ids, weights, s.w13, s.w2, s.slot_of(layer), **c.variant(layer))   # [T, D]
        else:                                                 # a decode or verify step
            y = step_moe(c, layer, x, ids, weights, s.slot_of(layer))
        s.mark_read(layer)
        if timed:
            end.record()
            c.stats.gpu_events(layer, start, end)
        return y

    def _cpu_part(self, layer, h_x, h_ids, h_w) -> torch.Tensor:
        c = self.cache
        t0 = time.perf_counter()
        if c.cuda:
            out = self.host.get("out", tuple(h_x.shape), h_x.dtype)
            c.cpu_moe(h_x, h_ids, h_w, c.store.layer(layer), out)
            part = out.to(c.device, non_blocking=True)       # safe: later D2H waits behind this copy
        else:
            part = c.cpu_moe(h_x, h_ids, h_w, c.store.layer(layer), None)
        if c.stats is not None:
            c.stats.cpu_time(layer, time.perf_counter() - t0)
        return part
