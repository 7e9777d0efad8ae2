"""LRU: least recently used (global recency under a global budget); demand fetch."""

from __future__ import annotations

import numpy as np

from hotexperts.experts.policies.base import NEG, CachePolicy, _cells, _idarr


class LRU(CachePolicy):
    """Least recently used; demand-fetch after each access. Global recency under a global budget."""

    name = "lru"

    def bind(self, layers, num_experts):
        super().bind(layers, num_experts)
        self.last = np.full((len(self.layers), self.E), NEG)     # [Lm, E] last access step

    def access(self, step, layer, experts, prompt):
        self.last[self.row[layer], _idarr(experts)] = step

    def access_step(self, step, rows, experts, prompt):
        self.last.reshape(-1)[_cells(rows, experts, self.E)] = step

    def scores(self, step, layer):
        return self.last[self.row[layer]]

    def scores_rows(self, step, rows):
        return self.last[rows]
