"""`auto`: pick the cache policy and its parameters for a model from a routing trace (numpy only).

    choose(trace, slots=K | budget=B, shape=, hw=, grid=GRID) -> Choice(policy, params, score, table)
    write(choice, path)  -> a routing profile JSON the live cache accepts:
                            `--moe-policy auto --moe-profile FILE` (or the chosen policy's name)

Method: the held-out rule of trace/heldout.py. The trace's decode tokens are split in time; the first part
(`fit`) builds the one warm state every grid point starts from (its hot set for the capacity, loaded, and
each policy's seeded statistics; `static` = that hot set), the second (`test`) is replayed through each grid
point by the simulator, and through Belady from the same warm state (the reference: `Choice.belady`, each
row's `vs_belady`; no row can exceed it). The winner has the best cost-model decode tokens/s on `test` (hit
rate breaks ties). `auto`'s pay-back costs come from the shape (costmodel.payback_shape: a preset or the
trace's metadata) and the hardware profile. The written profile holds counts over the whole trace, the hot
set for the capacity, and the winner's name and params.

CLI (flags: cli/auto.py): `hotexperts auto TRACE (--slots K | --moe-cache SIZE) [--hardware HW]
[--model-shape S] [--out FILE]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hotexperts.errors import HotExpertsError
from hotexperts.experts.profile import Profile, profile_from_counts, save_profile
from hotexperts.trace import costmodel, profiles
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.heldout import split, warm_profile
from hotexperts.trace.import_shared import import_trace
from hotexperts.trace.simulate import SimResult, auto_cost_params, parse_bytes, simulate, trace_profile

GRID = {
    "lru": [{}],
    "window-lfu": [dict(window=w, interval=r, margin=m) for w in (64, 256) for r in (8, 60) for m in (0, 2)],
    "decay": [dict(half_life=h, interval=i) for h in (16, 64, 256) for i in (1, 8)],
    "static": [{}],
    "auto": [dict(half_life=h, recency_half_life=rh, recency_weight=w, interval=i, horizon=hz)
             for h in (64, 256) for rh, w in ((2, 4.0), (4, 1.0), (4, 0.0)) for i in (1, 8)
             for hz in (8, 64)],
}


@dataclass
class Choice:
    policy: str
    params: dict
    result: SimResult
    score: float                                   # predicted decode tok/s (or hit rate without a shape)
    table: list[dict] = field(default_factory=list)
    profile: Profile | None = None
    belady: SimResult | None = None                # Belady on `test` from the same warm state


__all__ = ["GRID", "Choice", "choose", "split", "write"]


def _score(r: SimResult, shape, hw) -> float:
    if shape is None or hw is None:
        return r.hit_rate
    return costmodel.predict_cache(shape, hw, r).decode_tps


def choose(trace: RoutingTrace, *, slots: int | None = None, budget: int | None = None, shape=None,
           hw=None, grid: dict | None = None, max_swaps_per_step: int | None = None,
           prompt_bypass: int = 64, fit_fraction: float = 0.5, log=None) -> Choice:
    grid = GRID if grid is None else grid
    fit, test = split(trace, fit_fraction)
    warm = warm_profile(fit, slots=slots, budget=budget)
    cost = auto_cost_params(shape or costmodel.payback_shape(trace), hw)
    kw = dict(slots=slots, budget=budget, max_swaps_per_step=max_swaps_per_step, prompt_bypass=prompt_bypass,
              profile=warm, warm_start=warm)
    oracle = simulate(test, "belady", **kw)
    best, table = None, []
    for name, points in grid.items():
        for params in points:
            extra = cost if name == "auto" else {}
            r = simulate(test, name, **kw, **params, **extra)
            r.vs_belady = r.hit_rate / oracle.hit_rate if oracle.hit_rate else None
            s = _score(r, shape, hw)
            table.append({"policy": name, "params": params, "hit_rate": r.hit_rate, "score": s,
                          "vs_belady": r.vs_belady, "swaps_per_token": r.swaps_per_token})
            if log:
                log(f"{name:<11} {json.dumps(params):<90} hit {100 * r.hit_rate:5.1f}% "
                    f"({_ratio(r.vs_belady)} of belady)  score {s:8.2f}")
            if best is None or (s, r.hit_rate) > (best.score, best.result.hit_rate):
                best = Choice(name, dict(params, **extra), r, s)
    if log:
        log(f"{'belady':<11} {'(offline reference, same warm state)':<90} hit {100 * oracle.hit_rate:5.1f}%")
    best.table, best.belady = sorted(table, key=lambda t: -t["score"]), oracle
    best.profile = _profile(trace, best, slots, budget, shape, hw)
    return best


def _ratio(x) -> str:
    return f"{x:.3f}" if x is not None else "-"


def _profile(trace, choice: Choice, slots, budget, shape, hw) -> Profile:
    counts = trace_profile(trace).counts
    prof = profile_from_counts(counts, capacity=slots, budget=budget)
    prof.policy, prof.params = choice.policy, choice.params
    prof.meta = {"model": trace.meta.get("model"), "source": "hotexperts auto", "top_k": trace.top_k,
                 "slots": slots, "budget": budget, "hit_rate": choice.result.hit_rate, "score": choice.score,
                 "vs_belady": choice.result.vs_belady,
                 "belady_hit_rate": getattr(choice.belady, "hit_rate", None),
                 "score_unit": "decode tok/s (cost model)" if shape and hw else "hit rate",
                 "hardware": getattr(hw, "name", None), "shape": getattr(shape, "name", None),
                 "runners_up": choice.table[1:6]}
    return prof


def write(choice: Choice, path: str | Path) -> Path:
    return save_profile(path, choice.profile)


def run(args) -> int:
    """`hotexperts auto` (flags: cli/auto.py): the trace may be any file import_trace reads."""
    trace = import_trace(args.trace)
    shape = costmodel.shape_for_trace(trace, args.model_shape, args.expert_mb)
    hw = profiles.get_profile(args.profile)
    if (args.slots is None) == (args.budget is None):
        raise HotExpertsError("give --slots K (per layer) or --budget B (global slots or bytes)")
    budget = None
    if args.budget is not None:
        budget = int(args.budget) if args.budget.isdigit() else None
        if budget is None:
            if shape is None:
                raise HotExpertsError("a byte budget needs the expert size: --expert-mb or --model-shape")
            budget = parse_bytes(args.budget) // shape.expert_bytes_gpu
    choice = choose(trace, slots=args.slots, budget=budget, shape=shape, hw=hw,
                    max_swaps_per_step=args.max_swaps, log=print)
    path = write(choice, args.out)
    unit = choice.profile.meta["score_unit"]
    print(f"chose {choice.policy} {json.dumps(choice.params)}: hit {100 * choice.result.hit_rate:.1f}% "
          f"({_ratio(choice.result.vs_belady)} of belady's {100 * choice.belady.hit_rate:.1f}%), "
          f"{choice.score:.2f} {unit}; wrote {path} (use --moe-policy {choice.policy} --moe-profile {path})")
    return 0
