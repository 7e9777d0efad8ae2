"""Synthetic routing with named, documented locality parameters, and presets calibrated to measurements.

numpy only (no torch). The model (per MoE layer l and token t, all layers independent):

    pop[l]   Zipf popularity over experts: the expert at popularity rank r gets mass 1/(r+1)**zipf; each
             layer has its own random rank -> expert permutation (different hot experts per layer).
    q[l, e]  = (1 - p_repeat - p_recent) * pop[l, e]
               + p_repeat * [e chosen by token t-1] / K
               + p_recent * [e chosen by one of tokens t-window .. t-2] / (number of such experts)
    ids      K distinct experts drawn from q without replacement (Gumbel top-K), ordered by weight;
    weights  softmax of K draws of N(0, weight_scale), sorted descending (a router-like spread).
    topic    every `shift_every` tokens (0 = never) a random `shift_fraction` of each layer's popularity
             ranks swap experts among themselves: the hot set drifts like a change of subject.

Requests: `num_requests` back to back, each `prompt_tokens` prompt tokens then `gen_tokens` generated
ones; the repeat/recent memory continues across requests (a fresh request is a topic shift when
shift_every > 0).

Public API:
    SyntheticParams (frozen dataclass; fields above + num_experts, top_k, num_layers, seed)
    generate(params, num_tokens=None, seed=None) -> RoutingTrace
    PRESETS: name -> Preset(params, targets, note);  preset(name) -> SyntheticParams
    check(params, targets, num_tokens) -> list[dict]   generated statistic vs target range, ok flag
    check_preset(name), calibration_table()           (`python -m hotexperts.trace.synthetic` prints both)
    calibrate(params, targets, knobs, ...) -> SyntheticParams   coordinate search on the named knobs
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from hotexperts.errors import HotExpertsError
from hotexperts.trace import stats
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.import_shared import SHARED_TRACES, find_shared_traces, load_shared


@dataclass(frozen=True)
class SyntheticParams:
    num_experts: int = 128              # E routed experts per layer
    top_k: int = 8                      # K experts per token
    num_layers: int = 48                # Lm MoE layers
    zipf: float = 1.0                   # popularity skew exponent (0 = uniform)
    p_repeat: float = 0.4               # mass on the previous token's experts
    p_recent: float = 0.1               # mass on experts of the recent window (tokens t-window .. t-2)
    window: int = 8                     # recent window in tokens (>= 2 for p_recent to matter)
    shift_every: int = 0                # topic shift period in tokens; 0 = never
    shift_fraction: float = 0.0         # share of popularity ranks reshuffled per shift
    weight_scale: float = 1.0           # std of router logits -> spread of the K weights
    num_requests: int = 1
    prompt_tokens: int = 0              # per request
    gen_tokens: int = 2048              # per request
    model: str = "synthetic"
    seed: int = 0

    def __post_init__(self):
        if not (0 < self.top_k <= self.num_experts) or self.num_layers < 1:
            raise HotExpertsError(f"need 0 < top_k <= num_experts and num_layers >= 1, got {self}")
        if min(self.p_repeat, self.p_recent) < 0 or self.p_repeat + self.p_recent > 1:
            raise HotExpertsError("p_repeat and p_recent must be >= 0 with a sum <= 1")
        if not 0 <= self.shift_fraction <= 1 or self.zipf < 0:
            raise HotExpertsError("shift_fraction must be in [0, 1] and zipf >= 0")


@dataclass(frozen=True)
class Preset:
    params: SyntheticParams
    targets: dict                       # statistic (a `stats.summarize` key) -> (lo, hi)
    note: str


def generate(params: SyntheticParams, num_tokens: int | None = None, seed: int | None = None) -> RoutingTrace:
    """A RoutingTrace following `params`; `num_tokens` overrides gen_tokens (one request, no prompt)."""
    if num_tokens is not None:
        params = replace(params, num_requests=1, prompt_tokens=0, gen_tokens=num_tokens)
    rng = np.random.default_rng(params.seed if seed is None else seed)
    per_req = params.prompt_tokens + params.gen_tokens
    n = params.num_requests * per_req
    ids = _route(params, rng, n)                                          # [N, Lm, K]
    weights = _weights(rng, ids.shape, params.weight_scale)
    pos = np.arange(n) % per_req
    meta = dict(model=params.model, num_experts=params.num_experts, top_k=params.top_k,
                moe_layers=list(range(params.num_layers)), source="synthetic",
                synthetic=dict(vars(params)), notes=["synthetic routing (trace/synthetic.py)"])
    request = (np.arange(n) // per_req).astype(np.int32)
    return RoutingTrace(ids, weights, pos < params.prompt_tokens, request, meta)


def _route(p: SyntheticParams, rng: np.random.Generator, n: int) -> np.ndarray:
    lm, e, k = p.num_layers, p.num_experts, p.top_k
    mass = 1.0 / np.arange(1, e + 1) ** p.zipf
    mass /= mass.sum()                                                    # [E] by rank
    rank_to_expert = np.argsort(rng.random((lm, e)), axis=1)              # [Lm, E] per-layer permutation
    pop = _popularity(rank_to_expert, mass)                               # [Lm, E]
    ring = np.full((max(p.window, 1), lm, k), -1, np.int64)               # recent tokens' ids, newest at 0
    rows = np.arange(lm)[:, None]
    out = np.empty((n, lm, k), np.int16)
    for t in range(n):
        if t and p.shift_every and t % p.shift_every == 0:
            _shift(rank_to_expert, p.shift_fraction, rng)
            pop = _popularity(rank_to_expert, mass)
        q = _mixture(p, pop, ring, rows)                                  # [Lm, E]
        scores = np.log(q + 1e-30) - np.log(-np.log(rng.random((lm, e))))  # Gumbel top-K = sampling w/o repl.
        ids = np.argpartition(-scores, k - 1, axis=1)[:, :k]              # [Lm, K]
        out[t] = ids
        ring = np.roll(ring, 1, axis=0)
        ring[0] = ids
    return out


def _popularity(rank_to_expert: np.ndarray, mass: np.ndarray) -> np.ndarray:
    pop = np.empty(rank_to_expert.shape)
    np.put_along_axis(pop, rank_to_expert, np.broadcast_to(mass, rank_to_expert.shape), axis=1)
    return pop


def _shift(rank_to_expert: np.ndarray, fraction: float, rng: np.random.Generator) -> None:
    lm, e = rank_to_expert.shape
    m = int(round(fraction * e))
    for layer in range(lm):
        ranks = rng.choice(e, m, replace=False)
        rank_to_expert[layer, ranks] = rank_to_expert[layer, rng.permutation(ranks)]


def _mixture(p: SyntheticParams, pop: np.ndarray, ring: np.ndarray, rows: np.ndarray) -> np.ndarray:
    q = pop.copy()
    if ring[0, 0, 0] < 0:                                                 # first token: popularity only
        return q
    prev = np.zeros_like(pop, dtype=bool)
    prev[rows, ring[0]] = True
    recent = np.zeros_like(prev)
    for ids in ring[1:p.window]:
        if ids[0, 0] >= 0:
            recent[rows, ids] = True
    recent &= ~prev
    n_recent = np.maximum(recent.sum(1, keepdims=True), 1)
    w_recent = p.p_recent * recent.any(1, keepdims=True)
    q *= 1.0 - p.p_repeat - w_recent
    return q + p.p_repeat * prev / p.top_k + w_recent * recent / n_recent


def _weights(rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
    logits = -np.sort(-rng.normal(0.0, scale, shape), axis=-1)            # descending per cell
    w = np.exp(logits - logits[..., :1])
    return (w / w.sum(-1, keepdims=True)).astype(np.float16)


# ---- presets and calibration -------------------------------------------------------------------

PRESETS: dict[str, Preset] = {
    "qwen3-30b-a3b": Preset(
        SyntheticParams(num_experts=128, top_k=8, num_layers=48, zipf=1.3, p_repeat=0.3, p_recent=0.2,
                        window=8, model="synthetic:qwen3-30b-a3b"),
        {"reuse_median": (1.5, 2.5), "repeat": (0.40, 0.50), "lru@0.4": (0.90, 0.95)},
        "published Qwen3-30B-A3B (native k=8): median reuse ~2 tokens, ~45% repeat at the next token, "
        "LRU holding 40% of experts hits 90-95%"),
    "mixtral-8x7b": Preset(
        SyntheticParams(num_experts=8, top_k=2, num_layers=32, zipf=0.3, p_repeat=0.18, p_recent=0.0,
                        window=2, model="synthetic:mixtral-8x7b"),
        {"reuse_median": (1.5, 2.5), "repeat": (0.34, 0.41), "lru@0.25": (0.34, 0.41),
         "lru@0.5": (0.57, 0.66), "top10_share": (0.14, 0.20)},
        "the real Mixtral-8x7B trace (shared/traces, vLLM, 585 decode tokens) measured by trace/stats.py"),
    "flat-512": Preset(
        SyntheticParams(num_experts=512, top_k=10, num_layers=48, zipf=0.6, p_repeat=0.15, p_recent=0.0,
                        window=2, shift_every=256, shift_fraction=0.5, model="synthetic:flat-512"),
        {"static_cov": (0.08, 0.12)},
        "512-expert models route flatly: a static top-32 learned on half a workload covers ~10% of the "
        "other half"),
    # Qwen3.5-MoE / Qwen3-Next: no routing trace of this family exists in ../shared, so these are
    # assumptions, labelled as such: Qwen3.5 (E=256, top-8) is fitted with calibrate() at E=256 to the
    # published Qwen3-30B-A3B statistics above (the nearest Qwen router with data, also top-8);
    # Qwen3-Next (E=512, top-10, 48 layers) takes flat-512's parameters, fitted for 512-expert models.
    "qwen3.5-122b-a10b": Preset(
        SyntheticParams(num_experts=256, top_k=8, num_layers=48, zipf=1.3, p_repeat=0.3, p_recent=0.15,
                        window=12, model="synthetic:qwen3.5-122b-a10b"),
        {"reuse_median": (1.5, 2.5), "repeat": (0.40, 0.50), "lru@0.4": (0.90, 0.95)},
        "ASSUMED (no trace of the family): Qwen3-30B-A3B's published statistics refitted at E=256"),
    "qwen3.5-35b-a3b": Preset(
        SyntheticParams(num_experts=256, top_k=8, num_layers=40, zipf=1.3, p_repeat=0.3, p_recent=0.15,
                        window=12, model="synthetic:qwen3.5-35b-a3b"),
        {"reuse_median": (1.5, 2.5), "repeat": (0.40, 0.50), "lru@0.4": (0.90, 0.95)},
        "ASSUMED (no trace of the family): Qwen3-30B-A3B's published statistics refitted at E=256"),
    "qwen3-next-80b-a3b": Preset(
        SyntheticParams(num_experts=512, top_k=10, num_layers=48, zipf=0.6, p_repeat=0.15, p_recent=0.0,
                        window=2, shift_every=256, shift_fraction=0.5, model="synthetic:qwen3-next-80b-a3b"),
        {"static_cov": (0.08, 0.12)},
        "ASSUMED (no trace of the family): flat-512's parameters (512-expert models route flatly)"),
}
STATIC_N = {"flat-512": 32, "qwen3-next-80b-a3b": 32}


def preset(name: str) -> SyntheticParams:
    if name not in PRESETS:
        raise HotExpertsError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].params


def check(params: SyntheticParams, targets: dict, num_tokens: int = 2048, static_n: int | None = None,
          num_layers: int | None = None) -> list[dict]:
    """Generate, measure (decode tokens) and compare each target statistic with its (lo, hi) range."""
    if num_layers is not None:
        params = replace(params, num_layers=num_layers)
    got = stats.summarize(generate(params, num_tokens=num_tokens), static_n=static_n,
                          fractions=_fractions(targets))
    return [dict(stat=key, value=got[key], lo=lo, hi=hi, ok=bool(lo <= got[key] <= hi))
            for key, (lo, hi) in targets.items()]


def _fractions(targets: dict) -> tuple[float, ...]:
    return tuple(sorted({0.25, 0.5} | {float(k.split("@")[1]) for k in targets if k.startswith("lru@")}))


def calibrate(params: SyntheticParams, targets: dict, knobs: dict, rounds: int = 3, num_tokens: int = 1024,
              num_layers: int = 8, static_n: int | None = None) -> SyntheticParams:
    """Coordinate search: each round tries every value of every knob (`knobs`: field -> candidate
    values) and keeps the one minimising the distance of the statistics to the centres of their
    ranges (relative to the range widths). Fast settings by default (8 layers, 1024 tokens)."""
    def loss(p: SyntheticParams) -> float:
        try:
            rows = check(p, targets, num_tokens, static_n, num_layers)
        except HotExpertsError:
            return float("inf")
        return sum(((r["value"] - (r["lo"] + r["hi"]) / 2) / (r["hi"] - r["lo"])) ** 2 for r in rows)

    best, best_loss = params, loss(params)
    for _ in range(rounds):
        for field, values in knobs.items():
            for v in values:
                cand = replace(best, **{field: v})
                cand_loss = loss(cand)
                if cand_loss < best_loss:
                    best, best_loss = cand, cand_loss
    return best


def check_preset(name: str, num_tokens: int = 2048, num_layers: int | None = None) -> list[dict]:
    p = PRESETS[name]
    return check(p.params, p.targets, num_tokens, STATIC_N.get(name), num_layers)


def calibration_table(num_tokens: int = 2048, real: bool = True) -> str:
    """Markdown: every preset's generated statistics (full depth) and, when present, the real traces'."""
    rows = []
    for name, p in PRESETS.items():
        s = stats.summarize(generate(p.params, num_tokens=num_tokens), static_n=STATIC_N.get(name))
        rows.append({**s, "model": f"synthetic:{name}"})
    if real:
        if find_shared_traces() is not None:
            rows += [{**stats.summarize(load_shared(n)), "model": f"real:{n}"} for n in SHARED_TRACES]
    return stats.format_table(rows)


if __name__ == "__main__":                      # python -m hotexperts.trace.synthetic: the docs' table
    print(calibration_table())
    for _name in PRESETS:
        print(_name, [(r["stat"], round(r["value"], 3), (r["lo"], r["hi"]), r["ok"])
                      for r in check_preset(_name)])
