"""Replay a RoutingTrace through the live cache's own CachePlanner and policy classes (numpy only).

    SimulatedCache(policy, layers, E, capacity, max_swaps, budget=..., prompt_bypass=...): the planner over a
    Residency of its own whose fills complete at once (the live engine's SlotCache owns the residency there).

    simulate(trace, "lru", slots=16) -> SimResult          # per-layer capacity (`hot:K`)
    simulate(trace, "auto", budget=600)                    # one global slot budget (`cache:BUDGET`)
    simulate(trace, "lru", slots=16, prefetch=Prefetch(predicted))   # with next-layer prefetch
    fill_belady(results)                                   # vs_belady of one comparison's results
    load_predicted(path, trace) -> predicted [N, Lm, P] int16 | None   # stored beside a trace (learned.py)

`simulate` is one replay of the whole trace as the live cache runs it (the fidelity test). Comparisons of
policies (`heldout.sweep`, `hotexperts simulate`, `hotexperts auto`) build on it with trace/heldout.py's
rule: tuned on the first half of the decode tokens, scored on the second, every policy (Belady included)
from the same warm state. The flow is one way: heldout imports this module, never the reverse.

Replay order, as in the live engine: one forward pass per iteration (`trace.iterations()`: a prompt batch
or one decoded token); every MoE layer's lookup -> observe (hit flags counted; one lookup_step and one
observe_step per pass, the same as per layer calls); then end_step -> commit at once. Prompt tokens are
counted apart from decode tokens; prompt batches over `prompt_bypass` tokens are not shown to the policy.
Hit rates count routed selections (token, k); cells with id -1 are skipped. Each token's experts reach the
planner by descending router weight where the trace has weights (stable: the recorded order where it has
none, as the engine's torch.topk lists them); policies break ties by that order (LRU: with fewer slots than
top-k it admits the highest-weighted misses).

Next-layer prefetch (`prefetch=Prefetch(predicted [N, Lm, P] int16, max_fills=2, cold_steps=8,
lands="layer")`; predicted column j: layer moe_layers[j]'s experts guessed from the previous MoE layer,
best first, -1 = none; column 0 unused): in decode passes only (the engine's NextLayerPrefetch runs on
synchronous decode steps), the layers are replayed one at a time and, between layer L's observe and layer
L+1's lookup, the pass's guesses for L+1 go to the same planner's `request_prefetch` (its rules: nothing
while a fill is in flight, free slots within hot:K / the budget, else cold residents of that layer); its
loads start in the simulated residency. `lands` models the link: "layer" = the fills complete before
layer L+1's lookup (an idle link fast enough for max_fills experts per layer: the upper bound); "token" =
they stay in flight until the end of the pass (a slow link: L+1 misses them, counted `late`, and the
in-flight rule blocks the pass's later requests; they are resident from the next token on). Prefetch loads
are counted apart from on-demand swaps (`prefetch_fills`; `bytes_moved` counts both); `prefetch` holds
the planner's PrefetchStats (issued, useful, late, wasted, recall, ...).

The CLI (`hotexperts simulate`: table, JSON, plots) is cli/simulate.py.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hotexperts.errors import HotExpertsError
from hotexperts.experts.planner import CachePlanner
from hotexperts.experts.policies import Belady, CachePolicy, Swap, make_policy
from hotexperts.experts.profile import Profile
from hotexperts.experts.residency import Residency
from hotexperts.trace import costmodel
from hotexperts.trace.format import RoutingTrace, TraceFormatError

ALL_POLICIES = ("lru", "window-lfu", "decay", "static", "belady", "auto")
PREDICTED = "predicted"          # the extra array of a trace .npz: next-layer predictions [N, Lm, P]
LANDS = ("layer", "token")


@dataclass
class Prefetch:
    """Next-layer prefetch in a replay (module doc): predictions aligned with the trace's rows."""
    predicted: np.ndarray               # [N, Lm, P] int16, -1 = no guess
    max_fills: int = 2                  # request_prefetch's max_fills (per request)
    cold_steps: int = 8                 # request_prefetch's cold_steps
    lands: str = "layer"                # "layer" | "token": when the fills complete

    def __post_init__(self):
        if self.lands not in LANDS:
            raise HotExpertsError(f"prefetch lands must be one of {', '.join(LANDS)}, got {self.lands!r}")
        if self.max_fills < 0 or self.cold_steps < 0:
            raise HotExpertsError(f"prefetch: max_fills and cold_steps must be >= 0, got {self.max_fills} "
                                  f"and {self.cold_steps}")

    def rows(self, keep) -> Prefetch:
        """The same settings over predicted[keep] (the rows of a part of the trace)."""
        return Prefetch(self.predicted[keep], self.max_fills, self.cold_steps, self.lands)

    def settings(self) -> dict:
        return dict(guesses=int(self.predicted.shape[2]), max_fills=self.max_fills,
                    cold_steps=self.cold_steps, lands=self.lands)


class SimulatedCache:
    """A CachePlanner and the Residency it plans over, whose fills complete when committed (the simulator's
    cache; the live engine's SlotCache owns its residency and copies experts in between).

        cache.lookup(layer, experts) / lookup_step(layers, experts[n, M])    against `resident`
        cache.observe(...) / observe_step(...)                                the planner's
        swaps = cache.end_step(step, prompt)     planned and issued: evictions leave `resident`, loads pend
        cache.commit(swaps)                      the loads' fills completed
        cache.cold_start() / warm_start(profile) -> loads (issued; commit them)
        loads = cache.issue_prefetch(step, layer, guesses, Prefetch)   the planner's request_prefetch, issued
    """

    def __init__(self, policy: CachePolicy, layers, num_experts: int, capacity=None,
                 max_swaps_per_step: int | None = 4, **kw):
        self.planner = CachePlanner(policy, layers, num_experts, capacity, max_swaps_per_step, **kw)
        self.residency = Residency(self.planner.layers, num_experts)
        self.resident, self.pending = self.residency.resident, self.residency.pending
        self.lookup, self.lookup_step = self.residency.lookup, self.residency.lookup_step
        self.observe, self.observe_step = self.planner.observe, self.planner.observe_step
        self.commit = self.residency.commit

    def __getattr__(self, name):               # stats, policy, layers, capacity, hit_rate, ... of the planner
        return getattr(self.planner, name)

    def _issued(self, swaps: list[Swap]) -> list[Swap]:
        self.residency.start(swaps)
        return swaps

    def end_step(self, step: int, prompt: bool = False) -> list[Swap]:
        return self._issued(self.planner.plan(step, prompt, self.residency))

    def issue_prefetch(self, step: int, layer: int, guesses, spec: Prefetch) -> list[Swap]:
        """The planner's prefetch loads for `layer`'s guesses, issued (commit them when they land)."""
        return self._issued(self.planner.request_prefetch(step, layer, guesses, self.residency,
                                                          max_fills=spec.max_fills,
                                                          cold_steps=spec.cold_steps))

    def cold_start(self) -> list[Swap]:
        return self._issued(self.planner.cold_start(self.residency))

    def warm_start(self, profile: Profile) -> list[Swap]:
        return self._issued(self.planner.warm_start(profile, self.residency))

    def export_profile(self, **meta) -> Profile:
        return self.planner.export_profile(self.residency, **meta)


@dataclass
class SimResult:
    policy: str
    slots: int | None                   # per-layer capacity, or None under a global budget
    budget: int | None                  # global slots, or None
    hit_rate: float                     # decode selections served from resident experts
    prompt_hit_rate: float
    layer_hit_rate: list[float]         # [Lm] decode
    decode_selections: int
    prompt_selections: int
    decode_tokens: int
    swaps: int                          # on-demand expert copies issued (the policy's)
    bytes_moved: int                    # all copies: on-demand swaps and prefetch fills
    params: dict = field(default_factory=dict)
    layer_counts: list[list[int]] = field(default_factory=list)   # [Lm] [hits, misses, prompt h., m.]
    vs_belady: float | None = None      # hit_rate ÷ Belady's at the same capacity
    predicted: dict | None = None       # cost model: decode/prompt tokens/s (when a profile is given)
    prefetch_fills: int = 0             # prefetch copies issued (request_prefetch's loads)
    prefetch: dict | None = None        # with prefetch: its settings + the planner's PrefetchStats

    @property
    def swaps_per_token(self) -> float:
        return self.swaps / max(self.decode_tokens, 1)

    @property
    def prefetch_fills_per_token(self) -> float:
        return self.prefetch_fills / max(self.decode_tokens, 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"swaps_per_token": self.swaps_per_token,
                               "prefetch_fills_per_token": self.prefetch_fills_per_token}


def passes(trace: RoutingTrace) -> list[tuple[int, bool, np.ndarray]]:
    """(step, prompt, rows) per forward pass, in time order."""
    it = trace.iterations()
    cuts = np.flatnonzero(np.diff(it)) + 1
    groups = np.split(np.arange(trace.num_tokens), cuts)
    return [(int(it[r[0]]), bool(trace.is_prompt[r[0]]), r) for r in groups if r.size]


def belady_future(trace: RoutingTrace, prompt_bypass: int = 64) -> list[tuple[int, int, np.ndarray]]:
    """Every access the controller will hand the policy, as (step, layer, ids)."""
    out = []
    for step, prompt, rows in passes(trace):
        if prompt and rows.size > prompt_bypass:
            continue
        for j, layer in enumerate(trace.moe_layers):
            out.append((step, layer, trace.ids[rows, j]))
    return out


def build_policy(name: str, trace: RoutingTrace, *, profile: Profile | None = None,
                 prompt_bypass: int = 64, **params) -> CachePolicy:
    if name == "belady":
        return Belady(belady_future(trace, prompt_bypass))
    if name == "static":
        return make_policy("static", profile=profile or trace_profile(trace))
    return make_policy(name, **params)


def trace_profile(trace: RoutingTrace, decode_only: bool = True) -> Profile:
    """Routing counts per layer (decode tokens by default): the in-sample static hot set."""
    rows = ~trace.is_prompt if decode_only and (~trace.is_prompt).any() else slice(None)
    counts = {}
    for j, layer in enumerate(trace.moe_layers):
        ids = trace.ids[rows, j].reshape(-1)
        counts[layer] = np.bincount(ids[ids >= 0], minlength=trace.num_experts).astype(float).tolist()
    meta = {"model": trace.meta["model"], "source": "trace counts", "top_k": trace.top_k}
    return Profile(trace.num_experts, counts, {l: [] for l in counts}, None, {}, meta)


def simulate(trace: RoutingTrace, policy: str | CachePolicy, *, slots: int | None = None,
             budget: int | None = None, max_swaps_per_step: int | None = None, prompt_bypass: int = 64,
             expert_nbytes: int = 0, profile: Profile | None = None, warm_start: Profile | None = None,
             cold_start: bool = True, prefetch: Prefetch | None = None, **params) -> SimResult:
    """Replay `trace` (module doc). The cache starts as the live one does: warm_start's hot set, else
    placeholders in every slot (CachePlanner.cold_start); cold_start=False starts it empty. prefetch:
    next-layer prefetch from its predictions (rows aligned with the trace's)."""
    if (slots is None) == (budget is None):
        raise HotExpertsError("simulate needs exactly one of slots (per layer) or budget (global slots)")
    if prefetch is not None:
        check_predicted(trace, prefetch.predicted)
    pol = policy if isinstance(policy, CachePolicy) else build_policy(
        policy, trace, profile=profile, prompt_bypass=prompt_bypass, **params)
    layers, ranked = trace.moe_layers, by_weight(trace)
    ctl = SimulatedCache(pol, layers, trace.num_experts, slots, max_swaps_per_step, budget=budget,
                         prompt_bypass=prompt_bypass)
    if warm_start is not None:
        ctl.commit(ctl.warm_start(warm_start))
    elif cold_start:
        ctl.commit(ctl.cold_start())
    decode_tokens = 0
    for step, prompt, rows in passes(trace):
        ids = ranked[rows].transpose(1, 0, 2).reshape(len(layers), -1)     # [Lm, T*K]
        if prefetch is None or prompt:
            ctl.observe_step(step, layers, ids, ctl.lookup_step(layers, ids), prompt, tokens=rows.size)
        else:
            ctl.commit(_prefetching_pass(ctl, step, layers, ids, prefetch, rows))
        ctl.commit(ctl.end_step(step, prompt))
        decode_tokens += 0 if prompt else rows.size
    return _result(ctl, pol, slots, budget, decode_tokens, expert_nbytes, prefetch)


def _prefetching_pass(ctl: SimulatedCache, step: int, layers: list[int], ids: np.ndarray, spec: Prefetch,
                      rows: np.ndarray) -> list[Swap]:
    """One decode pass layer by layer: lookup -> observe layer L, then request_prefetch of L+1's guesses
    (predicted[rows, L+1] [T, P] -> guesses by rank, as NextLayerPrefetch passes them). -> the prefetch
    loads still in flight at the end of the pass (lands="token"; "layer" commits them at once)."""
    in_flight: list[Swap] = []
    guesses = spec.predicted[rows].transpose(1, 2, 0).reshape(len(layers), -1)        # [Lm, P*T]
    for j, layer in enumerate(layers):
        row = ids[j:j + 1]
        ctl.observe_step(step, [layer], row, ctl.lookup_step([layer], row), False, tokens=rows.size)
        if j + 1 == len(layers):
            break
        loads = ctl.issue_prefetch(step, layers[j + 1], guesses[j + 1], spec)
        if spec.lands == "layer":
            ctl.commit(loads)
        else:
            in_flight += loads
    return in_flight


def by_weight(trace: RoutingTrace) -> np.ndarray:
    """trace.ids [N, Lm, K] with each cell's experts by descending router weight; unknown weights (NaN) and
    missing cells (-1) keep their recorded order, after the known ones."""
    w = np.asarray(trace.weights, np.float64)
    key = np.where(np.isfinite(w) & (trace.ids >= 0), -w, np.inf)
    if not np.isfinite(key).any():
        return trace.ids
    order = np.argsort(key, axis=-1, kind="stable")
    return np.take_along_axis(trace.ids, order, axis=-1)


def _result(ctl: SimulatedCache, pol: CachePolicy, slots, budget, decode_tokens, expert_nbytes,
            prefetch: Prefetch | None = None) -> SimResult:
    st = [ctl.stats[l] for l in ctl.layers]
    layer_hit = [s.hits / (s.hits + s.misses) if s.hits + s.misses else 0.0 for s in st]
    loads = sum(s.loads for s in st)                     # the planner counts prefetch loads here too
    fills = ctl.prefetch.stats.issued
    info = None if prefetch is None else prefetch.settings() | ctl.prefetch.stats.to_dict()
    return SimResult(pol.name, slots, budget, ctl.hit_rate(), ctl.hit_rate(prompt=True), layer_hit,
                     sum(s.hits + s.misses for s in st), sum(s.prompt_hits + s.prompt_misses for s in st),
                     decode_tokens, loads - fills, loads * int(expert_nbytes), pol.params(),
                     [[s.hits, s.misses, s.prompt_hits, s.prompt_misses] for s in st],
                     prefetch_fills=fills, prefetch=info)


def auto_cost_params(shape, hw) -> dict:
    """Pay-back inputs of the `auto` policy (costmodel.payback_costs)."""
    return costmodel.payback_costs(shape, hw)




def load_predicted(path: str | Path, trace: RoutingTrace) -> np.ndarray | None:
    """The `predicted` array stored beside `trace` (loaded from the same file), or None when absent."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if PREDICTED not in z.files:
                return None
            predicted = z[PREDICTED]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise TraceFormatError(f"{path}: cannot read its next-layer predictions: {e}") from None
    check_predicted(trace, predicted)
    return predicted.astype(np.int16, copy=False)


def check_predicted(trace: RoutingTrace, predicted: np.ndarray) -> None:
    """predicted must be [N, Lm, P] of expert ids in [-1, E) for the trace's N tokens and Lm layers."""
    p = np.asarray(predicted)
    if p.ndim != 3 or p.shape[:2] != trace.ids.shape[:2]:
        raise HotExpertsError(f"predicted {p.shape} does not match the trace {trace.ids.shape}: need "
                              f"[N, Lm, P] with N={trace.num_tokens}, Lm={trace.num_layers}")
    if p.size and (p.min() < -1 or p.max() >= trace.num_experts):
        raise HotExpertsError(f"predicted expert ids outside [-1, {trace.num_experts - 1}]")



def fill_belady(row: list[SimResult]) -> None:
    """vs_belady of each result of one comparison (one capacity), when Belady is among them."""
    best = next((r.hit_rate for r in row if r.policy == "belady"), None)
    for r in row:
        r.vs_belady = r.hit_rate / best if best else None


_fill_belady = fill_belady


def parse_bytes(text: str) -> int:
    """A byte size in the simulator's budget syntax (cli/simulate.py, trace/auto.py): '8GiB', '512MB',
    '600' (bytes)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise HotExpertsError(f"cannot read a size from {text!r} (examples: 600, 8GiB, 512MB)")
    unit = (m.group(2) or "").upper()
    mult = {"": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)
