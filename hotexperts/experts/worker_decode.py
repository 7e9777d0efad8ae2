"""WorkerDecode: a decode step (T = 1) or a verify step (T = 2..MAX_STEP_TOKENS tokens at once, speculative
decoding's) whose CPU experts run in the native worker thread, with no host work between layers, so the whole
step can be one CUDA graph (experts/mailbox.py, kernels/handoff.py).

    worker = WorkerDecode.start(cache, top_k, hidden, dtype, gpu_misses=0)   # None (and a warning) when the
                                                                          # worker cannot run here
    y = worker(layer, x [T,D], ids [T,K], weights [T,K])   device ops only:
        post(layer): a device kernel writes the T tokens' ids, miss ids (no slot in the device table) and x
                     to the layer's row of a pinned host mailbox; the CPU worker computes the misses of all
                     T tokens in one fused call once the row appears
        the hits of all T tokens in one GPU MoE call over the slots, concurrently (T > 1 on CUDA: the Triton
                     GEMV kernels of the T = 1 step, whatever T: one kernel family for draft and verify, and
                     no host sync on any slot format)
        collect(layer): a device kernel waits for the worker's result (only when the row has a miss), adds it
    worker.max_tokens                  the most tokens a step may have (the mailbox's rows)
    rows = worker.take_step()          host, after the step finished on the device: the step's routing
    worker.account(step, rows)         per-layer hits and misses, CPU time, planner.observe_step over the
                                       step's T x K cells (layer order, tokens=T: for T > 1 the union of
                                       the tokens' experts, as the synchronous path and the simulator do)
Layers whose experts are all resident and unmanaged run only the GPU part ("gpu"); layers without slots skip
it ("cpu"); the others post, compute their hits and collect ("split"). gpu_misses: per layer in a T = 1 step,
at most that many misses (one per `share`) are computed by the GPU reading the expert from pinned host
memory; a verify step leaves every miss to the CPU, whose one call reads each missed expert once for all T
tokens (the GPU's reads over PCIe are per (token, expert) pair).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from hotexperts.experts.cache import ExpertCache
from hotexperts.experts.mailbox import DecodeHandoff, HandoffUnavailable, StepRows
from hotexperts.kernels.gpu_moe import gpu_moe, triton_available
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

    @property
    def max_tokens(self) -> int:
        return self.handoff.max_tokens

    # ---- the step (device ops) -------------------------------------------------------------------------
    def __call__(self, layer, x, ids, weights) -> torch.Tensor:
        s = self.cache.slots
        kind = self._kind(layer)
        if kind == "gpu":
            return step_moe(self.cache, layer, x, ids, weights, s.slot_of(layer))
        row = s.slot_of(layer) if kind == "split" else None
        z = self.gpu_misses if x.shape[0] == 1 else 0
        zc = self.handoff.post(layer, x, ids, weights, row, z)     # the CPU starts on its misses now
        y = y2 = None
        if kind == "split":                                        # hits, while the CPU works; fp32 sum
            y = step_moe(self.cache, layer, x, ids, weights, row, out=_fp32(x))
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
        """A step's mailbox rows: per-layer hits and misses, CPU time, planner.observe_step (for a verify step
        over its T x K cells: the union of its tokens' experts, tokens=T)."""
        c = self.cache
        hits, valid = got.hits, got.ids >= 0                       # [n, T, K]
        self.gpu_miss_count += int((got.zc >= 0).sum())
        n_hit, n_valid = hits.sum((1, 2)), valid.sum((1, 2))
        if c.stats is not None:
            c.stats.routed_rows(got.rows, n_hit, n_valid - n_hit, got.cpu_s)
            gpu_rows = [r for r, l in enumerate(c.moe_layers) if self._kinds.get(l) == "gpu"]
            if gpu_rows:                                           # never posted: every selection a hit
                c.stats.routed_rows(np.asarray(gpu_rows), self.handoff.mb.K * got.tokens, 0)
        if c.planner is not None:
            layers = [c.moe_layers[r] for r in got.rows.tolist()]
            keep = [i for i, l in enumerate(layers) if l in c.managed]
            ids = np.where(valid, got.ids, -1)
            c.planner.observe_step(step, [layers[i] for i in keep], ids[keep], hits[keep], False,
                                   tokens=got.tokens)
        if c.slots is not None:
            c.slots.mark_read_all()                                # fills wait for the queued steps' reads


def step_moe(cache: ExpertCache, layer: int, x, ids, weights, slot_row, out=None) -> torch.Tensor:
    """A decode or verify step's hits over the slots: x [T, D], ids / weights [T, K] -> [T, D] (into `out`).
    T = 1, or off CUDA: the cache's gpu_moe. T > 1 on CUDA: the T = 1 step's Triton GEMV kernels whenever
    the default kernel runs (gpu_moe would take its grouped prompt path, another kernel family, which syncs
    with the host on quantized slots to find them): no host sync, so the step stays one CUDA graph."""
    s = cache.slots
    if x.shape[0] > 1 and _gemv_applies(cache):
        from hotexperts.kernels.triton_moe import moe_decode  # Triton: imported only on CUDA

        return moe_decode(x, ids, weights, s.w13, s.w2, slot_row, out, **cache.variant(layer))
    return cache.gpu_moe(x, ids, weights, s.w13, s.w2, slot_row, out=out, **cache.variant(layer))


def _gemv_applies(cache: ExpertCache) -> bool:
    """CUDA slots, the default GPU kernel (not a caller's), its Triton backend allowed and importable."""
    default = isinstance(cache.gpu_moe, functools.partial) and cache.gpu_moe.func is gpu_moe
    return (cache.cuda and cache.slots is not None and default and cache.options.gpu_moe in ("auto", "triton")
            and triton_available())


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
