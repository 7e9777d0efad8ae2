"""PromptStream: prompt chunks over `pp_bypass` tokens, computed on the GPU by streaming each layer's missing
experts into a staging pool (experts/staging.py) while the previous layer computes.

    stream = PromptStream(cache, stage, prompt_mode="auto", prompt_cost=None)
    stream.wants(layer, ids [T,K]) -> bool     stream this layer? ("stream": always; "auto": when copying
                                               the missing experts (PromptCost.stream_s) beats computing the
                                               chunk's misses on the CPU (PromptCost.cpu_s); measured once)
    y = stream(layer, x [T,D], ids, weights)   resident experts from their slots, the others from a pool
                                               that received only them, both in ONE gpu_moe pass; no host
                                               sync. Pools smaller than the missing experts (a tight VRAM
                                               plan): one pass per part, summed in fp32
    stream.observe(step)                       after the forward: the streamed layers' routing to the planner
                                               (one device read per run of layers with the same chunk size)
    stream.end_step()                          the pools are free for the next forward

The next part's copy (this layer's next part, else the next MoE layer's first) is queued before this
part computes, so copies overlap compute. The planner sees
the routing at end_step in layer order, as the synchronous path would have shown it.
"""

from __future__ import annotations

import torch

from hotexperts.experts.cache import ExpertCache
from hotexperts.experts.staging import PromptCost, StagingPools
from hotexperts.experts.sync_step import slot_hits


class PromptStream:
    def __init__(self, cache: ExpertCache, stage: StagingPools, prompt_mode: str = "auto",
                 prompt_cost: PromptCost | None = None):
        self.cache, self.stage, self.prompt_mode = cache, stage, prompt_mode
        self.prompt_cost = prompt_cost or PromptCost()
        self._measured = prompt_cost is not None
        layers = cache.moe_layers
        self.next_layer = dict(zip(layers, layers[1:], strict=False))
        self._routes: list = []                              # streamed prompt layers awaiting observe

    def wants(self, layer: int, ids: torch.Tensor) -> bool:
        if self.prompt_mode == "hybrid":
            return False
        if self.prompt_mode == "stream":
            return True
        c = self.cache
        T, K = ids.shape
        if c.cuda and not self._measured:
            self.prompt_cost = PromptCost.measure(c.store, self.stage, c.cpu_moe, K)
            self._measured = True
        missing = self._not_resident(layer)
        n_miss = c.E if missing is None else len(missing)
        cost = self.prompt_cost
        copy_bytes = self.stage.layer_bytes * n_miss // c.E
        return cost.stream_s(copy_bytes) < cost.cpu_s(T, K, self.stage.expert_params, n_miss / c.E)

    def _not_resident(self, layer: int) -> list[int] | None:
        """Experts of `layer` without a usable slot (the ones a streamed prompt chunk copies); None = all."""
        c = self.cache
        if c.resident_count(layer) == 0:
            return None
        return torch.nonzero(c.slots.mirror(layer) < 0).flatten().tolist()

    def __call__(self, layer, x, ids, weights) -> torch.Tensor:
        c = self.cache
        T, K = ids.shape
        missing = self._not_resident(layer)
        staged = self.stage.split(missing)                        # parts a pool holds ([] = all resident)
        resident = None if missing is None else (c.slots.w13, c.slots.w2, c.slots.slot_of(layer),
                                                 c.slots.used_slots(layer))
        y = None
        for j, part in enumerate(staged):
            w13, w2, table = self.stage.acquire(layer, part, j)
            self._prefetch_after(layer, staged, j)                # copies while this part computes
            more = (resident,) if resident is not None and j == 0 else ()
            out = c.gpu_moe(x, ids, weights, w13, w2, table, used=self._pool_used(part), more=more,
                            **c.variant(layer))
            self.stage.release(layer, j)
            y = out if len(staged) == 1 else (out.float() if y is None else y + out.float())
        if not staged:                                            # every expert resident: the slots only
            y = c.gpu_moe(x, ids, weights, *resident[:3], used=resident[3], **c.variant(layer))
        if resident is not None:
            c.slots.mark_read(layer)
        c.count(layer, T * K, 0)
        if layer in c.managed:
            self._routes.append((layer, ids.clone(), T))         # observed at end_step (one sync)
        return y.to(x.dtype)

    def _prefetch_after(self, layer: int, staged: list, j: int) -> None:
        """Queue the next part's copy: this layer's part j + 1, else the next MoE layer's first part."""
        if j + 1 < len(staged):
            self.stage.prefetch(layer, staged[j + 1], j + 1)
            return
        nxt = self.next_layer.get(layer)
        if nxt is not None:
            first = self.stage.split(self._not_resident(nxt))
            if first:
                self.stage.prefetch(nxt, first[0], 0)

    def _pool_used(self, part: list[int] | None) -> list[int]:
        """The pool indices a staged part occupies (gpu_moe's `used`)."""
        if part is None:
            return list(range(self.cache.E))
        return list(part) if self.stage.whole else list(range(len(part)))

    def has_routes(self) -> bool:
        return bool(self._routes)

    def observe(self, step: int) -> None:
        """The streamed prompt layers' routing, in layer order, as the planner would have seen it: one device
        read and one observe_step per run of layers with the same chunk size (one run per forward)."""
        routes, self._routes = self._routes, []
        while routes:
            T = routes[0][2]
            n = next((i for i, r in enumerate(routes) if r[2] != T), len(routes))
            self._observe_routes(step, routes[:n], T)
            routes = routes[n:]

    def _observe_routes(self, step: int, routes: list, T: int) -> None:
        c = self.cache
        layers = [l for l, _, _ in routes]
        ids = torch.stack([i.reshape(-1) for _, i, _ in routes]).cpu()          # [n, T*K], one device read
        hits = torch.stack([slot_hits(c, l, row, row >= 0) for l, row in zip(layers, ids, strict=True)])
        c.planner.observe_step(step, layers, ids.numpy(), hits.numpy(), True, tokens=T)

    def end_step(self) -> None:
        self.stage.end_step()
