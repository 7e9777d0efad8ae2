"""Static: a fixed hot set from a routing profile."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hotexperts.experts.policies.base import NEG, CachePolicy

if TYPE_CHECKING:
    from hotexperts.experts.profile import Profile


class Static(CachePolicy):
    """A fixed hot set from a profile: the top experts by profile count (per layer or global budget)."""

    name = "static"

    def __init__(self, profile: Profile | None = None):
        self.profile = profile

    def bind(self, layers, num_experts):
        super().bind(layers, num_experts)
        self.s = np.full((len(self.layers), self.E), NEG)
        if self.profile is not None:
            self.seed(self.profile)

    def seed(self, profile):
        for l, c in profile.counts.items():
            if l in self.row:
                c = np.asarray(c, np.float64)
                self.s[self.row[l]] = np.where(c > 0, c, NEG)

    def scores(self, step, layer):
        return self.s[self.row[layer]]

    def scores_rows(self, step, rows):
        return self.s[rows]
