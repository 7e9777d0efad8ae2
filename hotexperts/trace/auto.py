"""`auto`: pick the cache policy and its parameters for a model from a routing trace (numpy only).

    choose(trace, slots=K | budget=B, shape=, hw=, grid=GRID) -> Choice(policy, params, score, table)
    write(choice, path)  -> a routing profile JSON the live cache accepts:
                            `--moe-policy auto --moe-profile FILE` (or the chosen policy's name)

Method: the trace's decode tokens are split in time; the first part (`fit`) gives routing counts (the static
hot set and every policy's warm start), the second (`test`) is replayed through each grid point by the
simulator. The winner has the best cost-model decode tokens/s on `test` (hit rate breaks ties). The written
profile holds counts over the whole trace, the hot set for the capacity, and the winner's name and params.

CLI: `hotexperts auto TRACE (--slots K | --budget B) [--profile HW] [--model-shape S] [--out FILE]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hotexperts.errors import HotExpertsError
from hotexperts.experts.profile import Profile, profile_from_counts, save_profile
from hotexperts.trace import costmodel, profiles
from hotexperts.trace.format import RoutingTrace
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


def split(trace: RoutingTrace, fit_fraction: float = 0.5) -> tuple[RoutingTrace, RoutingTrace]:
    """Time split at a decode token: (fit, test); test starts at a pass boundary."""
    decode = np.flatnonzero(~trace.is_prompt)
    if decode.size < 4:
        raise HotExpertsError("auto needs a trace with at least a few generated (decode) tokens")
    cut = int(decode[int(decode.size * fit_fraction)])
    rows = np.arange(trace.num_tokens)
    return trace.take(rows < cut), trace.take(rows >= cut)


def _score(r: SimResult, shape, hw) -> float:
    if shape is None or hw is None:
        return r.hit_rate
    return costmodel.predict_cache(shape, hw, r).decode_tps


def choose(trace: RoutingTrace, *, slots: int | None = None, budget: int | None = None, shape=None,
           hw=None, grid: dict | None = None, max_swaps_per_step: int | None = None,
           prompt_bypass: int = 64, fit_fraction: float = 0.5, log=None) -> Choice:
    grid = GRID if grid is None else grid
    fit, test = split(trace, fit_fraction)
    warm = trace_profile(fit)
    cost = auto_cost_params(shape, hw)
    best, table = None, []
    for name, points in grid.items():
        for params in points:
            extra = cost if name == "auto" else {}
            r = simulate(test, name, slots=slots, budget=budget, max_swaps_per_step=max_swaps_per_step,
                         prompt_bypass=prompt_bypass, profile=warm, warm_start=warm, **params, **extra)
            s = _score(r, shape, hw)
            table.append({"policy": name, "params": params, "hit_rate": r.hit_rate, "score": s,
                          "swaps_per_token": r.swaps_per_token})
            if log:
                log(f"{name:<11} {json.dumps(params):<90} hit {100 * r.hit_rate:5.1f}%  score {s:8.2f}")
            if best is None or (s, r.hit_rate) > (best.score, best.result.hit_rate):
                best = Choice(name, dict(params, **extra), r, s)
    best.table = sorted(table, key=lambda t: -t["score"])
    best.profile = _profile(trace, best, slots, budget, shape, hw)
    return best


def _profile(trace, choice: Choice, slots, budget, shape, hw) -> Profile:
    counts = trace_profile(trace).counts
    prof = profile_from_counts(counts, capacity=slots, budget=budget)
    prof.policy, prof.params = choice.policy, choice.params
    prof.meta = {"model": trace.meta.get("model"), "source": "hotexperts auto", "top_k": trace.top_k,
                 "slots": slots, "budget": budget, "hit_rate": choice.result.hit_rate, "score": choice.score,
                 "score_unit": "decode tok/s (cost model)" if shape and hw else "hit rate",
                 "hardware": getattr(hw, "name", None), "shape": getattr(shape, "name", None),
                 "runners_up": choice.table[1:6]}
    return prof


def write(choice: Choice, path: str | Path) -> Path:
    return save_profile(path, choice.profile)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("auto", help="choose the cache policy for a model from a routing trace",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="routing trace .npz")
    p.add_argument("--slots", type=int, default=None, help="slots per layer (hot:K)")
    p.add_argument("--budget", default=None, help="global budget: slots (600) or bytes (8GiB)")
    p.add_argument("--profile", "--hardware", dest="profile", default="h200",
                   help="hardware profile name or calibrated JSON")
    p.add_argument("--model-shape", default=None, help="model shape preset (default: from the trace)")
    p.add_argument("--expert-mb", type=float, default=None, help="bytes of one expert in MB (GPU format)")
    p.add_argument("--max-swaps", type=int, default=None, help="copies per decode step (default unbounded)")
    p.add_argument("--out", default="moe-profile.json", help="routing profile to write")
    p.set_defaults(func=run)


def run(args) -> int:
    trace = RoutingTrace.load(args.trace)
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
    print(f"chose {choice.policy} {json.dumps(choice.params)}: hit {100 * choice.result.hit_rate:.1f}%, "
          f"{choice.score:.2f} {unit}; wrote {path} (use --moe-policy {choice.policy} --moe-profile {path})")
    return 0
