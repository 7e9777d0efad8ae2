"""HybridExecutor: per MoE layer, hits on the GPU (one fused kernel over the slots), misses on the CPU (one
call for the whole layer), at the same time; the two partial sums are added.

Decode step of one layer (T tokens, K top-k, E experts, shapes in comments):
    1. D2H of ids [T,K], weights [T,K] and x [T,D] into pinned buffers (skipped when the layer cannot miss
       and is not managed by a controller), queued BEFORE the GPU part so it does not wait for it
    2. GPU part: gpu_moe(x, ids, weights, pool.w13, pool.w2, slot_of) -> misses contribute 0 (async)
    3. wait for the D2H only; hits per the host mirror; ids of hits masked to -1; ONE cpu_moe call for all
       misses into a pinned output (GIL released while the GPU works)
    4. H2D of the CPU partial (non_blocking) and add        -> the exact sum of the same experts
    5. controller.observe(step, layer, ids, prompt, tokens=T, hits) (lookup = the mirror,
       which equals controller.resident)
Layers with every expert resident skip 1/3/4 when unmanaged; layers with none skip 2.
end_step(): poll completed fills (commit), controller.end_step -> swaps (bounded) issued on the copy stream.

Prompt chunks (T > 1) are observed with prompt=True (the controller keeps batches over its prompt_bypass
from the policy: no flush of the decode working set; no swaps after a prompt chunk). Over pp_bypass, when
the measured cost says so (`PromptCost`), they run "stream": every expert of the layer is copied into one of
two device staging pools, the next MoE layer's copy prefetched while this one computes.
`on_route(layer, ids, weights)` is called first when set.

Worker decode (`enable_worker()`, the default on CUDA; experts/mailbox.py): a T=1 call needs no host at all.
    post(layer): a device kernel writes ids, miss ids (no slot in the device table) and x to the layer's
                 row of a pinned host mailbox; a native CPU thread computes the misses once the row appears
    gpu_moe over the slots (hits), concurrently
    collect(layer): device kernel waits for the worker's result (only when the row has a miss) and adds it
Layers whose experts are all resident and unmanaged run only gpu_moe; layers without slots skip it. Then
`graph_safe` is True and the whole decode step is one CUDA graph. end_step() reads the step's routing from
the mailbox (hits and misses per layer, CPU time, controller.observe in layer order, as in the
synchronous path) before polling fills and planning swaps. Without the worker: `graph_safe` is False.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings

import numpy as np
import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.errors import HotExpertsError
from hotexperts.experts.slots import DoneEvent
from hotexperts.experts.staging import PromptCost, staging_or_none
from hotexperts.kernels.cpu_moe import cpu_moe
from hotexperts.kernels.gpu_moe import gpu_moe, triton_available


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


class HybridExecutor:
    def __init__(self, store, device, *, slots=None, controller=None, stats=None, pp_bypass: int = 64,
                 prompt_mode: str = "auto", prompt_cost: PromptCost | None = None, staging: bool = False,
                 cpu_kernel=None, gpu_kernel=None, options: KernelOptions = DEFAULT_KERNELS):
        self.store, self.device = store, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.options = pinned_threads(options, beside_gpu=self.cuda)
        self.slots, self.controller, self.cache_stats = slots, controller, stats
        self.managed = set(controller.layers) if controller is not None else set()
        self.pp_bypass, self.prompt_mode = pp_bypass, prompt_mode
        self.prompt_cost = prompt_cost or PromptCost()
        self.cpu_moe = cpu_kernel or functools.partial(cpu_moe, options=self.options)
        self.gpu_moe = gpu_kernel or functools.partial(gpu_moe, backend=self.options.gpu_moe)
        self.host = HostBuffers(pin=self.cuda)
        self.E = store.num_experts
        self.moe_layers = list(store.layers)
        self.next_layer = dict(zip(self.moe_layers, self.moe_layers[1:], strict=False))
        self.stage = staging_or_none(store, self.device, self.options.stage_copy) if staging else None
        self.on_route = None
        self.time_gpu = False                                # per-layer GPU timing with CUDA events (--stats)
        self.step, self._prompt = 0, False
        self._d2h_done = None
        self._measured = prompt_cost is not None
        self.host_s = 0.0                                    # seconds of end_step work (bookkeeping, swaps)
        self.sync_s = 0.0                                    # seconds end_step waited for the device
        self._wait_s = 0.0
        self.gpu_miss_count = 0                              # misses the GPU computed from host memory
        self.worker = None                                   # DecodeHandoff, once enable_worker() succeeded
        self._kinds: dict[int, str] = {}                     # worker decode: layer -> "gpu" | "cpu" | "split"
        self.gpu_misses = 0                                  # worker decode: misses per layer the GPU reads
        self._step_done = None                               # CUDA event after the last decode step
        self._pending_step: int | None = None                # deferred: a step whose rows are not taken yet
        self._stash = None                                   # deferred: (step, prompt, rows) to account
        self._announced = False                              # before_step() ran for the current forward
        self.defer = self.cuda                               # worker decode: bookkeeping one step late
        self._prompt_routes: list = []                       # streamed prompt layers awaiting observe

    @property
    def graph_safe(self) -> bool:
        """With the worker, a T=1 call has no host synchronisation: the decode step can be a CUDA graph."""
        return self.worker is not None and self.cuda

    def enable_worker(self, top_k: int, hidden: int, dtype: torch.dtype, self_test: bool = True,
                      gpu_misses: int = 0) -> bool:
        """Hand decode steps' CPU experts to the native worker (experts/mailbox.py). False (and a warning)
        when it cannot run here; decode then keeps the synchronous per-layer round trip. gpu_misses: per
        layer and step, at most that many misses (one per `share` misses, kernels/handoff.py) are computed
        by the GPU reading the expert from pinned host memory, in parallel with the CPU's share."""
        from hotexperts.experts.mailbox import DecodeHandoff, HandoffUnavailable
        from hotexperts.kernels.handoff import device_handoff_available

        try:
            if self.cuda and not device_handoff_available():
                raise HandoffUnavailable("Triton is unavailable")
            self.worker = DecodeHandoff(self.store, self.moe_layers, top_k, hidden, dtype, self.device,
                                        self.options)
            if self_test:
                self.worker.self_test(dtype)
            self.gpu_misses = gpu_misses if self._host_readable() else 0
            return True
        except Exception as e:  # noqa: BLE001 - a Triton compile error too: any failure means "sync path"
            warnings.warn(f"decode falls back to synchronous CPU experts (no CUDA graph): {e}",
                          RuntimeWarning, stacklevel=2)
            if self.worker is not None:
                self.worker.close()
            self.worker = None
            return False

    def _host_readable(self) -> bool:
        """The GPU can read every expert from host memory: pinned (CUDA), or anything on the CPU."""
        if not self.cuda:
            return True
        if all(self.store.layer_pinned(l) for l in self.moe_layers):
            return True
        warnings.warn("the expert store is not pinned: misses stay on the CPU (--moe-gpu-misses ignored)",
                      RuntimeWarning, stacklevel=3)
        return False

    def close(self) -> None:
        """Stop the native worker thread (also done when the executor is collected or at exit). The executor
        cannot run afterwards."""
        if self.worker is not None:
            self.worker.close()

    def check_errors(self) -> None:
        """Raise now (HotExpertsError) if the CPU worker failed or a device wait timed out in the steps run so
        far: cheap, for callers that just synchronised with the device (the Generator, after sampling), so
        a failed step is reported before its token is used, not one step later under deferral."""
        if self.worker is not None:
            self.worker.check()

    # ---- the executor protocol --------------------------------------------------------------------------
    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.on_route is not None:
            self.on_route(layer, ids, weights)
        if self.worker is not None and self.worker.closed:
            raise HotExpertsError("this executor was closed (its CPU worker is stopped)")
        T = x.shape[0]
        prompt = T > 1                                       # a prompt chunk (decode steps have T == 1)
        self._prompt = self._prompt or prompt
        if T == 1 and self.worker is not None:
            if self._pending_step is not None:                 # an eager T=1 forward without before_step
                self._take_pending()
            return self._decode(layer, x, ids, weights)
        if prompt and (self._pending_step is not None or self._stash is not None):
            self.flush()                                       # the last decode step's bookkeeping first
        if T > self.pp_bypass and self._use_stream(layer, ids):
            return self._stream(layer, x, ids, weights)
        return self._hybrid(layer, x, ids, weights, prompt)

    def before_step(self) -> None:
        """Called by the decode step before it launches a T=1 forward (a graph replay): take the previous
        step's routing from the mailbox before the new step overwrites it. With it, end_step() does that
        step's bookkeeping while the new one runs on the device (CUDA worker decode)."""
        t0 = time.perf_counter()
        self._take_pending()
        self._announced = True
        self.host_s += time.perf_counter() - t0 - self._wait_s
        self._flush_wait()

    def end_step(self) -> None:
        t0 = time.perf_counter()
        decode = self.worker is not None and not self._prompt
        if decode and self.defer and self._announced:          # deferred: record now, account next step
            self._record_step()
            self._pending_step = self.step
            stash, self._stash = self._stash, None
            if stash is not None:                              # the previous step, while this one runs
                self._close(*stash)
        else:
            self._flush()
            got = self._take_now() if decode else None
            self._close(self.step, self._prompt, got)
        self.step += 1
        self._prompt, self._announced = False, False
        self.host_s += time.perf_counter() - t0 - self._wait_s
        self._flush_wait()

    def flush(self) -> None:
        """Finish any deferred step bookkeeping now (stats, profiles and prompts need it up to date)."""
        self._flush()
        self._flush_wait()

    def _flush(self) -> None:
        self._take_pending()
        stash, self._stash = self._stash, None
        if stash is not None:
            self._close(*stash)

    def _flush_wait(self) -> None:
        self.sync_s += self._wait_s
        self._wait_s = 0.0

    def _take_pending(self) -> None:
        if self._pending_step is not None:
            self._sync(self._step_done)
            self._stash = (self._pending_step, False, self.worker.take_step())
            self._pending_step = None

    def _take_now(self):
        self._record_step()
        self._sync(self._step_done)                            # the step's mailbox writes are complete
        return self.worker.take_step()

    def _record_step(self) -> None:
        if self._step_done is None:
            self._step_done = torch.cuda.Event() if self.cuda else DoneEvent()
        if self.cuda:
            self._step_done.record(torch.cuda.current_stream(self.device))
        else:
            self._step_done.record()

    def _sync(self, event) -> None:
        t0 = time.perf_counter()
        event.synchronize()
        self._wait_s += time.perf_counter() - t0

    def _close(self, step: int, prompt: bool, got) -> None:
        """One forward's bookkeeping: decode routing (got), prompt routing, stats, fills and swaps."""
        if got is not None:
            self._account_decode(step, got)
        if self._prompt_routes:
            self._observe_prompt(step)
        if self.cache_stats is not None:
            self.cache_stats.end_step()
        if self.stage is not None:
            self.stage.end_step()
        if self.slots is not None:
            self._rebalance(step, prompt)

    def _rebalance(self, step: int, prompt: bool) -> None:
        """Publish completed fills, then issue the controller's swaps for this step (bounded)."""
        self.slots.poll()
        if self.controller is not None:
            swaps = self.controller.end_step(step, prompt)
            if swaps:
                self.slots.issue(swaps)
                self.slots.poll()

    def stats(self) -> dict | None:
        """Per-layer cache statistics (engine.stats()["cache"]); None when not collected."""
        self.flush()
        if self.cache_stats is None:
            return None
        d = self.cache_stats.to_dict()
        d["slots"] = 0 if self.slots is None else self.slots.num_slots
        d["policy"] = None if self.controller is None else self.controller.policy.name
        d["decode"] = "worker" if self.worker is not None else "sync"
        d["gpu_misses"] = self.gpu_misses
        d["gpu_miss_count"] = self.gpu_miss_count
        d["host_s"], d["sync_s"] = self.host_s, self.sync_s
        return d

    def export_profile(self, path: str) -> str:
        """Write the current hot set (and the policy's counts) as a --moe-profile file."""
        from hotexperts.experts.policy import Profile, save_profile

        self.flush()
        if self.controller is not None:
            prof = self.controller.export_profile()
        else:
            hot = self.slots.hot_set() if self.slots is not None else {}
            prof = Profile(self.E, {l: [1.0 if e in hot.get(l, ()) else 0.0 for e in range(self.E)]
                                    for l in self.moe_layers}, hot)
        return str(save_profile(path, prof))

    # ---- worker decode (T == 1): no host work between layers ------------------------------------------
    def _decode(self, layer, x, ids, weights) -> torch.Tensor:
        kind, s = self._decode_kind(layer), self.slots
        if kind == "gpu":
            return self.gpu_moe(x, ids, weights, s.w13, s.w2, s.slot_of(layer))
        row = s.slot_of(layer) if kind == "split" else None
        z = self.gpu_misses
        zc = self.worker.post(layer, x, ids, weights, row, z)      # the CPU starts on its misses now
        y = y2 = None
        if kind == "split":                                        # hits, while the CPU works; fp32 sum
            y = self.gpu_moe(x, ids, weights, s.w13, s.w2, row, out=self._fp32(x))
        if zc is not None:                                         # the GPU's own misses, over PCIe
            y2 = self._host_moe(layer, x, zc, weights)
        return self.worker.collect(layer, ids, row, y, x.dtype, y2, z)

    def _host_moe(self, layer, x, ids, weights) -> torch.Tensor:
        """The GPU computes experts straight from the pinned host store (UVA reads over PCIe): fp32 [1, D]."""
        le = self.store.layer(layer)
        if self.cuda:
            from hotexperts.kernels.triton_moe import moe_decode

            return moe_decode(x, ids, weights, le.w13, le.w2, None, self._fp32(x))
        return self.gpu_moe(x, ids, weights, le.w13, le.w2, None, out=self._fp32(x))

    @staticmethod
    def _fp32(x: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)

    def _decode_kind(self, layer: int) -> str:
        """gpu: every expert resident, unmanaged; cpu: no slot can hold one; split: the hybrid step."""
        kind = self._kinds.get(layer)
        if kind is None:
            s = self.slots
            n_res = s.resident_count(layer) if s is not None and layer in s.row else 0
            fixed = layer not in self.managed
            kind = "gpu" if fixed and n_res == self.E else "cpu" if fixed and n_res == 0 else "split"
            self._kinds[layer] = kind
        return kind

    def _account_decode(self, step: int, got) -> None:
        """A decode step's mailbox rows: per-layer hits and misses, CPU time, controller.observe (layer
        order, as the synchronous path and the simulator call it)."""
        hits, valid = got.hits, got.ids >= 0                       # [n, K]
        self.gpu_miss_count += int((got.zc >= 0).sum())
        n_hit = hits.sum(1)
        if self.cache_stats is not None:
            self.cache_stats.routed_rows(got.rows, n_hit, valid.sum(1) - n_hit, got.cpu_s)
            gpu_rows = [r for r, l in enumerate(self.moe_layers) if self._kinds.get(l) == "gpu"]
            if gpu_rows:                                           # never posted: every selection a hit
                self.cache_stats.routed_rows(np.asarray(gpu_rows), self.worker.mb.K, 0)
        if self.controller is not None:
            self._observe(step, got, hits, valid)
        if self.slots is not None:
            self.slots.mark_read_all()                             # fills wait for the queued steps' reads

    def _observe(self, step: int, got, hits, valid) -> None:
        layers = [self.moe_layers[r] for r in got.rows.tolist()]
        keep = [i for i, l in enumerate(layers) if l in self.managed]
        ids = np.where(valid, got.ids, -1)
        observe_step = getattr(self.controller, "observe_step", None)
        if observe_step is not None:
            observe_step(step, [layers[i] for i in keep], ids[keep], hits[keep], False, tokens=1)
            return
        for i in keep:
            self.controller.observe(step, layers[i], got.ids[i][valid[i]].tolist(), False, tokens=1,
                                    hits=hits[i][valid[i]].tolist())

    # ---- decode / small batches ------------------------------------------------------------------------
    def _hybrid(self, layer, x, ids, weights, prompt: bool) -> torch.Tensor:
        T, K = ids.shape
        n_res = self.slots.resident_count(layer) if self.slots is not None and layer in self.slots.row else 0
        managed = layer in self.managed
        can_miss = n_res < self.E
        host = self._to_host(x, ids, weights, with_x=can_miss) if (can_miss or managed) else None
        y = None
        if n_res > 0:
            y = self._gpu_part(layer, x, ids, weights)
        if host is None:
            self._count(layer, T * K, 0)
            return y
        h_ids, h_w, h_x, ready = host
        if ready is not None:
            ready.synchronize()                              # the D2H only: queued before the GPU part
        valid = h_ids >= 0                                   # [T, K]; -1 = a missing cell of a replayed trace
        hit = self._hits(layer, h_ids, valid) if n_res > 0 else None
        n_valid = int(valid.sum())
        n_hit = int(hit.sum()) if hit is not None else 0
        self._count(layer, n_hit, n_valid - n_hit)
        if n_hit < n_valid:
            part = self._cpu_part(layer, h_x, h_ids if hit is None else h_ids.masked_fill(hit, -1), h_w)
            y = part if y is None else y + part
        if managed:
            flags = hit[valid].tolist() if hit is not None else [False] * n_valid
            self.controller.observe(self.step, layer, h_ids.flatten().tolist(), prompt, tokens=T, hits=flags)
        return y if y is not None else torch.zeros_like(x)     # no slot and no routed cell: the part is 0

    def _hits(self, layer: int, h_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[T, K] bool: the cell's expert has a usable slot (host mirror); -1 cells are never hits."""
        return (self.slots.mirror(layer)[h_ids.clamp(min=0)] >= 0) & valid

    def _to_host(self, x, ids, weights, with_x: bool):
        """Queue the D2H copies into pinned buffers; returns (ids, weights, x, event) on the host."""
        if not self.cuda:
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

    def _gpu_part(self, layer, x, ids, weights) -> torch.Tensor:
        s = self.slots
        timed = self.time_gpu and self.cuda and self.cache_stats is not None
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        y = self.gpu_moe(x, ids, weights, s.w13, s.w2, s.slot_of(layer))        # [T, D]
        s.mark_read(layer)
        if timed:
            end.record()
            self.cache_stats.gpu_events(layer, start, end)
        return y

    def _cpu_part(self, layer, h_x, h_ids, h_w) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.cuda:
            out = self.host.get("out", tuple(h_x.shape), h_x.dtype)
            self.cpu_moe(h_x, h_ids, h_w, self.store.layer(layer), out)
            part = out.to(self.device, non_blocking=True)    # safe: later D2H waits behind this copy
        else:
            part = self.cpu_moe(h_x, h_ids, h_w, self.store.layer(layer), None)
        if self.cache_stats is not None:
            self.cache_stats.cpu_time(layer, time.perf_counter() - t0)
        return part

    def _count(self, layer, hits: int, misses: int) -> None:
        if self.cache_stats is not None:
            self.cache_stats.routed(layer, hits, misses)

    # ---- prompt batches: stream the layer's experts ------------------------------------------------------
    def _use_stream(self, layer, ids) -> bool:
        if self.stage is None or self.prompt_mode == "hybrid":
            return False
        if self.prompt_mode == "stream":
            return True
        T, K = ids.shape
        if self.cuda and not self._measured:
            self.prompt_cost = PromptCost.measure(self.store, self.stage, self.cpu_moe, K)
            self._measured = True
        missing = self._not_resident(layer)
        n_miss = self.E if missing is None else len(missing)
        c = self.prompt_cost
        copy_bytes = self.stage.layer_bytes * n_miss // self.E
        return c.stream_s(copy_bytes) < c.cpu_s(T, K, self.stage.expert_params, n_miss / self.E)

    def _not_resident(self, layer: int) -> list[int] | None:
        """Experts of `layer` without a usable slot (the ones a streamed prompt chunk copies); None = all."""
        s = self.slots
        if s is None or layer not in s.row or s.resident_count(layer) == 0:
            return None
        return torch.nonzero(s.mirror(layer) < 0).flatten().tolist()

    def _stream(self, layer, x, ids, weights) -> torch.Tensor:
        """Resident experts from their slots, the others from a staging pool that received only them
        (the next MoE layer's copy is queued first, so it overlaps this layer's compute), both in ONE
        gpu_moe pass. No host sync: the experts each pool may use are known on the host, and the policy
        sees the routing at end_step."""
        T, K = ids.shape
        missing = self._not_resident(layer)
        pools, s = [], self.slots
        if missing is None or missing:
            w13, w2, table = self.stage.acquire(layer, missing)
            nxt = self.next_layer.get(layer)
            if nxt is not None:
                self.stage.prefetch(nxt, self._not_resident(nxt))   # copies while this layer computes
            pools.append((w13, w2, table, list(range(self.E)) if missing is None else missing))
        if missing is not None:                                   # the resident part, from the slots
            pools.append((s.w13, s.w2, s.slot_of(layer), s.used_slots(layer)))
        (w13, w2, table, used), more = pools[0], tuple(pools[1:])
        y = self.gpu_moe(x, ids, weights, w13, w2, table, used=used, more=more)
        if missing is None or missing:
            self.stage.release(layer)
        if missing is not None:
            s.mark_read(layer)
        self._count(layer, T * K, 0)
        if layer in self.managed:
            self._prompt_routes.append((layer, ids.clone(), T))   # observed at end_step (one sync)
        return y

    def _observe_prompt(self, step: int) -> None:
        """The streamed prompt layers' routing, in layer order, as the policy would have seen it: one device
        read and one observe_step per run of layers with the same chunk size (one run per forward)."""
        routes, self._prompt_routes = self._prompt_routes, []
        while routes:
            T = routes[0][2]
            n = next((i for i, r in enumerate(routes) if r[2] != T), len(routes))
            self._observe_routes(step, routes[:n], T)
            routes = routes[n:]

    def _observe_routes(self, step: int, routes: list, T: int) -> None:
        layers = [l for l, _, _ in routes]
        ids = torch.stack([i.reshape(-1) for _, i, _ in routes]).cpu()          # [n, T*K], one device read
        hits = torch.stack([self._hits(l, row, row >= 0) for l, row in zip(layers, ids, strict=True)])
        self.controller.observe_step(step, layers, ids.numpy(), hits.numpy(), True, tokens=T)


def pinned_threads(options: KernelOptions, beside_gpu: bool) -> KernelOptions:
    """options with the CPU thread count fixed: beside a GPU its OpenMP threads leave one core to the Python
    thread that drives the GPU (spinning workers on every core starve it: launches slow down for the whole
    step)."""
    return dataclasses.replace(options, cpu_threads=options.threads(beside_gpu))


class GpuExecutor:
    """Every routed expert on the device, one fused gpu_moe call per layer: no host synchronisation, so
    CUDA-graph capturable (`graph_safe` on CUDA). The `gpu` placement's executor on CUDA."""

    def __init__(self, store, device, gpu_kernel=None, options: KernelOptions = DEFAULT_KERNELS):
        self.device = torch.device(device)
        self.w13 = {l: store.layer(l).w13.to(self.device) for l in store.layers}     # [E, 2I, D]
        self.w2 = {l: store.layer(l).w2.to(self.device) for l in store.layers}       # [E, D, I]
        self.gpu_moe = gpu_kernel or functools.partial(gpu_moe, backend=options.gpu_moe)
        # the Triton path never syncs with the host; the torch fallback's "loop" mode does
        self.graph_safe = self.device.type == "cuda" and triton_available()
        self.on_route = None
        self._all = list(range(store.num_experts))

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.on_route is not None:
            self.on_route(layer, ids, weights)
        used = self._all if x.shape[0] > 1 else None             # prompt: every slot may be read, no sync
        return self.gpu_moe(x, ids, weights, self.w13[layer], self.w2[layer], used=used)

    def end_step(self) -> None:
        pass
