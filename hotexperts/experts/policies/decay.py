"""Decay: exponentially decayed access frequency (a half-life in decode steps)."""

from __future__ import annotations

import numpy as np

from hotexperts.experts.policies.base import NEG, CachePolicy, _cells, _idarr


class Decay(CachePolicy):
    """Exponentially decayed frequency: score = sum over accesses of 0.5 ** (age / half_life)."""

    name = "decay"

    def __init__(self, half_life: float = 64.0, interval: int = 1, margin: float = 0.0):
        self.half_life, self.interval, self.margin = float(half_life), int(interval), float(margin)
        self.d = 0.5 ** (1.0 / self.half_life)

    def params(self):
        return {"half_life": self.half_life, "interval": self.interval, "margin": self.margin}

    def bind(self, layers, num_experts):
        super().bind(layers, num_experts)
        self.f = np.zeros((len(self.layers), self.E))       # [Lm, E] decayed counts at self.t[i]
        self.t = np.zeros(len(self.layers))                 # [Lm] step of the last decay

    def _advance(self, i, step):
        if step > self.t[i]:
            self.f[i] *= self.d ** (step - self.t[i])
            self.t[i] = step

    def _advance_rows(self, rows, step):
        """`_advance` of each row: the same factor per row (one pow per distinct last-decay step)."""
        t = self.t[rows]
        late = step > t
        if not late.any():
            return
        if not late.all():
            rows, t = rows[late], t[late]
        if (t == t[0]).all():
            if len(rows) == len(self.t):                   # every row (rows are distinct): in place
                self.f *= self.d ** (step - t[0])
                self.t.fill(step)
                return
            self.f[rows] *= self.d ** (step - t[0])
        else:
            u = np.unique(t)
            fac = np.array([self.d ** (step - x) for x in u], np.float64)
            self.f[rows] *= fac[np.searchsorted(u, t)][:, None]
        self.t[rows] = step

    def access(self, step, layer, experts, prompt):
        i = self.row[layer]
        self._advance(i, step)
        np.add.at(self.f[i], _idarr(experts), 1.0)

    def access_step(self, step, rows, experts, prompt):
        self._access_cells(step, rows, _cells(rows, experts, self.E))

    def _access_cells(self, step, rows, cells):
        self._advance_rows(rows, step)
        np.add.at(self.f.reshape(-1), cells, 1.0)

    def scores(self, step, layer):
        i = self.row[layer]
        self._advance(i, step)
        return np.where(self.f[i] > 0, self.f[i], NEG)

    def scores_rows(self, step, rows):
        self._advance_rows(rows, step)
        f = self.f[rows]
        return np.where(f > 0, f, NEG)

    def seed(self, profile):
        for l, c in profile.counts.items():
            if l in self.row:
                c = np.asarray(c, np.float64)                # share of routed selections -> per-step rate
                rate = c / max(c.sum(), 1e-9) * float(profile.meta.get("top_k", 1))
                self.f[self.row[l]] = rate / (1 - self.d)          # the decayed count's steady state
