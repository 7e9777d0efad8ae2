"""HybridExecutor: per MoE layer, hits on the GPU and misses on the CPU at the same time, exactly summed. A
small dispatcher over three modes that share one ExpertCache (experts/cache.py):

    decode, T = 1, native worker on  -> WorkerDecode  (experts/worker_decode.py): no host work between
                                        layers; the decode step is one CUDA graph (`graph_safe`)
    verify, T = 2..16, worker on     -> WorkerDecode too: the T tokens in one mailbox row; the verify step
                                        is a CUDA graph per T (`verify_graph_safe`)
    prompt chunk, T > pp_bypass      -> PromptStream  (experts/prompt_stream.py) when it wants the layer:
                                        missing experts streamed to a staging pool, all on the GPU
    otherwise                        -> SyncStep      (experts/sync_step.py): one host round trip per layer

Step bookkeeping (here): after every forward pass, `end_step()` accounts the step (decode routing from the
mailbox, streamed prompt routing, stats), publishes completed fills and issues the planner's swaps. With the
worker on CUDA it is deferred by one step (`defer`): end_step records an event and the step's rows are taken
in the next `before_step()` (called right before the next step is launched), so the previous step's
bookkeeping runs while the new one computes; `flush()` finishes it at once. A T > 1 forward announced by
before_step() is a verify step (engine/runner/verify.py), observed and planned as a decode step over the
union of its tokens' experts (prompt=False): with the worker it runs and is accounted like a T = 1 step (its
routing in the mailbox, deferred on CUDA); without it (or past the mailbox's tokens) SyncStep runs it and it
is accounted at once.
Next-layer prefetch (`enable_prediction`, off by default; experts/predict.py): synchronous decode steps
(T = 1 without the worker) guess the next layer's experts and request them from the planner (the one swap
decider: CachePlanner.request_prefetch), whose loads the slot cache issues; stats()["prefetch"] counts them.
The worker's graphed step has no host work between layers and ignores it.
Prompt chunks (T > 1, not announced) are observed with prompt=True: the planner keeps batches over its
prompt_bypass from the policy (no flush of the decode working set) and seeds free slots from them.
"""

from __future__ import annotations

import time

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.errors import HotExpertsError
from hotexperts.executor import ExpertExecutor
from hotexperts.experts.cache import ExpertCache
from hotexperts.experts.placement import Staging
from hotexperts.experts.predict import NextLayerPredictor, NextLayerPrefetch
from hotexperts.experts.profile import Profile, save_profile
from hotexperts.experts.prompt_stream import PromptStream
from hotexperts.experts.slots import DoneEvent
from hotexperts.experts.staging import PromptCost, staging_or_none
from hotexperts.experts.sync_step import SyncStep
from hotexperts.experts.worker_decode import WorkerDecode


class HybridExecutor(ExpertExecutor):
    def __init__(self, store, device, *, slots=None, planner=None, stats=None, pp_bypass: int = 64,
                 prompt_mode: str = "auto", prompt_cost: PromptCost | None = None,
                 staging: Staging | None = None, cpu_kernel=None, gpu_kernel=None,
                 options: KernelOptions = DEFAULT_KERNELS, plan=None):
        chunk = plan.dequant_chunk if plan is not None else None        # the VRAM plan's dequantize chunk
        self.cache = ExpertCache(store, device, slots, planner, stats, options, cpu_kernel, gpu_kernel, chunk)
        c = self.cache
        self.store, self.device, self.cuda = store, c.device, c.cuda
        self.slots, self.planner, self.cache_stats = slots, planner, stats
        self.pp_bypass, self.plan = pp_bypass, plan
        stage = staging_or_none(store, c.device, c.options.stage_copy, staging) if staging else None
        self.stream = PromptStream(c, stage, prompt_mode, prompt_cost) if stage is not None else None
        self.sync = SyncStep(c)
        self.worker: WorkerDecode | None = None              # once enable_worker() succeeded
        self.step, self._prompt = 0, False
        self.host_s = 0.0                                    # seconds of end_step work (bookkeeping, swaps)
        self.sync_s = 0.0                                    # seconds end_step waited for the device
        self._wait_s = 0.0
        self._step_done = None                               # event after the last decode step
        self._pending_step: int | None = None                # deferred: a step whose rows are not taken yet
        self._stash = None                                   # deferred: (step, prompt, rows) to account
        self._announced = False                              # before_step() ran for the current forward
        self._verify = False                                 # the current forward is a SyncStep verify step
        self.defer = self.cuda                               # worker decode: bookkeeping one step late
        self.prefetch: NextLayerPrefetch | None = None       # next-layer prefetch (enable_prediction)

    @property
    def graph_safe(self) -> bool:
        """With the worker, a T=1 call has no host synchronisation: the decode step can be a CUDA graph."""
        return self.worker is not None and self.cuda

    @property
    def verify_graph_safe(self) -> bool:
        """With the worker, a verify step's calls (T <= worker.max_tokens) have none either."""
        return self.graph_safe

    @property
    def gpu_misses(self) -> int:
        return self.worker.gpu_misses if self.worker is not None else 0

    def enable_worker(self, top_k: int, hidden: int, dtype: torch.dtype, self_test: bool = True,
                      gpu_misses: int = 0) -> bool:
        """Hand decode steps' CPU experts to the native worker. False (and a warning) when it cannot run
        here; decode then keeps the synchronous per-layer round trip."""
        self.worker = WorkerDecode.start(self.cache, top_k, hidden, dtype, self_test, gpu_misses)
        return self.worker is not None

    def enable_prediction(self, predictor: NextLayerPredictor, **kw) -> None:
        """Request the next layer's guessed experts in synchronous decode steps (kw: NextLayerPrefetch's)."""
        if self.slots is None or self.planner is None:
            raise HotExpertsError("next-layer prefetch needs managed expert slots (a cache or hot:K "
                                  "placement)")
        self.prefetch = NextLayerPrefetch(predictor, self.planner, self.slots, **kw)

    def close(self) -> None:
        """Stop the native worker thread (also done when collected or at exit); the executor cannot run
        afterwards."""
        if self.worker is not None:
            self.worker.close()

    def check_errors(self) -> None:
        if self.worker is not None:
            self.worker.check()

    def set_gpu_timing(self, on: bool) -> None:
        self.cache.time_gpu = bool(on)

    def wait_for_fills(self) -> None:
        if self.slots is not None:
            self.slots.wait_all()

    # ---- the executor call ------------------------------------------------------------------------------
    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.on_route is not None:
            self.on_route(layer, ids, weights)
        if self.worker is not None and self.worker.closed:
            raise HotExpertsError("this executor was closed (its CPU worker is stopped)")
        T = x.shape[0]
        if self._worker_takes(T):                            # a decode or verify step, routing in the mailbox
            if self._pending_step is not None:               # an eager T=1 forward without before_step
                self._take_pending()
            return self.worker(layer, x, ids, weights)
        verify = T > 1 and self._announced                   # a T-token decode (verify) step: not a prompt
        prompt = T > 1 and not verify                        # a prompt chunk
        self._prompt, self._verify = self._prompt or prompt, self._verify or verify
        if T > 1 and (self._pending_step is not None or self._stash is not None):
            self.flush()                                     # the last decode step's bookkeeping first
        if T > self.pp_bypass and self.stream is not None and self.stream.wants(layer, ids):
            return self.stream(layer, x, ids, weights)
        if self.prefetch is not None and T == 1:             # before this layer's CPU work: fills overlap it
            self.prefetch.before_layer(layer)
            self.prefetch.after_route(self.step, layer, x)
        return self.sync(layer, x, ids, weights, self.step, prompt)

    def _worker_takes(self, T: int) -> bool:
        """The worker runs decode steps (T = 1) and verify steps (T > 1 announced by before_step()) that fit
        its mailbox; prompt chunks keep their own paths."""
        if self.worker is None:
            return False
        return T == 1 or (self._announced and T <= self.worker.max_tokens)

    # ---- step bookkeeping -------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Take the previous step's routing from the mailbox before the new step overwrites it; end_step()
        then accounts it while the new step runs on the device (CUDA worker decode)."""
        t0 = time.perf_counter()
        self._take_pending()
        self._announced = True
        self.host_s += time.perf_counter() - t0 - self._wait_s
        self._flush_wait()

    def end_step(self) -> None:
        t0 = time.perf_counter()
        decode = self.worker is not None and not self._prompt and not self._verify   # routing in the mailbox
        if decode and self.defer and self._announced:        # deferred: record now, account next step
            self._record_step()
            self._pending_step = self.step
            stash, self._stash = self._stash, None
            if stash is not None:                            # the previous step, while this one runs
                self._close(*stash)
        else:
            self._flush()
            got = self._take_now() if decode else None
            self._close(self.step, self._prompt, got)
        self.step += 1
        self._prompt, self._announced, self._verify = False, False, False
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
        self._sync(self._step_done)                          # the step's mailbox writes are complete
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
            self.worker.account(step, got)
        if self.stream is not None and self.stream.has_routes():
            self.stream.observe(step)
        if self.cache_stats is not None:
            self.cache_stats.end_step()
        if self.stream is not None:
            self.stream.end_step()
        if self.slots is not None:
            self.cache.rebalance(step, prompt)

    # ---- reports ----------------------------------------------------------------------------------------
    def stats(self) -> dict | None:
        """Per-layer cache statistics (engine.stats()["cache"]); None when not collected."""
        self.flush()
        if self.cache_stats is None:
            return None
        d = self.cache_stats.to_dict()
        d["slots"] = 0 if self.slots is None else self.slots.num_slots
        d["policy"] = None if self.planner is None else self.planner.policy.name
        d["decode"] = "worker" if self.worker is not None else "sync"
        d["gpu_misses"] = self.gpu_misses
        d["gpu_miss_count"] = 0 if self.worker is None else self.worker.gpu_miss_count
        d["gpu_share"] = None if self.worker is None else self.worker.share
        d["host_s"], d["sync_s"] = self.host_s, self.sync_s
        d["prefetch"] = None if self.prefetch is None else self.prefetch.stats()
        return d

    def export_profile(self, path: str) -> str:
        """Write the current hot set (and the policy's counts) as a --moe-profile file."""
        self.flush()
        if self.planner is not None:
            prof = self.planner.export_profile(self.slots.residency)
        else:
            E = self.store.num_experts
            hot = self.slots.hot_set() if self.slots is not None else {}
            prof = Profile(E, {l: [1.0 if e in hot.get(l, ()) else 0.0 for e in range(E)]
                               for l in self.store.layers}, hot)
        return str(save_profile(path, prof))

