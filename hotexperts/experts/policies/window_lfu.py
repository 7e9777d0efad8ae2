"""WindowLFU: the seed's policy, counts over a sliding window of accesses, rebalance every R steps."""

from __future__ import annotations

import numpy as np

from hotexperts.experts.policies.base import NEG, CachePolicy, _cells, _idarr


class WindowLFU(CachePolicy):
    """The seed's design: counts over the last `window` tokens, rebalance every `interval` tokens,
    swap in only if a count beats the weakest resident's by more than `margin`."""

    name = "window-lfu"

    def __init__(self, window: int = 256, interval: int = 60, margin: float = 1.0):
        self.window, self.interval, self.margin = int(window), int(interval), float(margin)

    def params(self):
        return {"window": self.window, "interval": self.interval, "margin": self.margin}

    def bind(self, layers, num_experts):
        super().bind(layers, num_experts)
        L, W = len(self.layers), max(self.window, 1)
        self.counts = np.zeros((L, self.E), np.int64)      # [Lm, E] accesses in each layer's window
        # The window = each row's last `window` accesses. Per row a ring of the ids of the calls that made
        # them (oldest at _pos once _held == window); per call [what it still counts, how many of its rows
        # still hold it, its row]: an `access` (one row r): [expert ids, 1, r]; an `access_step`: [cells
        # (flat row * E + expert), rows, -1].
        self._ring = np.zeros((L, W), np.int64)
        self._held = np.zeros(L, np.int64)
        self._pos = np.zeros(L, np.int64)
        self._calls: dict[int, list] = {}
        self._call = 0

    def access(self, step, layer, experts, prompt):
        if self.window <= 0:                               # every access leaves the window at once
            return
        i, ids = self.row[layer], _idarr(experts)
        np.add.at(self.counts[i], ids, 1)
        p = int(self._pos[i])
        if self._held[i] < self.window:
            self._held[i] += 1
        else:
            self._forget(int(self._ring[i, p]), i)
        self._ring[i, p] = self._call
        self._calls[self._call] = [ids, 1, i]
        self._call += 1
        self._pos[i] = (p + 1) % self.window

    def access_step(self, step, rows, experts, prompt):
        if self.window <= 0 or not len(rows):
            return
        cells = _cells(rows, experts, self.E)
        np.add.at(self.counts.reshape(-1), cells, 1)
        pos = self._pos[rows]
        full = self._held[rows] >= self.window
        if full.all():                                     # each full row drops its oldest access
            self._forget_rows(rows, self._ring[rows, pos])
        else:
            if full.any():
                self._forget_rows(rows[full], self._ring[rows[full], pos[full]])
            self._held[rows] += ~full
        self._ring[rows, pos] = self._call
        self._calls[self._call] = [cells, len(rows), -1]
        self._call += 1
        self._pos[rows] = (pos + 1) % self.window

    def _forget_rows(self, rows, calls):
        if (calls == calls[0]).all():
            self._forget(int(calls[0]), rows)
        else:
            for c in np.unique(calls).tolist():
                self._forget(c, rows[calls == c])

    def _forget(self, call, rows):
        """Rows `rows` (an array, or one row) stop counting their access of call `call`."""
        entry = self._calls[call]
        if entry[2] >= 0:                                  # one row's access
            del self._calls[call]
            np.subtract.at(self.counts[entry[2]], entry[0], 1)
            return
        rows = np.atleast_1d(rows)
        cells, entry[1] = entry[0], entry[1] - len(rows)
        if entry[1]:                                       # other rows of that call still hold it
            gone = np.isin(cells // self.E, rows)
            cells, entry[0] = cells[gone], cells[~gone]
        else:
            del self._calls[call]
        np.subtract.at(self.counts.reshape(-1), cells, 1)

    def scores(self, step, layer):
        c = self.counts[self.row[layer]].astype(np.float64)
        return np.where(c > 0, c, NEG)

    def scores_rows(self, step, rows):
        c = self.counts[rows].astype(np.float64)
        return np.where(c > 0, c, NEG)

    def seed(self, profile):
        for l, c in profile.counts.items():
            if l in self.row:
                ids = np.argsort(-np.asarray(c), kind="stable")[: max(1, self.E // 4)]
                self.access(-1, l, [int(e) for e in ids if c[e] > 0], prompt=False)
