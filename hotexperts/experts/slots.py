"""SlotCache: expert slots on the GPU, an expert->slot table per MoE layer with its host mirror, fills on a
copy stream guarded by events. The one owner of residency: its `residency` (experts/residency.py: resident
and pending sets, what the planner reads) and its tables change together, here and nowhere else.

One pool of S slots is shared by every MoE layer (all layers' experts have one shape), so a policy can give
hot layers more slots than cold ones:
    w13 [S, 2I, D], w2 [S, D, I]          tensors or QuantizedWeight parts, in the store's format
    table [Lm, E] int32 on the device      slot_of(layer) = table[row] (slot or -1), read by gpu_moe
    host  [Lm, E] int32 on the CPU         the mirror the hybrid executor splits hits / misses with

Rules (both kept here, not by callers):
- A slot is usable only after its fill event completed: `issue(swaps)` only starts copies (the loads become
  pending); `poll()` (called at step boundaries, never blocking) publishes completed fills in the tables and
  makes them resident.
- A slot read by an in-flight step is never refilled: the executor calls `mark_read(layer)` after launching
  the layer's GPU part (records that layer's "last read" event on the compute stream); a fill into a slot that
  layer owned waits on it (device-side `wait_event` on CUDA; deferred until `query()` is True otherwise).
- An evicted expert leaves the tables (and residency.resident) at once, before its slot is overwritten.

On CPU copies are synchronous and events trivial. Test hook: `event_factory(kind)` with kind "fill" | "read"
returns objects with record(stream=None) / query() / synchronize() (a fake that stays False delays fills).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from hotexperts.experts.policies.base import Swap
from hotexperts.experts.residency import Residency
from hotexperts.weights import QuantizedWeight, Weight


class DoneEvent:
    """A trivially completed event (CPU: copies are synchronous)."""

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def parts(w: Weight) -> list[torch.Tensor]:
    """The tensors a weight is made of (indexable by expert/slot on dim 0)."""
    if isinstance(w, QuantizedWeight):
        return [t for t in (w.q, w.scale, w.zero) if t is not None]
    return [w]


def alloc_like(w: Weight, n: int, device) -> Weight:
    """An uninitialised pool of `n` entries shaped like w[0], on `device`."""
    def new(t):
        return None if t is None else torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=device)

    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.fmt, new(w.q), new(w.scale), new(w.zero))
    return new(w)


@dataclass
class Fill:
    layer: int
    expert: int
    slot: int
    evict: int | None
    event: object = None      # fill completion; None = copy not started yet (waiting for `guard`)
    guard: object = None      # last-read event of the layer that owned the slot


class SlotCache:
    def __init__(self, store, layers, num_slots: int, device, *, stats=None, event_factory=None):
        self.store, self.layers, self.device = store, list(layers), torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stats = stats
        self.residency = Residency(self.layers, store.num_experts)
        self.row = {l: i for i, l in enumerate(self.layers)}
        self.num_experts = store.num_experts
        self.event_factory = event_factory or self._default_event
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.num_slots = self._alloc_pool(num_slots)
        E, Lm = self.num_experts, len(self.layers)
        self.table = torch.full((Lm, E), -1, dtype=torch.int32, device=self.device)   # [Lm, E]
        self.host = torch.full((Lm, E), -1, dtype=torch.int32)                          # [Lm, E]
        self.count = [0] * Lm                                   # committed experts per layer
        self.owner: list[int | None] = [None] * self.num_slots  # layer that last owned each slot
        self.free = list(range(self.num_slots - 1, -1, -1))
        self.last_read = {l: self.event_factory("read") for l in self.layers}
        self.fills: list[Fill] = []                             # issued, not yet committed
        self._filling: set[tuple[int, int]] = set()             # (layer, expert) of self.fills
        self._staging = None

    def _default_event(self, kind: str):
        return torch.cuda.Event() if self.cuda else DoneEvent()

    def _alloc_pool(self, n: int) -> int:
        """Allocate the slot pool; on out-of-memory shrink it (with a warning) instead of failing."""
        proto = self.store.layer(self.layers[0])
        while True:
            try:
                self.w13 = alloc_like(proto.w13, n, self.device)     # [S, 2I, D]
                self.w2 = alloc_like(proto.w2, n, self.device)       # [S, D, I]
                return n
            except torch.cuda.OutOfMemoryError:
                self.w13 = self.w2 = None
                smaller = int(n * 0.8)
                warnings.warn(f"out of VRAM allocating {n} expert slots; shrinking the cache to {smaller}",
                              RuntimeWarning, stacklevel=3)
                n = smaller

    # ---- queries used by the executor (host only, no sync) -------------------------------------------
    def slot_of(self, layer: int) -> torch.Tensor:
        return self.table[self.row[layer]]                      # [E] int32, device

    def mirror(self, layer: int) -> torch.Tensor:
        return self.host[self.row[layer]]                       # [E] int32, CPU

    def resident_count(self, layer: int) -> int:
        return self.count[self.row[layer]]

    def resident(self, layer: int) -> list[int]:
        return torch.nonzero(self.mirror(layer) >= 0).flatten().tolist()

    def used_slots(self, layer: int) -> list[int]:
        """Slots holding this layer's usable experts (host mirror; no device read)."""
        m = self.mirror(layer)
        return m[m >= 0].tolist()

    def mark_read(self, layer: int) -> None:
        """Record that the layer's GPU part (queued on the current stream) reads its slots up to here."""
        ev = self.last_read[layer]
        if self.cuda and isinstance(ev, torch.cuda.Event):
            ev.record(torch.cuda.current_stream(self.device))
        else:
            ev.record()

    def mark_read_all(self) -> None:
        """Every layer's slots are read by the work queued so far (a whole graphed decode step): one event."""
        ev = self.event_factory("read")
        if self.cuda and isinstance(ev, torch.cuda.Event):
            ev.record(torch.cuda.current_stream(self.device))
        else:
            ev.record()
        for l in self.layers:
            self.last_read[l] = ev

    # ---- swaps ---------------------------------------------------------------------------------------
    def issue(self, swaps) -> list[Swap]:
        """Start the fills for `swaps`; returns those accepted (others are skipped: no slot, or duplicate)."""
        accepted = []
        for layer, load, evict in swaps:
            if self._start(layer, load, evict):
                accepted.append((layer, load, evict))
        return accepted

    def _start(self, layer: int, load: int | None, evict: int | None) -> bool:
        r = self.row[layer]
        if load is None:                                        # free evict's slot: it moves to another layer
            if evict is None or self.host[r, evict] < 0:
                return False
            self.free.append(int(self.host[r, evict]))
            self._unpublish(layer, evict)
            return True
        if (layer, load) in self._filling or self.host[r, load] >= 0:     # on its way, or resident already
            return False
        if evict is not None and self.host[r, evict] >= 0:
            slot = int(self.host[r, evict])
            self._unpublish(layer, evict)
        elif self.free:
            slot = self.free.pop()
        else:                                                   # cannot happen when capacities match slots
            return False
        guard = self.last_read[self.owner[slot]] if self.owner[slot] is not None else None
        self.owner[slot] = layer
        fill = Fill(layer, load, slot, evict, guard=guard)
        self.fills.append(fill)
        self._filling.add((layer, load))
        self.residency.begin_fill(layer, load)
        self._try_copy(fill)
        if self.stats is not None:
            self.stats.swap(layer, self.store.expert_nbytes)
        return True

    def _unpublish(self, layer: int, expert: int) -> None:
        r = self.row[layer]
        self.host[r, expert] = -1
        _set(self.table, r, expert, -1)                         # ordered on the compute stream
        self.count[r] -= 1
        self.residency.evict(layer, expert)

    def _try_copy(self, fill: Fill) -> None:
        """Issue the copy now if the slot is safe to overwrite (device-side wait on CUDA)."""
        g = fill.guard
        device_wait = self.cuda and isinstance(g, torch.cuda.Event)
        if g is not None and not device_wait and not g.query():
            return                                              # a step may still read the slot: defer
        src = self.store.layer(fill.layer)
        pairs = list(zip(parts(self.w13) + parts(self.w2), parts(src.w13) + parts(src.w2), strict=True))
        fill.event = self.event_factory("fill")
        if not self.cuda:
            for dst, s in pairs:
                dst[fill.slot].copy_(s[fill.expert])
            fill.event.record()
            return
        with torch.cuda.stream(self.copy_stream):
            if device_wait:
                self.copy_stream.wait_event(g)
            pinned = self.store.layer_pinned(fill.layer)
            for dst, s in pairs:
                src_t = s[fill.expert] if pinned else self._stage(s[fill.expert])
                dst[fill.slot].copy_(src_t, non_blocking=True)
            fill.event.record(self.copy_stream)

    def _stage(self, t: torch.Tensor) -> torch.Tensor:
        if self._staging is None:
            self._staging = PinnedStaging()
        return self._staging.put(t, self.copy_stream)

    def poll(self) -> list[Swap]:
        """At a step boundary: start deferred copies, publish completed fills (resident now). Never blocks."""
        done = []
        for f in self.fills:
            if f.event is None:
                self._try_copy(f)
            if f.event is not None and f.event.query():
                done.append(f)
        if not done:
            return []
        finished = {id(f) for f in done}
        self.fills = [f for f in self.fills if id(f) not in finished]
        for f in done:
            self._filling.discard((f.layer, f.expert))
            r = self.row[f.layer]
            self.host[r, f.expert] = f.slot
            _set(self.table, r, f.expert, f.slot)
            self.count[r] += 1
            self.residency.finish_fill(f.layer, f.expert)
        return [(f.layer, f.expert, f.evict) for f in done]

    def wait_all(self) -> list[Swap]:
        """Block until every issued fill completed and is published (used at build time only)."""
        for f in self.fills:
            if f.event is None and f.guard is not None:
                f.guard.synchronize()
                self._try_copy(f)
            if f.event is not None:
                f.event.synchronize()
        return self.poll()

    def in_flight(self) -> bool:
        """A fill is issued and not complete (the host-to-device link is busy); never blocks."""
        return any(f.event is None or not f.event.query() for f in self.fills)

    def fill_now(self, assign: dict[int, list[int]]) -> list[Swap]:
        """Load `assign[layer]` experts into free slots and wait (static placements, warm starts)."""
        self.issue([(l, e, None) for l, es in assign.items() for e in es])
        return self.wait_all()

    def hot_set(self) -> dict[int, list[int]]:
        """Experts resident per layer now (to write as a profile)."""
        return {l: self.resident(l) for l in self.layers}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in parts(self.w13) + parts(self.w2))


def _set(table: torch.Tensor, r: int, e: int, value: int) -> None:
    """table[r, e] = value without a host synchronisation. (`cuda_tensor[i, j] = 5` copies a CPU scalar and
    then synchronises the stream: between graphed decode steps it blocked the host until the running step
    ended, ~one step per swap, seen on the H200 as host time per token equal to the step time.) fill_ on a
    one-element view passes the value as a kernel argument."""
    table[r, e:e + 1].fill_(value)


class PinnedStaging:
    """Ring of pinned host buffers for copies from pageable memory. Before a buffer is rewritten the copy
    stream is synchronised (the copy that read it is done); this happens at step boundaries only.
    Falls back to pageable copies, with a warning, if pinning fails."""

    def __init__(self, ring: int = 4):
        self.ring, self.i = ring, 0
        self.bufs: list[torch.Tensor | None] = [None] * ring
        self.used = [False] * ring
        self.failed = False

    def put(self, t: torch.Tensor, stream) -> torch.Tensor:
        if self.failed:
            return t
        i, self.i = self.i, (self.i + 1) % self.ring
        if self.used[i]:
            stream.synchronize()
            self.used = [False] * self.ring
        need = t.numel() * t.element_size()
        if self.bufs[i] is None or self.bufs[i].numel() < need:
            try:
                self.bufs[i] = torch.empty(need, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:
                warnings.warn("cannot pin a staging buffer; expert copies use pageable memory (slower)",
                              RuntimeWarning, stacklevel=4)
                self.failed = True
                return t
        view = self.bufs[i][:need].view(t.dtype).view(t.shape)
        view.copy_(t)
        self.used[i] = True
        return view
