"""Residency: the one record of which experts hold a slot, per MoE layer (torch-free, numpy only).

    res = Residency(layers, num_experts)
    res.resident[l]     set of experts whose slot is filled and usable (the GPU may read them)
    res.pending[l]      set of experts whose fill was issued and has not completed
    res.occupied(layers=None) -> {l: resident | pending}  (copies; every layer, or those named)
    res.total(layers=None) -> slots occupied over every layer, or over those named
    res.lookup(l, experts) -> [bool]; res.lookup_step(layers, experts[n, M]) -> bool [n, M]  (no side effects)
    res.in_flight(layers=None) -> bool  a fill is issued and not complete (the host-to-device link is busy)
    res.start(swaps)    issue: an evicted expert leaves `resident` at once (its slot is being overwritten), a
                        loaded one becomes `pending`
    res.commit(swaps)   the loads' fills completed: pending -> resident
    evict / begin_fill / finish_fill: the same, one expert at a time (the slot cache's per-fill steps)

Exactly one object owns it: the live SlotCache (experts/slots.py, which keeps its device tables in step with
it) or the simulator's SimulatedCache (trace/simulate.py, whose fills complete at once). The planner
(experts/planner.py) only reads it and returns swaps; nobody else writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from hotexperts.experts.policies.base import Swap, _grid, _ids


class Residency:
    def __init__(self, layers: Sequence[int], num_experts: int):
        self.layers, self.E = [int(l) for l in layers], int(num_experts)
        self.resident: dict[int, set[int]] = {l: set() for l in self.layers}
        self.pending: dict[int, set[int]] = {l: set() for l in self.layers}

    # ---- reads ----------------------------------------------------------------------------------------
    def occupied(self, layers: Sequence[int] | None = None) -> dict[int, set[int]]:
        """layer -> resident | pending (fresh sets), for every layer or for `layers` (a planner's own: a
        plan that also holds fixed all-GPU layers manages only some of the slot layers)."""
        return {l: self.resident[l] | self.pending[l] for l in (self.layers if layers is None else layers)}

    def total(self, layers: Sequence[int] | None = None) -> int:
        """Slots occupied (resident or pending) over every layer, or over `layers`."""
        total = 0
        for l in self.layers if layers is None else layers:
            r, p = self.resident[l], self.pending[l]
            total += len(r) + len(p) - len(p & r) if p else len(r)
        return total

    def in_flight(self, layers: Sequence[int] | None = None) -> bool:
        """Some fill (of every layer, or of `layers`) is issued and not committed yet: the link is busy."""
        return any(self.pending[l] for l in (self.layers if layers is None else layers))

    def lookup(self, layer: int, experts) -> list[bool]:
        res = self.resident[layer]
        return [e in res for e in _ids(experts)]

    def lookup_step(self, layers: Sequence[int], experts) -> np.ndarray:
        """[n, M] bool hit flags of `experts` [n, M] (row i: layer layers[i]) against `resident`; False
        where -1. Row i, cells >= 0, equals lookup(layers[i], experts[i])."""
        x = _grid(experts, len(layers))
        held = np.zeros((len(layers), self.E + 1), bool)          # column E: the -1 cells (never hits)
        for i, l in enumerate(layers):
            r = self.resident[l]
            if r:
                held[i, np.fromiter(r, np.int64, len(r))] = True
        return held[np.arange(len(layers))[:, None], np.where(x >= 0, x, self.E)]

    # ---- writes (the owner's) -------------------------------------------------------------------------
    def evict(self, layer: int, expert: int) -> None:
        self.resident[layer].discard(expert)

    def begin_fill(self, layer: int, expert: int) -> None:
        self.pending[layer].add(expert)

    def finish_fill(self, layer: int, expert: int) -> None:
        if expert in self.pending[layer]:
            self.pending[layer].discard(expert)
            self.resident[layer].add(expert)

    def start(self, swaps: Iterable[Swap]) -> None:
        """Issue `swaps` in order: evictions leave `resident`, loads join `pending`."""
        for l, c, v in swaps:
            if v is not None:
                self.evict(l, v)
            if c is not None:
                self.begin_fill(l, c)

    def commit(self, swaps: Iterable[Swap]) -> None:
        """The loads of `swaps` completed: pending -> resident."""
        for l, c, _ in swaps:
            if c is not None:
                self.finish_fill(l, c)
