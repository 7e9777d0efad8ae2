"""CachePlanner: drives a cache policy. It turns routing observations and the current residency into swaps,
and keeps no copy of the residency (torch-free, numpy only; the live slot cache and the simulator share it,
so identical calls give identical hits, misses and swaps).

    planner = CachePlanner(policy, layers, num_experts, capacity=K | {layer: K}, max_swaps_per_step=4,
                           budget=None | slots, prompt_bypass=64, max_fills_per_step=64)
    planner.observe(step, layer, experts, prompt, tokens=T, hits=flags)       # stats + policy.access
    planner.observe_step(step, layers, experts[n, M], hits[n, M], prompt=False, tokens=1)
        # one call per forward pass; bit for bit the same as observe(step, layers[i], experts[i], prompt,
        # tokens=tokens, hits=hits[i][experts[i] >= 0].tolist()) for i in order
    planner.plan(step, prompt, residency) -> list[Swap]     # swaps to issue now (bounded); reads residency
    planner.cold_start(residency) / warm_start(profile, residency) -> loads  (issue, then commit)
    planner.export_profile(residency) -> Profile;  planner.stats[layer] (LayerStats);  planner.hit_rate()
    planner.request_prefetch(step, layer, guesses, residency, max_fills=2, cold_steps=8) -> list[Swap]
        # a prediction ("these experts of `layer` are likely routed next") -> the fills to issue now
    planner.prefetch.stats (PrefetchStats: requests, predictions, busy, issued, useful, late, wasted, recall)

The owner of the residency (experts/residency.py) applies what plan() returns: `residency.start(swaps)` at
once (the slot cache: as it issues the copies), `residency.commit(...)` when the fills complete.
Order per forward pass: lookup (the residency) -> compute -> observe (every layer, or one observe_step for
all of them); then plan -> start -> commit.
Bounds: per decode step at most max_swaps loads that evict a resident and max_fills loads into free slots
(fills evict nothing, or only a placeholder). `cold_start` fills every slot at load with placeholders (no
profile): experts no routing has chosen yet. After a prompt, its most-routed experts fill the FREE slots and
those of placeholders, evicting nothing routing ever chose: prompt routing seeds the cache but never
flushes the decode working set. Prompt batches over `prompt_bypass` tokens are not shown to the policy.

Prefetch (next-layer prediction, experts/predict.py) is a request to this one swap decider, never a second
one. request_prefetch fills guessed experts of `layer` that hold no slot, at most `max_fills`, under its
rules: nothing while any fill is in flight (residency.pending: the link is busy); a free slot only within
the layer's capacity and the global budget (never beyond hot:K or the pool); else the slot of a cold
resident of that layer: not routed in the `cold_steps` steps before this one, not guessed now, least
recently routed first (placeholders count as never routed). It never moves a slot between layers, so no
entry of another layer (the current layer's step reads its own) is touched; cold_steps >= 1 also keeps the
previous step's entries (the slot cache's read guard makes even those safe to refill). The policy never
sees prefetches: a guess that routing does not confirm is the first thing the policy evicts. The ledger
counts, per (layer, expert): issued, useful (routed while resident, before any eviction), late (routed
while its fill was in flight), wasted (evicted before any routing chose it), and the recall of the guesses
against the layer's routing in the same step (all cells, and the cells whose expert held no slot when
guessed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hotexperts.errors import HotExpertsError
from hotexperts.experts.policies.base import CachePolicy, Capacity, Swap, _cells, _grid, _idarr
from hotexperts.experts.profile import Profile
from hotexperts.experts.residency import Residency

NEVER = -(1 << 62)          # _last_routed of an expert no routing has chosen


class _Occupied(dict):
    """layer -> resident | pending, each made (a copy) on first access."""

    def __init__(self, resident, pending):
        super().__init__()
        self.resident, self.pending = resident, pending

    def __missing__(self, layer):
        occ = self[layer] = self.resident[layer] | self.pending[layer]
        return occ


class _Copies(dict):
    """layer -> a copy of `sets[layer]`, made on first access."""

    def __init__(self, sets):
        super().__init__()
        self.sets = sets

    def __missing__(self, layer):
        s = self[layer] = set(self.sets[layer])
        return s


class _Scratch:
    """One plan's working view of a Residency: the swaps chosen so far applied to copies made on first use
    (the residency itself is only read; its owner applies the returned swaps)."""

    def __init__(self, res: Residency, layers: Sequence[int]):
        self.resident = _Copies(res.resident)
        self.occ = _Occupied(self.resident, res.pending)
        self.total = res.total(layers)


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prompt_hits: int = 0
    prompt_misses: int = 0
    loads: int = 0          # swaps (copies) issued
    evictions: int = 0


@dataclass
class PrefetchStats:
    """Counts of next-layer prefetch requests (request_prefetch; module doc), of (layer, expert) entries."""
    requests: int = 0          # request_prefetch calls
    predictions: int = 0       # distinct guessed experts over all requests
    busy: int = 0              # requests that filled nothing: a fill was in flight (the link busy)
    issued: int = 0            # prefetch loads planned
    useful: int = 0            # prefetched, then routed while resident (a hit) before any eviction
    late: int = 0              # prefetched, routed while its fill was still in flight (a miss all the same)
    wasted: int = 0            # prefetched, evicted before any routing chose it
    routed: int = 0            # recall: cells routed in a guessed layer and step ...
    covered: int = 0           #   ... whose expert was guessed
    missed: int = 0            # miss recall: of those cells, the ones whose expert held no slot when guessed
    missed_covered: int = 0    #   ... and was guessed

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["recall"] = self.covered / self.routed if self.routed else None
        d["miss_recall"] = self.missed_covered / self.missed if self.missed else None
        return d


class PrefetchLedger:
    """What became of each prefetch and each guess (torch-free). guessed -> loaded -> routed | evicted."""

    def __init__(self, layers: Sequence[int]):
        self.stats = PrefetchStats()
        self.loaded: dict[int, set[int]] = {l: set() for l in layers}      # prefetched, not yet routed
        self._guess: dict[int, tuple[int, set[int], set[int]]] = {}       # layer -> (step, guesses, occupied)
        self._waiting = 0                                                   # entries of `loaded`

    @property
    def watching(self) -> bool:
        """Some guess or prefetched entry waits for routing (else routed() has nothing to count)."""
        return bool(self._guess) or self._waiting > 0

    def guessed(self, step: int, layer: int, guesses: list[int], occupied: set[int]) -> None:
        self.stats.requests += 1
        self.stats.predictions += len(guesses)
        self._guess[layer] = (step, set(guesses), set(occupied))

    def load(self, layer: int, expert: int) -> None:
        if expert not in self.loaded[layer]:
            self._waiting += 1
        self.stats.issued += 1
        self.loaded[layer].add(expert)

    def evicted(self, layer: int, expert: int) -> None:
        box = self.loaded.get(layer)
        if box and expert in box:
            box.discard(expert)
            self._waiting -= 1
            self.stats.wasted += 1

    def routed(self, step: int, layer: int, experts: list[int], hits: list[bool] | None) -> None:
        """Layer `layer`'s routed experts (-1 removed) at `step` with their hit flags (None: all hits)."""
        st, guess = self.stats, self._guess.pop(layer, None)
        if guess is not None and guess[0] == step:
            g, occ = guess[1], guess[2]
            st.routed += len(experts)
            st.covered += sum(e in g for e in experts)
            cold = [e for e in experts if e not in occ]
            st.missed += len(cold)
            st.missed_covered += sum(e in g for e in cold)
        box = self.loaded.get(layer)
        if not box:
            return
        for e, h in zip(experts, hits if hits is not None else [True] * len(experts), strict=True):
            if e in box:
                box.discard(e)
                self._waiting -= 1
                if h:
                    st.useful += 1
                else:
                    st.late += 1


class CachePlanner:
    """The one driver of a policy, for the live slot cache and the simulator alike (see module doc)."""

    def __init__(self, policy: CachePolicy, layers: Sequence[int], num_experts: int,
                 capacity: int | Mapping[int, int] | None = None, max_swaps_per_step: int | None = 4, *,
                 budget: int | None = None, prompt_bypass: int = 64, max_fills_per_step: int | None = 64):
        self.layers, self.E = [int(l) for l in layers], int(num_experts)
        caps = capacity if isinstance(capacity, Mapping) else {l: capacity for l in self.layers}
        if capacity is None:
            caps = {l: self.E for l in self.layers}
            if budget is None:
                raise HotExpertsError("CachePlanner needs a per-layer capacity or a global budget")
        self.capacity = Capacity({l: min(int(caps[l]), self.E) for l in self.layers}, budget)
        self.max_swaps, self.prompt_bypass = max_swaps_per_step, int(prompt_bypass)
        self.max_fills = max_fills_per_step
        self._prompt = np.zeros((len(self.layers), self.E))                # routing of the current prompt
        self._prompt_counts = {l: self._prompt[i] for i, l in enumerate(self.layers)}    # rows (views)
        self._index = {l: i for i, l in enumerate(self.layers)}
        self.policy = policy
        policy.bind(self.layers, self.E)
        self._rows_of: dict[tuple, tuple[np.ndarray, np.ndarray] | None] = {}   # observe_step's layers
        self.stats = {l: LayerStats() for l in self.layers}
        self.backlog: list[Swap] = []
        self.decode_steps = 0
        self._ph = np.zeros((len(self.layers), self.E), bool)      # cold_start's loads never routed since
        self._ph_any = False
        self._last_routed = np.full((len(self.layers), self.E), NEVER, np.int64)   # step each was routed
        self.prefetch = PrefetchLedger(self.layers)

    # ---- observations ----------------------------------------------------------------------------
    def observe(self, step: int, layer: int, experts, prompt: bool = False, *, tokens: int = 1,
                hits: Sequence[bool] | None = None) -> None:
        """Record hit flags (from lookup) in the stats; feed the policy unless a large prompt batch."""
        if hits is not None:
            st, h = self.stats[layer], int(sum(hits))
            if prompt:
                st.prompt_hits, st.prompt_misses = st.prompt_hits + h, st.prompt_misses + len(hits) - h
            else:
                st.hits, st.misses = st.hits + h, st.misses + len(hits) - h
        routed = _idarr(experts)
        self._last_routed[self._index[layer], routed] = step
        if self.prefetch.watching:
            self.prefetch.routed(step, layer, routed.tolist(), None if hits is None else list(hits))
        if prompt:
            np.add.at(self._prompt_counts[layer], routed, 1.0)
        if self._ph_any:
            self._ph[self._index[layer], _idarr(experts)] = False       # routed: no placeholder any more
        if not (prompt and tokens > self.prompt_bypass):
            self.policy.access(step, layer, experts, prompt)

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
        self._last_routed.reshape(-1)[_cells(idx[0], x, self.E)] = step
        if self.prefetch.watching:
            self._prefetch_routed(step, key, x, hits)
        if prompt:
            np.add.at(self._prompt.reshape(-1), _cells(idx[0], x, self.E), 1.0)
        if self._ph_any:
            self._ph.reshape(-1)[_cells(idx[0], x, self.E)] = False      # routed: no placeholder any more
        if not (prompt and tokens > self.prompt_bypass):
            self.policy.access_step(step, idx[1], x, prompt)

    def _prefetch_routed(self, step: int, layers: tuple, x: np.ndarray, hits) -> None:
        """observe_step's rows for the prefetch ledger (only while it watches something)."""
        h = None if hits is None else _grid(hits, len(layers)).astype(bool, copy=False)
        for i, l in enumerate(layers):
            valid = x[i] >= 0
            self.prefetch.routed(step, l, x[i][valid].tolist(), None if h is None else h[i][valid].tolist())

    # ---- next-layer prefetch -------------------------------------------------------------------------
    def request_prefetch(self, step: int, layer: int, guesses, res: Residency, *, max_fills: int = 2,
                         cold_steps: int = 8) -> list[Swap]:
        """A prediction: experts `guesses` (ids, best first; -1 skipped) of `layer` are likely routed at
        `step`. -> the prefetch loads to issue now, under the rules of the module doc (possibly none)."""
        if max_fills < 0 or cold_steps < 0:
            raise HotExpertsError(f"prefetch: max_fills and cold_steps must be >= 0, got {max_fills} "
                                  f"and {cold_steps}")
        if layer not in self._index:
            return []
        want = list(dict.fromkeys(e for e in _idarr(guesses).tolist() if e < self.E))
        occ = res.occupied([layer])[layer]
        self.prefetch.guessed(step, layer, want, occ)
        if res.in_flight(self.layers):
            self.prefetch.stats.busy += 1
            return []
        guessed, want = set(want), [e for e in want if e not in occ][:max_fills]
        if not want:
            return []
        return self._prefetch_loads(layer, want, res, self._cold(step, layer, res, guessed, cold_steps))

    def _prefetch_loads(self, layer: int, want: list[int], res: Residency, victims: list[int]) -> list[Swap]:
        """Loads of `want` into free slots within capacity, else into the victims' slots, in order."""
        work, out = _Scratch(res, self.layers), []
        for e in want:
            v = None
            if not self._free(layer, work.occ, work.total):
                if not victims:
                    break
                v = victims.pop(0)
                self._evict(layer, v, work, out, paired=True)
            work.occ[layer].add(e)
            work.total += 1
            self.stats[layer].loads += 1
            self.prefetch.load(layer, e)
            out.append((layer, e, v))
        return out

    def _cold(self, step: int, layer: int, res: Residency, keep: set[int], cold_steps: int) -> list[int]:
        """Residents of `layer` not routed in the last `cold_steps` steps and not in `keep`, least recently
        routed first (ties: lower id)."""
        resident = np.fromiter(res.resident[layer], np.int64, len(res.resident[layer]))
        last = self._last_routed[self._index[layer], resident]
        cold = np.lexsort((resident, last))
        cold = cold[last[cold] < step - cold_steps]
        return [e for e in resident[cold].tolist() if e not in keep]

    # ---- per forward pass ----------------------------------------------------------------------
    def plan(self, step: int, prompt: bool, res: Residency) -> list[Swap]:
        """The swaps to issue after this forward pass (bounded), given the residency now."""
        if prompt:
            return self._fill_from_prompt(res)
        if self._ph_any and self.decode_steps % 64 == 0:
            self._ph_any = bool(self._ph.any())                    # every placeholder routed or evicted
        if self.decode_steps % self.policy.interval == 0:
            self.backlog = self.policy.plan(step, res.occupied(self.layers), self.capacity)
        self.decode_steps += 1
        issued, self.backlog = self._issue(self.backlog, res)
        return issued

    def _fill_from_prompt(self, res: Residency) -> list[Swap]:
        """After a prompt chunk: copy its most-routed experts into FREE slots, and into the slots of load-time
        placeholders no routing has chosen yet (cold_start). An expert any prompt or decode step routed is
        never evicted here, so prompt routing never flushes the decode working set. Not bounded: it runs
        once per prompt chunk."""
        work = _Scratch(res, self.layers)
        occ, total = work.occ, work.total
        rows = sorted(range(len(self.layers)), key=lambda i: self.layers[i])
        counts = self._prompt[rows]
        ri, es = np.nonzero(counts > 0)                            # ascending (layer, expert)
        order = np.argsort(-counts[ri, es], kind="stable")         # most routed first, ties: (layer, expert)
        ranked = zip([self.layers[rows[i]] for i in ri[order].tolist()], es[order].tolist(), strict=True)
        spare = self._spare_placeholders(res)
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
                self._evict(vl, v, work, out, paired=vl == l)      # another layer's: its own (l, None, v)
                v, total = (v if vl == l else None), total - 1
            occ[l].add(e)
            self.stats[l].loads += 1
            out.append((l, e, v))
            total += 1
        self._prompt[:] = 0.0
        return out

    def _spare_placeholders(self, res: Residency) -> dict[int, list[int]]:
        """Per layer, its resident placeholders (never routed since the load: evictable), highest id first."""
        if not self._ph_any:
            return {}
        spare = {}
        for i, l in enumerate(self.layers):
            es = np.flatnonzero(self._ph[i]).tolist()
            spare[l] = sorted((e for e in es if e in res.resident[l]), reverse=True)
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

    def _issue(self, swaps: list[Swap], res: Residency) -> tuple[list[Swap], list[Swap]]:
        """Planned swaps in order, as issued: at most max_swaps loads that evict, max_fills into free slots;
        -> (issued, backlog)."""
        if not swaps:
            return [], []
        work = _Scratch(res, self.layers)
        occ, resident, issued, held, loads, fills = work.occ, work.resident, [], [], 0, 0
        for i, (l, c, v) in enumerate(swaps):
            free = self._free(l, occ, work.total) if v is None else self.is_placeholder(l, v)
            into_free = c is not None and free
            limit, used = (self.max_fills, fills) if into_free else (self.max_swaps, loads)
            if limit is not None and used >= limit:
                return issued, held + swaps[i:]
            if c is None:
                if v in resident[l]:
                    held.append((l, None, v))
                continue
            if c in occ[l] or (v is not None and v not in resident[l]):
                continue
            if v is None and not self._free(l, occ, work.total):
                while held and not self._free(l, occ, work.total):
                    hl, _, hv = held.pop()
                    self._evict(hl, hv, work, issued)
                if not self._free(l, occ, work.total):
                    continue
            if v is not None:
                self._evict(l, v, work, issued, paired=True)
            occ[l].add(c)
            self.stats[l].loads += 1
            issued.append((l, c, v))
            work.total += 1
            fills, loads = (fills + 1, loads) if into_free else (fills, loads + 1)
        return issued, []

    def _free(self, layer, occ, total) -> bool:
        if len(occ[layer]) >= self.capacity[layer]:
            return False
        return self.capacity.budget is None or total < self.capacity.budget

    def _evict(self, layer, expert, work: _Scratch, issued, paired=False):
        if self._ph_any:
            self._ph[self._index[layer], expert] = False
        work.resident[layer].discard(expert)
        work.occ[layer].discard(expert)
        work.total -= 1
        self.stats[layer].evictions += 1
        self.prefetch.evicted(layer, expert)
        if not paired:
            issued.append((layer, None, expert))

    # ---- start-up and profiles -----------------------------------------------------------------
    def cold_start(self, res: Residency) -> list[Swap]:
        """Without a profile: loads that fill every slot before any routing is known (round-robin over the
        layers, experts in index order, so a global budget is shared evenly as far as each layer's cap
        allows), so no slot idles until the first prompt. They are placeholders until routing chooses
        them: the policy gets no counts, a prompt's fill may replace them, and a decode swap that evicts
        one counts as a fill (max_fills, not max_swaps). Issue, then commit."""
        occ = res.occupied(self.layers)
        total, out = sum(len(s) for s in occ.values()), []
        for e in range(self.E):
            for i, l in enumerate(self.layers):
                if e in occ[l] or not self._free(l, occ, total):
                    continue
                occ[l].add(e)
                self._ph[i, e] = self._ph_any = True
                out.append((l, e, None))
                total += 1
        return out

    def warm_start(self, profile: Profile, res: Residency) -> list[Swap]:
        """Seed the policy from a profile and return the loads of its hot set (issue, then commit)."""
        self.policy.seed(profile)
        ranked = sorted(((c[e], l, e) for l, hot in profile.hot.items() if l in self._index
                         for e, c in ((e, profile.counts.get(l, [1.0] * self.E)) for e in hot)),
                        key=lambda t: -t[0])
        occ = res.occupied(self.layers)
        total, out = sum(len(s) for s in occ.values()), []
        for _, l, e in ranked:
            if 0 <= e < self.E and e not in occ[l] and self._free(l, occ, total):
                occ[l].add(e)
                out.append((l, e, None))
                total += 1
        return out

    def export_profile(self, res: Residency, **meta) -> Profile:
        counts = {}
        for l in self.layers:
            try:
                s = np.asarray(self.policy.scores(self.decode_steps, l), np.float64)
                counts[l] = np.where(np.isfinite(s) & (s > 0), s, 0.0).tolist()
            except NotImplementedError:
                counts[l] = [1.0 if e in res.resident[l] else 0.0 for e in range(self.E)]
        hot = {l: sorted(res.resident[l], key=lambda e, l=l: -counts[l][e]) for l in self.layers}
        return Profile(self.E, counts, hot, self.policy.name, self.policy.params(), dict(meta))

    def hit_rate(self, prompt: bool = False) -> float:
        h = sum(s.prompt_hits if prompt else s.hits for s in self.stats.values())
        m = sum(s.prompt_misses if prompt else s.misses for s in self.stats.values())
        return h / (h + m) if h + m else 0.0


