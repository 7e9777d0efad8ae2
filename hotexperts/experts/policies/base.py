"""The policy contract and the ranking every score-based policy shares (torch-free, numpy only).

    Swap = (layer, load_expert | None, evict_expert | None)
        (l, c, v)     copy expert c into the slot that held v (same layer)
        (l, c, None)  copy c into a free slot
        (l, None, v)  free v's slot (only under a global budget: a slot moves between layers; the eviction
                      comes first in the list, the load that takes the slot right after it)

    policy.bind(layers, num_experts)            # the planner calls it once
    policy.access(step, layer, experts, prompt) # experts: the ids routed (flattened [T*K], -1 skipped)
    policy.access_step(step, rows, experts, prompt)   # batched: rows int64 [n] (distinct policy rows),
                                                # experts int64 [n, M], -1 skipped; = access per row in order
    policy.plan(step, occupied, capacity) -> list[Swap]   # priority order; `capacity` is a Capacity
    policy.scores_rows(step, rows) -> [n, E]    # scores of those rows (plan_by_scores ranks them at once)
    policy.accept_many(step, cand[n], victim[n] | None) -> bool[n] | None   # accept, vectorized (or None)

Capacity: per layer (`hot:K`, same K or a dict) or one global `budget` of slots shared by all layers
(`cache:BUDGET`): policies then rank (layer, expert) pairs together, so hot layers get more slots.
A policy keeps only its own statistics; it never holds the resident set (the planner hands it in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hotexperts.experts.profile import Profile

Swap = tuple[int, int | None, int | None]
NEG = -np.inf


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
