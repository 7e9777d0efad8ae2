"""The prompt path's pieces: StagingPools (device pools filled on a copy stream: the double buffer a prompt
chunk streams layers through) and PromptCost (the measured choice between streaming a layer and computing a
chunk's misses on the CPU). Used by HybridExecutor.

    stage = StagingPools(store, device, stage_copy, layout=Staging(pools=2, experts=C))   # C <= E
    stage.split(missing | None) -> [part, ...]   the experts to stage, in parts of at most C (None = a
                                                 whole layer, when C == E)
    i = stage.prefetch(layer, part, index=0)     queue part `index` of `layer` into the next pool
    w13, w2, slot_of = stage.acquire(layer, part, index=0)   the pool once its copy landed
    stage.release(layer, index=0)                the current stream's reads of it are queued
    StagingPools.nbytes(store, layout)           device bytes of the pools (the VRAM plan's "staging")

The layout comes from the VRAM plan (experts/solve.py): two pools of a whole layer each when they fit,
else two pools of C < E experts, where a layer's missing experts stream in ceil(missing / C) parts.
A whole-layer pool keeps each expert at its own index; a part lands compacted at indices 0..n-1 and its
slot_of table says where. Experts reach a pool by one cudaMemcpyAsync per weight part and run of
consecutive experts, or, when they are scattered (a cache holding most of them: many runs) and the pool
is a whole layer, by one GPU gather launch per weight part that reads the pinned store over PCIe
(kernels/triton_gather.py, which keeps indices; KernelOptions.stage_copy=memcpy|gather|auto).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from hotexperts.experts.placement import Staging
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
        """Time one H2D filling staging pool 0 and one cpu_moe call of T tokens (CUDA only)."""
        le = store.layer(store.layers[0])
        w13, w2 = stage.pools[0]
        n = stage.capacity
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for d, s in zip(parts(w13) + parts(w2), parts(le.w13) + parts(le.w2), strict=True):
            d.copy_(s[:n], non_blocking=True)
        torch.cuda.synchronize()
        h2d = n * store.expert_nbytes / max(time.perf_counter() - t0, 1e-9)
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
    """Device pools of `layout.experts` experts each (module doc), filled on a copy stream. A prefetch may
    copy only some experts (those without a slot); acquire() returns the table that marks where they are."""

    def __init__(self, store, device, stage_copy: str = "auto", layout: Staging | None = None):
        self.store, self.device, self.stage_copy = store, device, stage_copy
        self.cuda = device.type == "cuda"
        E = store.num_experts
        layout = layout or Staging(2, E)
        self.capacity, n = min(E, layout.experts), max(1, layout.pools)
        proto = store.layer(store.layers[0])
        self.pools = [(alloc_like(proto.w13, self.capacity, device),
                       alloc_like(proto.w2, self.capacity, device)) for _ in range(n)]
        self.layer_bytes = store.expert_nbytes * E
        self.expert_params = _expert_params(proto)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready = [None] * n                              # fill-complete events
        self.read = [None] * n                               # last-read events
        self.holds: dict[tuple[int, int], int] = {}          # (layer, part index) -> pool (this forward)
        self.tables: list = [None] * n                       # per pool: expert -> index table, None = all
        self.turn = 0

    @property
    def whole(self) -> bool:
        """A pool holds a whole layer (experts at their own index)."""
        return self.capacity >= self.store.num_experts

    @staticmethod
    def nbytes(store, layout: Staging | None = None) -> int:
        """Device bytes of the pools; layout None = two whole layers (the most staging wants)."""
        layout = layout or Staging(2, store.num_experts)
        return layout.nbytes(store.expert_nbytes)

    def split(self, experts: list[int] | None) -> list[list[int] | None]:
        """The experts to stage (None = all of a layer) in parts a pool holds, in order; [] = none."""
        if experts is None and self.whole:
            return [None]
        todo = list(range(self.store.num_experts)) if experts is None else experts
        return [todo[i:i + self.capacity] for i in range(0, len(todo), self.capacity)]

    def prefetch(self, layer: int, experts: list[int] | None = None, index: int = 0) -> int:
        """Queue the copy of part `index` of `layer` (all its experts, or the sorted list `experts`, at most
        a pool's capacity) into the next pool; -> pool index. A part already held this forward is not
        copied again."""
        key = (layer, index)
        if key in self.holds:
            return self.holds[key]
        i, self.turn = self.turn, (self.turn + 1) % len(self.pools)
        self.holds = {k: p for k, p in self.holds.items() if p != i}
        self.holds[key] = i
        if experts is not None and len(experts) > self.capacity:
            raise ValueError(f"a staging pool holds {self.capacity} experts, asked for {len(experts)}")
        self.tables[i] = None if experts is None else self._table(experts)
        src = self.store.layer(layer)
        pairs = list(zip(parts(self.pools[i][0]) + parts(self.pools[i][1]), parts(src.w13) + parts(src.w2),
                         strict=True))
        runs = [(0, self.store.num_experts)] if experts is None else _runs(experts)
        at = None if self.whole else 0                       # a part lands compacted at 0..n-1
        if not self.cuda:
            _copy_runs(pairs, runs, non_blocking=False, at=at)
            return i
        gather = self.whole and self._gather_ok(layer, runs) and all(
            t.is_contiguous() for pair in pairs for t in pair)
        with torch.cuda.stream(self.stream):
            if self.read[i] is not None:
                self.stream.wait_event(self.read[i])         # never overwrite a pool a step still reads
            if gather:
                from hotexperts.kernels.triton_gather import gather_experts  # Triton: only on CUDA

                idx = self._index(experts)                   # on the copy stream, before its gathers
                for dst, src in pairs:
                    gather_experts(dst, src, idx)            # one launch per part, not one copy per run
            else:
                _copy_runs(pairs, runs, non_blocking=True, at=at)
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
        """[E] int32: the pool index of each copied expert (its own id in a whole-layer pool, its rank in a
        part), -1 for the others (gpu_moe's slot_of over this pool)."""
        t = torch.full((self.store.num_experts,), -1, dtype=torch.int32)
        at = experts if self.whole else range(len(experts))
        t[torch.as_tensor(experts, dtype=torch.long)] = torch.as_tensor(list(at), dtype=torch.int32)
        if self.cuda:                                        # pageable H2D would wait for the stream
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def acquire(self, layer: int, experts: list[int] | None = None, index: int = 0):
        """-> (w13, w2, slot_of or None): the pool holding part `index` of `layer`, once its copy landed
        (stream-ordered)."""
        i = self.prefetch(layer, experts, index)
        if self.cuda and self.ready[i] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[i])
        return (*self.pools[i], self.tables[i])

    def release(self, layer: int, index: int = 0) -> None:
        if self.cuda:
            i = self.holds[(layer, index)]
            self.read[i] = torch.cuda.Event()
            self.read[i].record(torch.cuda.current_stream(self.device))

    def end_step(self) -> None:
        self.holds.clear()


def staging_or_none(store, device, stage_copy: str = "auto", layout: Staging | None = None):
    try:
        return StagingPools(store, device, stage_copy, layout)
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


def _copy_runs(pairs, runs, non_blocking: bool, at: int | None = None) -> None:
    """Each run [a, b) of src to dst[a:b] (at None) or packed from index `at` on (a pool of a part)."""
    for dst, src in pairs:
        pos = at
        for a, b in runs:
            lo = a if pos is None else pos
            dst[lo:lo + b - a].copy_(src[a:b], non_blocking=non_blocking)
            pos = None if pos is None else pos + b - a


def _expert_params(le) -> int:
    s13, s2 = le.w13.shape, le.w2.shape
    return s13[1] * s13[2] + s2[1] * s2[2]
