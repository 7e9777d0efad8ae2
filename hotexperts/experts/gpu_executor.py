"""GpuExecutor: every routed expert on the device, one fused gpu_moe call per layer (the `gpu` placement's
executor on CUDA). No host synchronisation, so a decode step is CUDA-graph capturable (`graph_safe` when the
Triton kernels are available; the torch fallback's "loop" mode syncs).

    ex = GpuExecutor(store, device, options=KernelOptions())
    y = ex(layer, x [T,D], ids [T,K], weights [T,K]) -> [T, D]
"""

from __future__ import annotations

import functools

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.executor import ExpertExecutor
from hotexperts.experts.cache import expert_variant
from hotexperts.kernels.gpu_moe import gpu_moe, triton_available


class GpuExecutor(ExpertExecutor):
    def __init__(self, store, device, gpu_kernel=None, options: KernelOptions = DEFAULT_KERNELS, plan=None):
        self.device, self.plan = torch.device(device), plan
        self.w13 = {l: store.layer(l).w13.to(self.device) for l in store.layers}     # [E, 2I, D]
        self.w2 = {l: store.layer(l).w2.to(self.device) for l in store.layers}       # [E, D, I]
        chunk = (plan.dequant_chunk or None) if plan is not None else None     # the VRAM plan's chunk
        self.gpu_moe = gpu_kernel or functools.partial(gpu_moe, backend=options.gpu_moe, dequant_chunk=chunk)
        self.graph_safe = self.device.type == "cuda" and triton_available()
        self.verify_graph_safe = self.graph_safe                 # T > 1 calls read every slot: no sync
        self._all = list(range(store.num_experts))
        self.variant = {l: expert_variant(store.layer(l), self.device) for l in store.layers}

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.on_route is not None:
            self.on_route(layer, ids, weights)
        used = self._all if x.shape[0] > 1 else None             # prompt: every slot may be read, no sync
        return self.gpu_moe(x, ids, weights, self.w13[layer], self.w2[layer], used=used,
                            **self.variant[layer])
