"""Belady: the offline optimum (MIN with bypass) over the future accesses; simulation only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from hotexperts.experts.policies.base import NEG, CachePolicy, _idarr, _ids, plan_by_scores


class Belady(CachePolicy):
    """Offline optimum (MIN with bypass): keep the experts used soonest; load only an expert just accessed
    (demand fetch, no prefetch). `future` = every access the controller will observe, as
    (step, layer, experts). Simulation only."""

    name = "belady"
    offline = True

    def __init__(self, future: Iterable[tuple[int, int, Sequence[int]]]):
        self.future = future

    def bind(self, layers, num_experts):
        super().bind(layers, num_experts)
        uses: dict[tuple[int, int], list[int]] = {}
        for step, layer, experts in self.future:
            for e in _ids(experts):
                uses.setdefault((self.row[layer], e), []).append(int(step))
        self.pos = {k: np.array(sorted(set(v)), np.int64) for k, v in uses.items()}
        self.nxt = np.full((len(self.layers), self.E), np.inf)     # [Lm, E] next use step
        for (i, e), p in self.pos.items():
            self.nxt[i, e] = p[0]
        self.seen = np.full((len(self.layers), self.E), -1 << 62)  # [Lm, E] last access step
        self.last_plan = -1 << 62

    def access(self, step, layer, experts, prompt):
        self.seen[self.row[layer], _idarr(experts)] = step

    def plan(self, step, resident, capacity):
        scores = {}
        for l, res in resident.items():
            s = self.scores(step, l).copy()
            ok = self.seen[self.row[l]] > self.last_plan           # accessed since the last plan
            ok[list(res)] = True
            scores[l] = np.where(ok, s, NEG)
        self.last_plan = step
        return plan_by_scores(self, step, resident, capacity, scores)

    def scores(self, step, layer):
        i = self.row[layer]
        for e in np.flatnonzero(self.nxt[i] <= step):              # used already: find the next use
            p = self.pos[(i, int(e))]
            j = np.searchsorted(p, step, side="right")
            self.nxt[i, e] = p[j] if j < p.size else np.inf
        return -self.nxt[i]
