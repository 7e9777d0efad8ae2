"""WorkerDecode: a decode step (T = 1) whose CPU experts run in the native worker thread, with no host work
between layers, so the whole decode step can be one CUDA graph (experts/mailbox.py, kernels/handoff.py).

    worker = WorkerDecode.start(cache, top_k, hidden, dtype, gpu_misses=0)   # None (and a warning) when the
                                                                          # worker cannot run here
    y = worker(layer, x [1,D], ids [1,K], weights [1,K])   device ops only:
        post(layer): a device kernel writes ids, miss ids (no slot in the device table) and x to the layer's
                     row of a pinned host mailbox; the CPU worker computes the misses once the row appears
        gpu_moe over the slots (hits), concurrently
        collect(layer): a device kernel waits for the worker's result (only when the row has a miss), adds it
    rows = worker.take_step()          host, after the step finished on the device: the step's routing
    worker.account(step, rows)         per-layer hits and misses, CPU time, planner.observe_step (layer order,
                                       as the synchronous path and the simulator call it)
Layers whose experts are all resident and unmanaged run only gpu_moe ("gpu"); layers without slots skip it
("cpu"); the others post, compute their hits and collect ("split"). gpu_misses: per layer and step, at most
that many misses (one per `share`) are computed by the GPU reading the expert from pinned host memory.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from hotexperts.experts.cache import ExpertCache
from hotexperts.experts.mailbox import DecodeHandoff, HandoffUnavailable, StepRows
from hotexperts.kernels.handoff import device_handoff_available


class WorkerDecode:
    def __init__(self, cache: ExpertCache, handoff: DecodeHandoff, gpu_misses: int = 0):
        self.cache, self.handoff, self.gpu_misses = cache, handoff, gpu_misses
        self.gpu_miss_count = 0                              # misses the GPU computed from host memory
        self._kinds: dict[int, str] = {}                     # layer -> "gpu" | "cpu" | "split"

    @classmethod
    def start(cls, cache: ExpertCache, top_k: int, hidden: int, dtype: torch.dtype, self_test: bool = True,
              gpu_misses: int = 0) -> WorkerDecode | None:
        """The worker over `cache`, or None with a warning when it cannot run here (the executor then keeps
        the synchronous per-layer round trip)."""
        handoff = None
        try:
            if cache.cuda and not device_handoff_available():
                raise HandoffUnavailable("Triton is unavailable")
            handoff = DecodeHandoff(cache.store, cache.moe_layers, top_k, hidden, dtype, cache.device,
                                    cache.options)
            if self_test:
                handoff.self_test(dtype)
            return cls(cache, handoff, gpu_misses if _host_readable(cache) else 0)
        except Exception as e:  # noqa: BLE001 - a Triton compile error too: any failure means "sync path"
            warnings.warn(f"decode falls back to synchronous CPU experts (no CUDA graph): {e}",
                          RuntimeWarning, stacklevel=3)
            if handoff is not None:
                handoff.close()
            return None

    @property
    def closed(self) -> bool:
        return self.handoff.closed

    @property
    def share(self) -> int:
        return self.handoff.share

    def close(self) -> None:
        self.handoff.close()

    def check(self) -> None:
        self.handoff.check()

    def take_step(self) -> StepRows:
        return self.handoff.take_step()

    # ---- the step (device ops) -------------------------------------------------------------------------
    def __call__(self, layer, x, ids, weights) -> torch.Tensor:
        c, s = self.cache, self.cache.slots
        kind = self._kind(layer)
        if kind == "gpu":
            return c.gpu_moe(x, ids, weights, s.w13, s.w2, s.slot_of(layer), **c.variant(layer))
        row = s.slot_of(layer) if kind == "split" else None
        z = self.gpu_misses
        zc = self.handoff.post(layer, x, ids, weights, row, z)     # the CPU starts on its misses now
        y = y2 = None
        if kind == "split":                                        # hits, while the CPU works; fp32 sum
            y = c.gpu_moe(x, ids, weights, s.w13, s.w2, row, out=_fp32(x), **c.variant(layer))
        if zc is not None:                                         # the GPU's own misses, over PCIe
            y2 = self._host_moe(layer, x, zc, weights)
        return self.handoff.collect(layer, ids, row, y, x.dtype, y2, z)

    def _host_moe(self, layer, x, ids, weights) -> torch.Tensor:
        """The GPU computes experts straight from the pinned host store (UVA reads over PCIe): fp32 [1, D]."""
        c = self.cache
        le = c.store.layer(layer)
        if c.cuda and not c.variant(layer):
            from hotexperts.kernels.triton_moe import moe_decode  # Triton: imported only on CUDA

            return moe_decode(x, ids, weights, le.w13, le.w2, None, _fp32(x))
        return c.gpu_moe(x, ids, weights, le.w13, le.w2, None, out=_fp32(x), **c.variant(layer))

    def _kind(self, layer: int) -> str:
        """gpu: every expert resident, unmanaged; cpu: no slot can hold one; split: the hybrid step."""
        kind = self._kinds.get(layer)
        if kind is None:
            c = self.cache
            n_res, fixed = c.resident_count(layer), layer not in c.managed
            kind = "gpu" if fixed and n_res == c.E else "cpu" if fixed and n_res == 0 else "split"
            self._kinds[layer] = kind
        return kind

    # ---- bookkeeping (host, after the step) ------------------------------------------------------------
    def account(self, step: int, got: StepRows) -> None:
        """A decode step's mailbox rows: per-layer hits and misses, CPU time, planner.observe_step."""
        c = self.cache
        hits, valid = got.hits, got.ids >= 0                       # [n, K]
        self.gpu_miss_count += int((got.zc >= 0).sum())
        n_hit = hits.sum(1)
        if c.stats is not None:
            c.stats.routed_rows(got.rows, n_hit, valid.sum(1) - n_hit, got.cpu_s)
            gpu_rows = [r for r, l in enumerate(c.moe_layers) if self._kinds.get(l) == "gpu"]
            if gpu_rows:                                           # never posted: every selection a hit
                c.stats.routed_rows(np.asarray(gpu_rows), self.handoff.mb.K, 0)
        if c.planner is not None:
            layers = [c.moe_layers[r] for r in got.rows.tolist()]
            keep = [i for i, l in enumerate(layers) if l in c.managed]
            ids = np.where(valid, got.ids, -1)
            c.planner.observe_step(step, [layers[i] for i in keep], ids[keep], hits[keep], False, tokens=1)
        if c.slots is not None:
            c.slots.mark_read_all()                                # fills wait for the queued steps' reads


def _host_readable(cache: ExpertCache) -> bool:
    """The GPU can read every expert from host memory: pinned (CUDA), or anything on the CPU."""
    if not cache.cuda:
        return True
    if all(cache.store.layer_pinned(l) for l in cache.moe_layers):
        return True
    warnings.warn("the expert store is not pinned: misses stay on the CPU (--moe-gpu-misses ignored)",
                  RuntimeWarning, stacklevel=4)
    return False


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)
