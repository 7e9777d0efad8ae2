"""ExpertCache: the parts of one hybrid placement that the executor's modes share (experts/hybrid.py).

    cache = ExpertCache(store, device, slots, planner, stats, options, dequant_chunk=None)
                                            (dequant_chunk: the VRAM plan's, experts/solve.py)
    cache.store, .device, .cuda, .slots (SlotCache | None), .planner (CachePlanner | None),
    cache.stats (CacheStats | None), .options (KernelOptions, CPU threads fixed), .cpu_moe, .gpu_moe (the
    kernels with those options bound), .moe_layers, .E, .managed (layers the planner manages)
    cache.resident_count(layer) -> int       experts of `layer` with a usable slot (0 without slots)
    cache.count(layer, hits, misses)         per-layer routing counts (no-op without stats)
    cache.observe(step, layer, ids, prompt, tokens, hits)   the planner's observe, managed layers only
    cache.rebalance(step, prompt)            publish completed fills, then issue the planner's swaps
    cache.variant(layer) -> dict             gpu_moe's act / b13 keywords for the layer's expert variant
                                             ({} for plain experts; b13 [E, 2I] kept whole on the device)

Only the slot cache changes residency; the planner reads it (experts/residency.py).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.kernels.cpu_moe import cpu_moe
from hotexperts.kernels.gpu_moe import gpu_moe


def expert_variant(le, device) -> dict:
    """gpu_moe's keywords for one layer's experts (weights.LayerExperts): {} when plain silu(g) * u."""
    if le.plain:
        return {}
    return {"act": le.act, "b13": None if le.b13 is None else le.b13.to(device)}


def pinned_threads(options: KernelOptions, beside_gpu: bool) -> KernelOptions:
    """options with the CPU thread count fixed: beside a GPU its OpenMP threads leave one core to the Python
    thread that drives the GPU (spinning workers on every core starve it: launches slow down for the whole
    step)."""
    return dataclasses.replace(options, cpu_threads=options.threads(beside_gpu))


class ExpertCache:
    def __init__(self, store, device, slots=None, planner=None, stats=None,
                 options: KernelOptions = DEFAULT_KERNELS, cpu_kernel=None, gpu_kernel=None,
                 dequant_chunk: int | None = None):
        self.store, self.device = store, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.slots, self.planner, self.stats = slots, planner, stats
        self.options = pinned_threads(options, beside_gpu=self.cuda)
        self.cpu_moe = cpu_kernel or functools.partial(cpu_moe, options=self.options)
        self.gpu_moe = gpu_kernel or functools.partial(gpu_moe, backend=self.options.gpu_moe,
                                                       dequant_chunk=dequant_chunk or None)
        self.moe_layers = list(store.layers)
        self.E = store.num_experts
        self.managed = set(planner.layers) if planner is not None else set()
        self.time_gpu = False                       # per-layer GPU timing with CUDA events (--stats)
        self._variants = {l: expert_variant(store.layer(l), self.device) for l in self.moe_layers}

    def variant(self, layer: int) -> dict:
        return self._variants[layer]

    def has_slots(self, layer: int) -> bool:
        return self.slots is not None and layer in self.slots.row

    def resident_count(self, layer: int) -> int:
        return self.slots.resident_count(layer) if self.has_slots(layer) else 0

    def count(self, layer: int, hits: int, misses: int) -> None:
        if self.stats is not None:
            self.stats.routed(layer, hits, misses)

    def observe(self, step: int, layer: int, ids: list[int], prompt: bool, tokens: int, hits: list[bool]):
        if layer in self.managed:
            self.planner.observe(step, layer, ids, prompt, tokens=tokens, hits=hits)

    def rebalance(self, step: int, prompt: bool) -> None:
        """Publish completed fills, then issue the planner's swaps for this step (bounded)."""
        self.slots.poll()
        if self.planner is not None:
            swaps = self.planner.plan(step, prompt, self.slots.residency)
            if swaps:
                self.slots.issue(swaps)
                self.slots.poll()
