"""Adaptive (`auto`): decayed frequency mixed with recency, hysteresis and pay-back."""

from __future__ import annotations

import numpy as np

from hotexperts.experts.policies.base import NEG, CachePolicy, _cells
from hotexperts.experts.policies.decay import Decay


class Adaptive(CachePolicy):
    """`auto`: decayed frequency mixed with recency, hysteresis, and pay-back: a swap is made only if the
    CPU time it saves over `horizon` steps beats the copy time. Default horizon: max(interval, half_life),
    the time the frequency estimate stays valid (an expert swapped in stays about that long); pass
    horizon=interval for the strict "saved before the next rebalance" reading."""

    name = "auto"

    def __init__(self, half_life: float = 128.0, recency_half_life: float = 4.0, recency_weight: float = 1.0,
                 interval: int = 4, margin: float = 0.02, horizon: float | None = None,
                 cpu_seconds_per_expert: float | None = None, copy_seconds_per_expert: float | None = None):
        self.slow, self.fast = Decay(half_life), Decay(recency_half_life)
        self.recency_weight, self.interval, self.margin = float(recency_weight), int(interval), float(margin)
        self.horizon = float(horizon if horizon is not None else max(interval, half_life))
        self.cpu_s, self.copy_s = cpu_seconds_per_expert, copy_seconds_per_expert

    def params(self):
        return {"half_life": self.slow.half_life, "recency_half_life": self.fast.half_life,
                "recency_weight": self.recency_weight, "interval": self.interval, "margin": self.margin,
                "horizon": self.horizon, "cpu_seconds_per_expert": self.cpu_s,
                "copy_seconds_per_expert": self.copy_s}

    def bind(self, layers, num_experts):
        super().bind(layers, num_experts)
        self.slow.bind(layers, num_experts)
        self.fast.bind(layers, num_experts)

    def access(self, step, layer, experts, prompt):
        self.slow.access(step, layer, experts, prompt)
        self.fast.access(step, layer, experts, prompt)

    def access_step(self, step, rows, experts, prompt):
        cells = _cells(rows, experts, self.E)
        self.slow._access_cells(step, rows, cells)
        self.fast._access_cells(step, rows, cells)

    def scores(self, step, layer):
        """Expected accesses per step: slow (frequency) and fast (recency) decayed rates, mixed."""
        return self._mix(self.slow.scores(step, layer), self.fast.scores(step, layer))

    def scores_rows(self, step, rows):
        return self._mix(self.slow.scores_rows(step, rows), self.fast.scores_rows(step, rows))

    def _mix(self, s, f):
        slow, fast = np.maximum(s, 0) * (1 - self.slow.d), np.maximum(f, 0) * (1 - self.fast.d)
        rate = slow + self.recency_weight * fast
        return np.where(np.isfinite(s), rate / (1 + self.recency_weight), NEG)

    def accept(self, step, cand, victim):
        if victim is not None and not cand[0] > victim[0] + self.margin:
            return False
        if self.cpu_s is None or self.copy_s is None:
            return True
        gain = cand[0] - (0.0 if victim is None else victim[0])       # accesses per step
        return gain * self.horizon * self.cpu_s > self.copy_s

    def accept_many(self, step, cand, victim):
        if type(self).accept is not Adaptive.accept:
            return None
        ok = np.ones(len(cand), bool) if victim is None else cand > victim + self.margin
        if self.cpu_s is None or self.copy_s is None:
            return ok
        gain = cand - (0.0 if victim is None else victim)
        return ok & (gain * self.horizon * self.cpu_s > self.copy_s)

    def seed(self, profile):
        self.slow.seed(profile)
