"""The prompt path's pieces: StagingPools (two device pools, each holding every expert of one layer, filled
on a copy stream: the double buffer a prompt chunk streams layers through) and PromptCost (the measured
choice between streaming a layer and computing a chunk's misses on the CPU). Used by HybridExecutor.
A layer's experts reach a pool by one cudaMemcpyAsync per part and run of consecutive experts, or, when
they are scattered (a cache holding most of them: many runs), by one GPU gather launch per part that
reads the pinned store over PCIe (kernels/triton_gather.py; KernelOptions.stage_copy=memcpy|gather|auto).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from hotexperts.experts.slots import alloc_like, parts
from hotexperts.kernels.gpu_moe import triton_available
from hotexperts.weights import QuantizedWeight

GATHER_MIN_RUNS = 4          # more runs of consecutive experts than this: one gather launch per part instead


@dataclass
class PromptCost:
    """Seconds to copy one layer's experts vs. to compute a prompt batch's misses on the CPU."""

    h2d_bytes_per_s: float = 40e9          # pinned H2D (MACHINE.md: ~55 GB/s on the H200 host)
    cpu_flops: float = 1.0e12              # CPU expert throughput on batches (measure() refines it)

    def stream_s(self, layer_bytes: int) -> float:
        return layer_bytes / self.h2d_bytes_per_s

    def cpu_s(self, T: int, K: int, expert_params: int, miss_frac: float) -> float:
        return 2.0 * T * K * expert_params * miss_frac / self.cpu_flops

    @classmethod
    def measure(cls, store, stage, cpu_kernel, K: int, T: int = 64) -> PromptCost:
        """Time one whole-layer H2D into staging pool 0 and one cpu_moe call of T tokens (CUDA only)."""
        le = store.layer(store.layers[0])
        w13, w2 = stage.pools[0]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for d, s in zip(parts(w13) + parts(w2), parts(le.w13) + parts(le.w2), strict=True):
            d.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        h2d = stage.layer_bytes / max(time.perf_counter() - t0, 1e-9)
        D, E = le.w2.shape[1], store.num_experts
        x = torch.randn(T, D).to(torch.bfloat16 if isinstance(le.w13, QuantizedWeight) else le.w13.dtype)
        ids = torch.randint(0, E, (T, K))
        w = torch.full((T, K), 1.0 / K, dtype=x.dtype)
        cpu_kernel(x, ids, w, le, None)                      # warm-up (first call may build / page in)
        t0 = time.perf_counter()
        cpu_kernel(x, ids, w, le, None)
        flops = 2.0 * T * K * stage.expert_params / max(time.perf_counter() - t0, 1e-9)
        return cls(h2d_bytes_per_s=h2d, cpu_flops=flops)


class StagingPools:
    """Two device pools, each able to hold every expert of one layer, filled on a copy stream (double
    buffer). A prefetch may copy only some experts (those without a slot): each lands at its own index and
    acquire() returns the table that marks which are there."""

    def __init__(self, store, device, stage_copy: str = "auto"):
        self.store, self.device, self.stage_copy = store, device, stage_copy
        self.cuda = device.type == "cuda"
        proto = store.layer(store.layers[0])
        self.pools = [(alloc_like(proto.w13, store.num_experts, device),
                       alloc_like(proto.w2, store.num_experts, device)) for _ in range(2)]
        self.layer_bytes = store.expert_nbytes * store.num_experts
        self.expert_params = _expert_params(proto)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready = [None, None]                            # fill-complete events
        self.read = [None, None]                             # last-read events
        self.holds: dict[int, int] = {}                      # layer -> pool index (this forward)
        self.tables: list = [None, None]                     # per pool: expert -> index table, None = all
        self.turn = 0

    @staticmethod
    def nbytes(store) -> int:
        return 2 * store.expert_nbytes * store.num_experts

    def prefetch(self, layer: int, experts: list[int] | None = None) -> int:
        """Queue the copy of `layer`'s experts (all, or the sorted list `experts`) into the next pool, at
        their own expert index; -> pool index. A layer already held this forward is not copied again."""
        if layer in self.holds:
            return self.holds[layer]
        i, self.turn = self.turn, 1 - self.turn
        self.holds = {l: p for l, p in self.holds.items() if p != i}
        self.holds[layer] = i
        self.tables[i] = None if experts is None else self._table(experts)
        src = self.store.layer(layer)
        pairs = list(zip(parts(self.pools[i][0]) + parts(self.pools[i][1]), parts(src.w13) + parts(src.w2),
                         strict=True))
        runs = [(0, self.store.num_experts)] if experts is None else _runs(experts)
        if not self.cuda:
            _copy_runs(pairs, runs, non_blocking=False)
            return i
        gather = self._gather_ok(layer, runs) and all(t.is_contiguous() for pair in pairs for t in pair)
        with torch.cuda.stream(self.stream):
            if self.read[i] is not None:
                self.stream.wait_event(self.read[i])         # never overwrite a pool a step still reads
            if gather:
                from hotexperts.kernels.triton_gather import gather_experts  # Triton: only on CUDA

                idx = self._index(experts)                   # on the copy stream, before its gathers
                for dst, src in pairs:
                    gather_experts(dst, src, idx)            # one launch per part, not one copy per run
            else:
                _copy_runs(pairs, runs, non_blocking=True)
            self.ready[i] = torch.cuda.Event()
            self.ready[i].record(self.stream)
        return i

    def _gather_ok(self, layer: int, runs) -> bool:
        """Scattered experts of a pinned layer: the GPU gathers them itself (kernels/triton_gather.py)
        when they make more than GATHER_MIN_RUNS runs (stage_copy "memcpy" / "gather" overrides)."""
        mode = self.stage_copy
        if mode == "memcpy" or not self.store.layer_pinned(layer):
            return False
        return triton_available() and (mode == "gather" or len(runs) > GATHER_MIN_RUNS)

    def _index(self, experts: list[int] | None) -> torch.Tensor:
        ids = range(self.store.num_experts) if experts is None else experts
        t = torch.tensor(list(ids), dtype=torch.long).pin_memory()
        return t.to(self.device, non_blocking=True)

    def _table(self, experts: list[int]) -> torch.Tensor:
        """[E] int32: e for the copied experts, -1 for the others (gpu_moe's slot_of over this pool)."""
        t = torch.full((self.store.num_experts,), -1, dtype=torch.int32)
        t[torch.as_tensor(experts, dtype=torch.long)] = torch.as_tensor(experts, dtype=torch.int32)
        if self.cuda:                                        # pageable H2D would wait for the stream
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def acquire(self, layer: int, experts: list[int] | None = None):
        """-> (w13, w2, slot_of or None): the pool holding `layer`, once its copy landed (stream-ordered)."""
        i = self.prefetch(layer, experts)
        if self.cuda and self.ready[i] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[i])
        return (*self.pools[i], self.tables[i])

    def release(self, layer: int) -> None:
        if self.cuda:
            i = self.holds[layer]
            self.read[i] = torch.cuda.Event()
            self.read[i].record(torch.cuda.current_stream(self.device))

    def end_step(self) -> None:
        self.holds.clear()


def staging_or_none(store, device, stage_copy: str = "auto"):
    try:
        return StagingPools(store, device, stage_copy)
    except torch.cuda.OutOfMemoryError:
        warnings.warn("out of VRAM for the prompt staging pools; prompt batches use the hybrid path",
                      RuntimeWarning, stacklevel=3)
        return None


def _runs(experts: list[int]) -> list[tuple[int, int]]:
    """Sorted expert ids -> [start, stop) runs of consecutive ids (one copy per part and run)."""
    runs: list[tuple[int, int]] = []
    for e in experts:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def _copy_runs(pairs, runs, non_blocking: bool) -> None:
    for dst, src in pairs:
        for a, b in runs:
            dst[a:b].copy_(src[a:b], non_blocking=non_blocking)


def _expert_params(le) -> int:
    s13, s2 = le.w13.shape, le.w2.shape
    return s13[1] * s13[2] + s2[1] * s2[2]
