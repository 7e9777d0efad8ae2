"""LRU: least recently used (global recency under a global budget); demand fetch.

Score = step of the last access + a rank bonus in (0, 0.5]: 0.5 · (M − j) / M for the selection in column j
of the M the access lists (the first occurrence, where an expert is listed twice). Callers list a token's
experts by descending router weight (the engine: torch.topk; the simulator: sorted by the trace's weights,
the recorded order where it has none), so among experts of the same step the higher-weighted one ranks
first: with fewer slots than top-k LRU admits the highest-weighted misses, not the lowest-numbered. Steps
still dominate (the bonus is below 1), so the recency order across steps is plain LRU's.
"""

from __future__ import annotations

import numpy as np

from hotexperts.experts.policies.base import NEG, CachePolicy, _cells, _grid


def _rank_bonus(m: int) -> np.ndarray:
    """[m] the bonus of columns 0..m-1 (first column highest)."""
    return 0.5 * (m - np.arange(m, dtype=np.float64)) / max(m, 1)


class LRU(CachePolicy):
    """Least recently used; demand-fetch after each access; ties within a step by listed (weight) order.
    Global recency under a global budget."""

    name = "lru"

    def bind(self, layers, num_experts):
        super().bind(layers, num_experts)
        self.last = np.full((len(self.layers), self.E), NEG)     # [Lm, E] last access step (+ rank bonus)

    def access(self, step, layer, experts, prompt):
        self.access_step(step, np.array([self.row[layer]], np.int64), _grid(experts, 1), prompt)

    def access_step(self, step, rows, experts, prompt):
        x = np.asarray(experts)
        if x.dtype.kind not in "iu":
            x = x.astype(np.int64)
        valid = x >= 0
        cells = _cells(rows, x, self.E)
        if not cells.size:
            return
        vals = (step + _rank_bonus(x.shape[1]))[np.nonzero(valid)[1]]     # row-major, as _cells
        flat = self.last.reshape(-1)
        flat[cells] = NEG
        np.maximum.at(flat, cells, vals)                               # an expert listed twice: its best

    def scores(self, step, layer):
        return self.last[self.row[layer]]

    def scores_rows(self, step, rows):
        return self.last[rows]
