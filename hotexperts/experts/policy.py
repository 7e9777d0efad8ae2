"""Cache policies and the CacheController: torch-free (numpy only), shared by the live SlotCache and the
simulator, so identical calls give identical hits, misses and swaps.

Contract (docs/architecture.md "Cache policy contract"):

    Swap = (layer, load_expert | None, evict_expert | None)
        (l, c, v)     copy expert c into the slot that held v (same layer)
        (l, c, None)  copy c into a free slot
        (l, None, v)  free v's slot (only under a global budget: a slot moves between layers; the eviction
                      comes first in the list, the load that takes the slot right after it)

    policy.bind(layers, num_experts)            # the controller calls it once
    policy.access(step, layer, experts, prompt) # experts: the ids routed (flattened [T*K], -1 skipped)
    policy.access_step(step, rows, experts, prompt)   # batched: rows int64 [n] (distinct policy rows),
                                                # experts int64 [n, M], -1 skipped; = access per row in order
    policy.plan(step, occupied, capacity) -> list[Swap]   # priority order; `capacity` is a Capacity
    policy.scores_rows(step, rows) -> [n, E]    # scores of those rows (plan_by_scores ranks them at once)
    policy.accept_many(step, cand[n], victim[n] | None) -> bool[n] | None   # accept, vectorized (or None)

    ctl = CacheController(policy, layers, num_experts, capacity=K | {layer: K}, max_swaps_per_step=4,
                          budget=None | slots, prompt_bypass=64, max_fills_per_step=64)
    ctl.lookup(layer, experts) -> list[bool]                  # no side effects
    ctl.observe(step, layer, experts, prompt, tokens=T, hits=flags)   # stats + policy.access
    ctl.lookup_step(layers, experts[n, M]) -> bool [n, M]     # all layers at once (False where -1)
    ctl.observe_step(step, layers, experts[n, M], hits[n, M], prompt=False, tokens=1)
        # one call per forward pass; bit for bit the same as observe(step, layers[i], experts[i], prompt,
        # tokens=tokens, hits=hits[i][experts[i] >= 0].tolist()) for i in order
    ctl.end_step(step, prompt) -> list[Swap]                  # swaps to issue now (bounded)
    ctl.commit(swaps)                                          # fills completed -> resident

Order per forward pass: lookup -> compute -> observe (every layer, or one observe_step for all of them);
then end_step -> issue -> commit.
Bounds: per decode step at most max_swaps loads that evict a resident and max_fills loads into free slots
(fills evict nothing, or only a placeholder). `ctl.cold_start()` fills every slot at load with placeholders
(no profile): experts no routing has chosen yet. After a prompt, its most-routed experts fill the FREE slots
and those of placeholders, evicting nothing routing ever chose: prompt routing seeds the cache but never
flushes the decode working set.
Evictions leave `resident` at end_step (the slot is being overwritten); loads join it at commit.

Capacity: per layer (`hot:K`, same K or a dict) or one global `budget` of slots shared by all layers
(`cache:BUDGET`): policies then rank (layer, expert) pairs together, so hot layers get more slots.
Policies: lru, window-lfu, decay, static, belady (offline; simulation only), auto (adaptive + pay-back).
Profiles (JSON): per layer expert counts and hot set; `save_profile` / `load_profile`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hotexperts.errors import HotExpertsError, read_json

Swap = tuple[int, int | None, int | None]
NEG = -np.inf
PROFILE_FORMAT = "hotexperts-profile"


class ProfileError(HotExpertsError):
    """A routing profile file is missing, corrupt, or does not fit the model."""


class Capacity(dict):
    """layer -> max slots of that layer; `budget` = one global slot budget shared by all layers (or None)."""

    def __init__(self, caps: Mapping[int, int], budget: int | None = None):
        super().__init__(caps)
        self.budget = budget


def _idarr(experts) -> np.ndarray:
    """Flattened expert ids (an integer array: the input's integer dtype, else int64), -1 removed."""
    a = np.asarray(experts)
    if a.ndim != 1:
        a = a.reshape(-1)
    if a.dtype.kind not in "iu":
        a = a.astype(np.int64)
    return a[a >= 0]


def _ids(experts) -> list[int]:
    """Flattened expert ids, -1 (missing / masked) removed."""
    return _idarr(experts).tolist()


def _grid(a, n: int) -> np.ndarray:
    """`a` as [n, M] (trailing dims flattened into M)."""
    a = np.asarray(a)
    return a.reshape(n, -1) if n else a.reshape(0, a.size)


def _cells(rows: np.ndarray, experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Flat indices row * E + expert of the cells of `experts` [n, M] that hold an expert (-1 skipped),
    in row-major order (the order a loop over the rows would visit them)."""
    return (rows[:, None] * num_experts + experts)[experts >= 0]


# ---------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------

class CachePolicy:
    """Score-based policy: higher score = more worth a slot; -inf = never load. Subclasses set scores."""

    name = "base"
    interval = 1          # plan() every `interval` decode steps
    margin = 0.0          # hysteresis: a candidate must beat its victim's score by more than this
    offline = False       # True: needs the future (simulation only)

    def bind(self, layers: Sequence[int], num_experts: int) -> None:
        self.layers = list(layers)
        self.E = int(num_experts)
        self.row = {l: i for i, l in enumerate(self.layers)}

    def params(self) -> dict:
        return {}

    def access(self, step: int, layer: int, experts: Sequence[int], prompt: bool) -> None:
        pass

    def access_step(self, step: int, rows: np.ndarray, experts: np.ndarray, prompt: bool) -> None:
        """Batched `access`: rows = distinct policy row indices (int64 [n]; the layer is self.layers[r]),
        experts = int64 [n, M], -1 = no expert in that cell. The same as `access` for each row in order;
        vectorized overrides must leave the same state, bit for bit."""
        for r, x in zip(rows.tolist(), experts, strict=True):
            self.access(step, self.layers[r], x, prompt)

    def scores(self, step: int, layer: int) -> np.ndarray:      # [E] float
        raise NotImplementedError

    def scores_rows(self, step: int, rows: np.ndarray) -> np.ndarray:
        """[n, E] float64: `scores` of the layers at policy rows `rows` (same values, same side effects)."""
        return np.array([np.asarray(self.scores(step, self.layers[r]), np.float64) for r in rows.tolist()],
                        np.float64).reshape(len(rows), self.E)

    def accept(self, step: int, cand: tuple, victim: tuple | None) -> bool:
        """cand/victim = (score, layer, expert); victim None = a free slot."""
        if victim is None:
            return True
        return cand[0] > victim[0] + self.margin

    def accept_many(self, step: int, cand: np.ndarray, victim: np.ndarray | None) -> np.ndarray | None:
        """`accept` of pairs at once: candidate scores [n] against victim scores [n] (None: free slots) ->
        bool [n], the same decisions; None where `accept` is overridden (the plan then asks one by one)."""
        if type(self).accept is not CachePolicy.accept:
            return None
        return np.ones(len(cand), bool) if victim is None else cand > victim + self.margin

    def seed(self, profile: Profile) -> None:
        """Warm start the policy's statistics from a profile (default: nothing to seed)."""

    def plan(self, step: int, resident: Mapping[int, set[int]], capacity: Mapping[int, int]) -> list[Swap]:
        return plan_by_scores(self, step, resident, capacity)


def plan_by_scores(policy: CachePolicy, step: int, resident: Mapping[int, set[int]],
                   capacity: Mapping[int, int], scores: Mapping[int, np.ndarray] | None = None) -> list[Swap]:
    """Best non-resident experts replace the worst resident ones while `policy.accept` agrees.

    Ranking (as tuples, ties broken by layer then expert id): candidates = non-resident (score, layer,
    expert) with a finite score above the floor (the lowest resident score when no slot is free),
    descending; victims = the len(candidates) lowest resident ones, ascending, taken from each layer's
    len(candidates) lowest as np.argpartition picks them (which of tied experts it keeps depends on the
    set's order: kept so as not to change any plan). Vectorized over all layers; only the pairing loop
    (policy.accept) runs in Python, and victims are ranked only once a candidate needs one."""
    layers = list(resident)
    if not layers:
        return []
    if scores is not None:
        S = np.array([np.asarray(scores[l], np.float64) for l in layers], np.float64)
    else:
        S = policy.scores_rows(step, np.array([policy.row[l] for l in layers], np.int64))
    n, E = S.shape
    res = [np.fromiter(resident[l], np.int64, len(resident[l])) for l in layers]
    sizes = np.array([r.size for r in res], np.int64)
    held = np.zeros((n, E), bool)                                       # [n, E] resident
    if sizes.any():
        held[np.repeat(np.arange(n), sizes), np.concatenate(res)] = True
    low = np.where(held, S, np.inf).min(axis=1)                         # [n] lowest resident score
    budget = getattr(capacity, "budget", None)
    if budget is not None:
        free = budget - int(sizes.sum())
        ok = np.isfinite(S) & (S > (NEG if free > 0 else low.min())) & ~held      # [n, E] candidates
        rows = sorted(range(n), key=lambda i: layers[i])
        ranked = _plan_group(policy, step, rows, layers, S, ok, held, res, sizes, budget, capacity)
    else:
        caps = np.array([capacity[l] for l in layers], np.int64)
        floor = np.where(caps - sizes > 0, NEG, low)
        ok = np.isfinite(S) & (S > floor[:, None]) & ~held
        ranked = _plan_layers(policy, step, layers, S, ok, res, sizes, capacity)
    ranked.sort(key=lambda g: -g[0])                    # stable: most valuable first
    return [s for _, swaps in ranked for s in swaps]


def _plan_layers(policy, step, layers, S, ok, res, sizes, caps) -> list[tuple[float, list[Swap]]]:
    """Per-layer capacity: each layer's candidates against its own victims (layers in their order)."""
    ri, e = np.nonzero(ok)
    if not ri.size:
        return []
    sc = S[ri, e]
    order = np.argsort(-sc, kind="stable")                  # by score descending, then expert
    order = order[np.argsort(ri[order], kind="stable")]     # grouped by layer
    ri, sc, e = ri[order], sc[order].tolist(), e[order].tolist()
    bounds = np.flatnonzero(np.diff(ri)) + 1
    starts, ends = [0, *bounds.tolist()], [*bounds.tolist(), len(sc)]
    out = []
    for i, a, b in zip(ri[starts].tolist(), starts, ends, strict=True):
        lc, n = layers[i], b - a
        occ, cap = int(sizes[i]), caps[layers[i]]
        free, victims, vi = cap - occ, None, 0
        for k in range(a, b):
            cand = (sc[k], lc, e[k])
            if free > 0 and occ < cap:
                if not policy.accept(step, cand, None):
                    break
                out.append((np.inf, [(lc, e[k], None)]))
                free, occ = free - 1, occ + 1
                continue
            if victims is None:                               # the n lowest residents, ascending
                r = res[i]
                if r.size > n:
                    r = r[np.argpartition(S[i][r], n - 1)[:n]]
                victims = sorted(zip(S[i][r].tolist(), r.tolist(), strict=True))[:n]
            if vi >= len(victims):
                break
            sv, v = victims[vi]
            if not policy.accept(step, cand, (sv, lc, v)):
                break
            out.append((sc[k] - sv, [(lc, e[k], v)]))
            vi += 1
    return out


def _plan_group(policy, step, rows, layers, S, ok, held, res, sizes, slots,
                caps) -> list[tuple[float, list[Swap]]]:
    """rows: indices into `layers` (one, or all of them under a global budget), ascending by layer id."""
    occ = {layers[i]: int(sizes[i]) for i in rows}
    free = slots - sum(occ.values())
    cands = _candidates(rows, layers, S, ok)                            # descending
    n = len(cands[0])
    if all(caps[layers[i]] >= S.shape[1] for i in rows):               # no layer cap can bind
        out = _pair_many(policy, step, rows, layers, S, held, res, sizes, cands, max(free, 0))
        if out is not None:
            return out
    out, victims, victim = [], None, None
    for cand in _tuples(*cands):
        sc, lc, c = cand
        if free > 0 and occ[lc] < caps[lc]:
            if not policy.accept(step, cand, None):
                break
            out.append((np.inf, [(lc, c, None)]))
            free, occ[lc] = free - 1, occ[lc] + 1
            continue
        if victims is None:
            victims = _tuples(*_victims(rows, layers, S, held, res, sizes, n))      # ascending
            victim = next(victims, None)
        if victim is None:
            break
        sv, lv, v = victim
        if not policy.accept(step, cand, victim):
            break
        if lv == lc:
            out.append((sc - sv, [(lc, c, v)]))
        elif occ[lc] < caps[lc]:
            out.append((sc - sv, [(lv, None, v), (lc, c, None)]))
            occ[lv], occ[lc] = occ[lv] - 1, occ[lc] + 1
        else:
            continue
        victim = next(victims, None)
    return out


def _pair_many(policy, step, rows, layers, S, held, res, sizes, cands, free):
    """The pairing loop of _plan_group with accept_many, when no layer's cap can bind (each is >= E:
    a candidate's layer always has room, as its candidates are experts it does not hold): the first
    `free` candidates fill free slots, the rest take the victims in order, up to the first refusal.
    None where the policy has no accept_many."""
    sc, lc, c = cands
    n, fills = len(sc), min(free, len(sc))
    ok = policy.accept_many(step, sc[:fills], None)
    if ok is None:
        return None
    k = int(np.argmin(ok)) if not ok.all() else fills
    out = [(np.inf, [(l, e, None)]) for l, e in zip(lc[:k], c[:k].tolist(), strict=True)]
    if k < fills or fills == n:
        return out
    sv, lv, v = _victims(rows, layers, S, held, res, sizes, n)           # ascending
    m = min(n - fills, len(sv))
    cs = sc[fills:fills + m]
    ok = policy.accept_many(step, cs, sv[:m])
    k = int(np.argmin(ok)) if not ok.all() else m
    gain = (cs[:k] - sv[:k]).tolist()
    for g, l, e, vl, ve in zip(gain, lc[fills:fills + k], c[fills:fills + k].tolist(), lv[:k], v[:k].tolist(),
                               strict=True):
        out.append((g, [(l, e, ve)] if vl == l else [(vl, None, ve), (l, e, None)]))
    return out


def _tuples(scores: np.ndarray, layers: list, experts: np.ndarray, chunk: int = 64):
    """(float score, layer, int expert) tuples, converted `chunk` at a time (the loop often stops early)."""
    for a in range(0, len(scores), chunk):
        yield from zip(scores[a:a + chunk].tolist(), layers[a:a + chunk], experts[a:a + chunk].tolist(),
                       strict=True)


def _candidates(rows, layers, S, ok) -> tuple[np.ndarray, list, np.ndarray]:
    """Non-resident (score, layer, expert) marked in `ok`, by score descending, then layer, then expert."""
    ri, e = np.nonzero(ok[rows])                         # row-major: ascending (layer, expert)
    sub = np.asarray(rows, np.int64)[ri]
    sc = S[sub, e]
    order = np.argsort(-sc, kind="stable")
    sub = sub[order].tolist()
    return sc[order], [layers[i] for i in sub], e[order]


def _victims(rows, layers, S, held, res, sizes, n) -> tuple[np.ndarray, list, np.ndarray]:
    """The `n` lowest-scored resident (score, layer, expert), ascending (ties: layer, then expert), among
    each layer's `n` lowest as np.argpartition on the resident set's own order picks them."""
    rows = np.asarray(rows, np.int64)
    sel = held[rows]
    for k in np.flatnonzero(sizes[rows] > n).tolist():
        r = res[rows[k]]
        sel[k] = False
        sel[k, r[np.argpartition(S[rows[k]][r], n - 1)[:n]]] = True
    ri, ve = np.nonzero(sel)                             # ascending (layer, expert)
    vr = rows[ri]
    vs = S[vr, ve]
    if vs.size > n:                                      # keep the n lowest and their ties, in order
        keep = vs <= np.partition(vs, n - 1)[n - 1]
        vs, vr, ve = vs[keep], vr[keep], ve[keep]
    order = np.argsort(vs, kind="stable")[:n]
    return vs[order], [layers[i] for i in vr[order].tolist()], ve[order]


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


POLICIES = {"lru": LRU, "window-lfu": WindowLFU, "decay": Decay, "static": Static, "belady": Belady,
            "auto": Adaptive}
ALIASES = {"adaptive": "auto", "lfu": "window-lfu", "windowlfu": "window-lfu"}
LIVE_POLICIES = ("lru", "window-lfu", "decay", "static", "auto")


def _key(name: str) -> str:
    return ALIASES.get(name.lower(), name.lower())


def make_policy(name: str, **params) -> CachePolicy:
    """Policy by name; `params` go to its constructor (static: profile=..., belady: future=...)."""
    key = _key(name)
    if key not in POLICIES:
        raise HotExpertsError(f"unknown cache policy {name!r}; choose from {', '.join(POLICIES)}")
    params = {k: v for k, v in params.items() if v is not None}
    try:
        return POLICIES[key](**params)
    except TypeError as e:
        raise HotExpertsError(f"bad parameters for policy {key!r}: {e}") from None


def policy_from_profile(profile: Profile, name: str | None = None, **overrides) -> CachePolicy:
    """The policy a profile names (written by `auto`), with its parameters; `overrides` win."""
    key = _key(name or profile.policy or "static")
    if key == "static":
        return make_policy("static", profile=profile)
    params = dict(profile.params) if _key(profile.policy or "") == key else {}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return make_policy(key, **params)


# ---------------------------------------------------------------------------------------------------
# Controller
# ---------------------------------------------------------------------------------------------------

class _Occupied(dict):
    """layer -> resident | pending, each made (a copy) on first access."""

    def __init__(self, resident, pending):
        super().__init__()
        self.resident, self.pending = resident, pending

    def __missing__(self, layer):
        occ = self[layer] = self.resident[layer] | self.pending[layer]
        return occ


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prompt_hits: int = 0
    prompt_misses: int = 0
    loads: int = 0          # swaps (copies) issued
    evictions: int = 0


class CacheController:
    """The one driver of a policy, for the live SlotCache and the simulator alike (see module doc)."""

    def __init__(self, policy: CachePolicy, layers: Sequence[int], num_experts: int,
                 capacity: int | Mapping[int, int] | None = None, max_swaps_per_step: int | None = 4, *,
                 budget: int | None = None, prompt_bypass: int = 64, max_fills_per_step: int | None = 64):
        self.layers, self.E = [int(l) for l in layers], int(num_experts)
        caps = capacity if isinstance(capacity, Mapping) else {l: capacity for l in self.layers}
        if capacity is None:
            caps = {l: self.E for l in self.layers}
            if budget is None:
                raise HotExpertsError("CacheController needs a per-layer capacity or a global budget")
        self.capacity = Capacity({l: min(int(caps[l]), self.E) for l in self.layers}, budget)
        self.max_swaps, self.prompt_bypass = max_swaps_per_step, int(prompt_bypass)
        self.max_fills = max_fills_per_step
        self._prompt = np.zeros((len(self.layers), self.E))                # routing of the current prompt
        self._prompt_counts = {l: self._prompt[i] for i, l in enumerate(self.layers)}    # rows (views)
        self._index = {l: i for i, l in enumerate(self.layers)}
        self.policy = policy
        policy.bind(self.layers, self.E)
        self._rows_of: dict[tuple, tuple[np.ndarray, np.ndarray] | None] = {}   # observe_step's layers
        self.resident: dict[int, set[int]] = {l: set() for l in self.layers}
        self.pending: dict[int, set[int]] = {l: set() for l in self.layers}   # loads issued, not committed
        self.stats = {l: LayerStats() for l in self.layers}
        self.backlog: list[Swap] = []
        self.decode_steps = 0
        self._ph = np.zeros((len(self.layers), self.E), bool)      # cold_start's loads never routed since
        self._ph_any = False

    # ---- per layer -----------------------------------------------------------------------------
    def lookup(self, layer: int, experts) -> list[bool]:
        res = self.resident[layer]
        return [e in res for e in _ids(experts)]

    def observe(self, step: int, layer: int, experts, prompt: bool = False, *, tokens: int = 1,
                hits: Sequence[bool] | None = None) -> None:
        """Record hit flags (from lookup) in the stats; feed the policy unless a large prompt batch."""
        if hits is not None:
            st, h = self.stats[layer], int(sum(hits))
            if prompt:
                st.prompt_hits, st.prompt_misses = st.prompt_hits + h, st.prompt_misses + len(hits) - h
            else:
                st.hits, st.misses = st.hits + h, st.misses + len(hits) - h
        if prompt:
            np.add.at(self._prompt_counts[layer], _idarr(experts), 1.0)
        if self._ph_any:
            self._ph[self._index[layer], _idarr(experts)] = False       # routed: no placeholder any more
        if not (prompt and tokens > self.prompt_bypass):
            self.policy.access(step, layer, experts, prompt)

    # ---- per forward pass, batched ---------------------------------------------------------------
    def lookup_step(self, layers: Sequence[int], experts) -> np.ndarray:
        """[n, M] bool hit flags of `experts` [n, M] (row i: layer layers[i]) against `resident`; False
        where -1. Row i, cells >= 0, equals lookup(layers[i], experts[i]). No side effects."""
        x = _grid(experts, len(layers))
        held = np.zeros((len(layers), self.E + 1), bool)          # column E: the -1 cells (never hits)
        for i, l in enumerate(layers):
            r = self.resident[l]
            if r:
                held[i, np.fromiter(r, np.int64, len(r))] = True
        return held[np.arange(len(layers))[:, None], np.where(x >= 0, x, self.E)]

    def observe_step(self, step: int, layers: Sequence[int], experts, hits=None, prompt: bool = False,
                     tokens: int = 1) -> None:
        """`observe` of a whole forward pass at once (the live engine: once per decode step).

        layers: MoE layer ids (a subset, in order); experts: int [n, M] (row i: layer layers[i]; M >= top-k,
        more dims are flattened into M); -1 = no expert in that cell (skipped); hits: bool [n, M] from the
        mirror (ignored where experts == -1), or None (no hit stats, as observe(hits=None)).
        Exactly the same (stats, policy state, later plans and swaps) as, for i in order:
            observe(step, layers[i], experts[i], prompt, tokens=tokens,
                    hits=hits[i][experts[i] >= 0].tolist())
        """
        n = len(layers)
        if not n:
            return
        x = _grid(experts, n)
        if x.dtype != np.int64:
            x = x.astype(np.int64)
        key = tuple(layers)
        idx = self._rows_of.get(key)
        if idx is None:
            if len(set(key)) < n:                      # a layer twice: its calls depend on each other
                valid = x >= 0
                h = None if hits is None else _grid(hits, n).astype(bool, copy=False)
                for i, l in enumerate(key):
                    self.observe(step, l, x[i], prompt, tokens=tokens,
                                 hits=None if h is None else h[i][valid[i]].tolist())
                return
            if len(self._rows_of) > 64:
                self._rows_of.clear()
            idx = self._rows_of[key] = (np.array([self._index[l] for l in key], np.int64),
                                        np.array([self.policy.row[l] for l in key], np.int64))
        if hits is not None:
            valid, h = x >= 0, _grid(hits, n).astype(bool, copy=False)
            if valid.all():
                nv, nh = [x.shape[1]] * n, h.sum(axis=1).tolist()
            else:
                nv, nh = valid.sum(axis=1).tolist(), (h & valid).sum(axis=1).tolist()
            stats = self.stats
            if prompt:
                for l, a, v in zip(key, nh, nv, strict=True):
                    st = stats[l]
                    st.prompt_hits += a
                    st.prompt_misses += v - a
            else:
                for l, a, v in zip(key, nh, nv, strict=True):
                    st = stats[l]
                    st.hits += a
                    st.misses += v - a
        if prompt:
            np.add.at(self._prompt.reshape(-1), _cells(idx[0], x, self.E), 1.0)
        if self._ph_any:
            self._ph.reshape(-1)[_cells(idx[0], x, self.E)] = False      # routed: no placeholder any more
        if not (prompt and tokens > self.prompt_bypass):
            self.policy.access_step(step, idx[1], x, prompt)

    # ---- per forward pass ----------------------------------------------------------------------
    def occupied(self) -> dict[int, set[int]]:
        return {l: self.resident[l] | self.pending[l] for l in self.layers}

    def _occupied_now(self) -> tuple[dict[int, set[int]], int]:
        """(occupied sets made on first use, their total size): for _issue, which touches few layers."""
        total = 0
        for r, p in zip(self.resident.values(), self.pending.values(), strict=True):
            total += len(r) + len(p) - (len(p & r) if p else 0)
        return _Occupied(self.resident, self.pending), total

    def end_step(self, step: int, prompt: bool = False) -> list[Swap]:
        if prompt:
            return self._fill_from_prompt()
        if self._ph_any and self.decode_steps % 64 == 0:
            self._ph_any = bool(self._ph.any())                    # every placeholder routed or evicted
        if self.decode_steps % self.policy.interval == 0:
            self.backlog = self.policy.plan(step, self.occupied(), self.capacity)
        self.decode_steps += 1
        issued, self.backlog = self._issue(self.backlog)
        return issued

    def _fill_from_prompt(self) -> list[Swap]:
        """After a prompt chunk: copy its most-routed experts into FREE slots, and into the slots of load-time
        placeholders no routing has chosen yet (cold_start). An expert any prompt or decode step routed is
        never evicted here, so prompt routing never flushes the decode working set. Not bounded: it runs
        once per prompt chunk."""
        occ = self.occupied()
        total = sum(len(s) for s in occ.values())
        rows = sorted(range(len(self.layers)), key=lambda i: self.layers[i])
        counts = self._prompt[rows]
        ri, es = np.nonzero(counts > 0)                            # ascending (layer, expert)
        order = np.argsort(-counts[ri, es], kind="stable")         # most routed first, ties: (layer, expert)
        ranked = zip([self.layers[rows[i]] for i in ri[order].tolist()], es[order].tolist(), strict=True)
        spare = self._spare_placeholders()
        out, budget = [], self.capacity.budget
        for l, e in ranked:
            if e in occ[l]:
                continue
            v = None
            if not self._free(l, occ, total):
                room = self._drop_placeholder(l, spare, occ)
                if room is None:
                    if budget is not None and total >= budget and not any(spare.values()):
                        break                                      # no slot left anywhere
                    continue
                vl, v = room
                self._evict(vl, v, occ, out, paired=vl == l)       # another layer's: its own (l, None, v)
                v, total = (v if vl == l else None), total - 1
            occ[l].add(e)
            self.pending[l].add(e)
            self.stats[l].loads += 1
            out.append((l, e, v))
            total += 1
        self._prompt[:] = 0.0
        return out

    def _spare_placeholders(self) -> dict[int, list[int]]:
        """Per layer, its resident placeholders (never routed since the load: evictable), highest id first."""
        if not self._ph_any:
            return {}
        spare = {}
        for i, l in enumerate(self.layers):
            es = np.flatnonzero(self._ph[i]).tolist()
            spare[l] = sorted((e for e in es if e in self.resident[l]), reverse=True)
        return spare

    def _drop_placeholder(self, layer: int, spare: dict[int, list[int]], occ) -> tuple[int, int] | None:
        """(layer', expert) of a spare placeholder whose slot `layer` may take: its own, or (global budget,
        layer under its cap) one of the layer with the most spare ones; None when none can give room."""
        victim = layer if spare.get(layer) else None
        if victim is None and spare and len(occ[layer]) < self.capacity[layer]:
            victim = max(spare, key=lambda l: len(spare[l]))
        if victim is None or not spare[victim]:
            return None
        return victim, spare[victim].pop()

    def is_placeholder(self, layer: int, expert: int) -> bool:
        """A load-time placeholder no routing has chosen yet (cold_start)."""
        return bool(self._ph_any and expert >= 0 and self._ph[self._index[layer], expert])

    def _issue(self, swaps: list[Swap]) -> tuple[list[Swap], list[Swap]]:
        """Issue planned swaps in order: at most max_swaps loads that evict, max_fills into free slots."""
        if not swaps:
            return [], []
        (occ, total), issued, held, loads, fills = self._occupied_now(), [], [], 0, 0
        for i, (l, c, v) in enumerate(swaps):
            free = self._free(l, occ, total) if v is None else self.is_placeholder(l, v)
            into_free = c is not None and free
            limit, used = (self.max_fills, fills) if into_free else (self.max_swaps, loads)
            if limit is not None and used >= limit:
                return issued, held + swaps[i:]
            if c is None:
                if v in self.resident[l]:
                    held.append((l, None, v))
                continue
            if c in occ[l] or (v is not None and v not in self.resident[l]):
                continue
            if v is None and not self._free(l, occ, total):
                while held and not self._free(l, occ, total):
                    hl, _, hv = held.pop()
                    self._evict(hl, hv, occ, issued)
                    total -= 1
                if not self._free(l, occ, total):
                    continue
            if v is not None:
                self._evict(l, v, occ, issued, paired=True)
                total -= 1
            occ[l].add(c)
            self.pending[l].add(c)
            self.stats[l].loads += 1
            issued.append((l, c, v))
            total = total + 1
            fills, loads = (fills + 1, loads) if into_free else (fills, loads + 1)
        return issued, []

    def _free(self, layer, occ, total) -> bool:
        if len(occ[layer]) >= self.capacity[layer]:
            return False
        return self.capacity.budget is None or total < self.capacity.budget

    def _evict(self, layer, expert, occ, issued, paired=False):
        if self._ph_any:
            self._ph[self._index[layer], expert] = False
        self.resident[layer].discard(expert)
        occ[layer].discard(expert)
        self.stats[layer].evictions += 1
        if not paired:
            issued.append((layer, None, expert))

    def commit(self, swaps: Iterable[Swap]) -> None:
        for l, c, _ in swaps:
            if c is not None and c in self.pending[l]:
                self.pending[l].discard(c)
                self.resident[l].add(c)

    # ---- profiles and stats --------------------------------------------------------------------
    def cold_start(self) -> list[Swap]:
        """Without a profile: loads that fill every slot before any routing is known (round-robin over the
        layers, experts in index order, so a global budget is shared evenly as far as each layer's cap
        allows), so no slot idles until the first prompt. They are placeholders until routing chooses
        them: the policy gets no counts, a prompt's fill may replace them, and a decode swap that evicts
        one counts as a fill (max_fills, not max_swaps). Issue, then commit."""
        occ = self.occupied()
        total, out = sum(len(s) for s in occ.values()), []
        for e in range(self.E):
            for i, l in enumerate(self.layers):
                if e in occ[l] or not self._free(l, occ, total):
                    continue
                occ[l].add(e)
                self.pending[l].add(e)
                self._ph[i, e] = self._ph_any = True
                out.append((l, e, None))
                total += 1
        return out

    def warm_start(self, profile: Profile) -> list[Swap]:
        """Seed the policy from a profile and return the loads of its hot set (issue, then commit)."""
        self.policy.seed(profile)
        ranked = sorted(((c[e], l, e) for l, hot in profile.hot.items() if l in self.resident
                         for e, c in ((e, profile.counts.get(l, [1.0] * self.E)) for e in hot)),
                        key=lambda t: -t[0])
        occ, total, out = self.occupied(), sum(len(s) for s in self.occupied().values()), []
        for _, l, e in ranked:
            if 0 <= e < self.E and e not in occ[l] and self._free(l, occ, total):
                occ[l].add(e)
                self.pending[l].add(e)
                out.append((l, e, None))
                total += 1
        return out

    def export_profile(self, **meta) -> Profile:
        counts = {}
        for l in self.layers:
            try:
                s = np.asarray(self.policy.scores(self.decode_steps, l), np.float64)
                counts[l] = np.where(np.isfinite(s) & (s > 0), s, 0.0).tolist()
            except NotImplementedError:
                counts[l] = [1.0 if e in self.resident[l] else 0.0 for e in range(self.E)]
        hot = {l: sorted(self.resident[l], key=lambda e, l=l: -counts[l][e]) for l in self.layers}
        return Profile(self.E, counts, hot, self.policy.name, self.policy.params(), dict(meta))

    def hit_rate(self, prompt: bool = False) -> float:
        h = sum(s.prompt_hits if prompt else s.hits for s in self.stats.values())
        m = sum(s.prompt_misses if prompt else s.misses for s in self.stats.values())
        return h / (h + m) if h + m else 0.0


# ---------------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------------

@dataclass
class Profile:
    num_experts: int
    counts: dict[int, list[float]]           # layer -> [E] routing counts (or scores)
    hot: dict[int, list[int]]                # layer -> hot set, most valuable first
    policy: str | None = None                # policy `auto` chose (None: static placement)
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def profile_from_counts(counts: Mapping[int, Sequence[float]],
                        capacity: int | Mapping[int, int] | None = None, budget: int | None = None,
                        **meta) -> Profile:
    """Hot set = top-`capacity` experts per layer, or the top `budget` (layer, expert) pairs overall."""
    counts = {int(l): np.asarray(c, np.float64) for l, c in counts.items()}
    E = len(next(iter(counts.values())))
    pol = Static(None)
    pol.bind(list(counts), E)
    pol.seed(Profile(E, {l: c.tolist() for l, c in counts.items()}, {}))
    caps = capacity if isinstance(capacity, Mapping) else {l: capacity or E for l in counts}
    plan = plan_by_scores(pol, 0, {l: set() for l in counts}, Capacity(caps, budget))
    hot = {l: [] for l in counts}
    for l, c, _ in plan:
        if c is not None:
            hot[l].append(c)
    return Profile(E, {l: c.tolist() for l, c in counts.items()}, hot, meta=dict(meta))


def save_profile(path: str | Path, profile: Profile) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": PROFILE_FORMAT, "version": 1, "num_experts": profile.num_experts,
           "policy": profile.policy, "params": profile.params, "meta": profile.meta,
           "layers": {str(l): {"counts": [round(float(x), 6) for x in profile.counts.get(l, [])],
                               "hot": [int(e) for e in profile.hot.get(l, [])]}
                      for l in sorted(set(profile.counts) | set(profile.hot))}}
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_profile(path: str | Path, num_experts: int | None = None) -> Profile:
    path = Path(path)
    doc = read_json(path, "routing profile", ProfileError)
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT or "layers" not in doc:
        raise ProfileError(f"{path} is not a hotexperts routing profile (format {PROFILE_FORMAT!r})")
    E = int(doc["num_experts"])
    if num_experts is not None and E != num_experts:
        raise ProfileError(f"{path} is for a model with {E} experts per layer, this one has {num_experts}")
    counts, hot = {}, {}
    for key, entry in doc["layers"].items():
        l = int(key)
        counts[l] = [float(x) for x in entry.get("counts", [])] or [0.0] * E
        hot[l] = [int(e) for e in entry.get("hot", [])]
        if len(counts[l]) != E or any(not 0 <= e < E for e in hot[l]):
            raise ProfileError(f"{path}: layer {l} has counts for {len(counts[l])} experts or hot ids "
                               f"outside [0, {E - 1}]")
    params, meta = dict(doc.get("params") or {}), dict(doc.get("meta") or {})
    return Profile(E, counts, hot, doc.get("policy"), params, meta)
