"""`hotexperts simulate`: replay a routing trace through the cache policies (no GPU, no model): the flags,
the run and its output. The replay is trace/simulate.py's, the held-out comparison trace/heldout.py's
`sweep`. The cache's flags are generate's (--moe-cache, --moe-max-swaps, --moe-pp-bypass) with the old
spellings (--budget, --max-swaps, --pp-bypass) kept.

    hotexperts simulate TRACE [--policies lru,decay,auto] [--slots 8,16 | --moe-cache 600slots,8GiB]
                       [--hardware HW] [--json FILE] [--plots DIR] [--markdown]
                       [--prefetch [--prefetch-fills 2] [--prefetch-cold-steps 8] [--prefetch-lands layer]]
TRACE: a .npz of `hotexperts trace`, or any raw file `bench --route-trace` reads (.route.csv,
*_routing.jsonl, a folder of them, a shared-trace name). Prints a table of hit rates, ÷ Belady, swaps and
bytes moved, and with a hardware profile the cost model's predicted decode tokens/s. --prefetch (a .npz
that carries next-layer predictions, trace/learned.save_recorded) replays every capacity again with
next-layer prefetch through the planner (trace/simulate.py's Prefetch) and prints hit rates without / with
it, prefetch fills per token and the planner's useful / late / wasted counts.

    run(args) -> 0                                 the command
    format_table(rows, trace) / markdown_grid(rows, num_experts) -> str   its table and grid
    prefetch_table(rows, with_prefetch) -> str     hit rates without / with prefetch, per policy and capacity
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from hotexperts.cli.flags import (
    HelpFormatter,
    add_cache_budget_arguments,
    add_hardware_argument,
    add_json_argument,
    add_plots_argument,
    budget_for_simulator,
)
from hotexperts.errors import HotExpertsError
from hotexperts.experts.profile import load_profile
from hotexperts.trace import costmodel, profiles
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.heldout import sweep
from hotexperts.trace.import_shared import import_trace
from hotexperts.trace.simulate import (
    ALL_POLICIES,
    LANDS,
    Prefetch,
    SimResult,
    auto_cost_params,
    load_predicted,
    parse_bytes,
)

DESCRIPTION = """\
Replay a recorded routing trace through the cache policies at several cache sizes, without a GPU or a model:
a table of hit rates (and how close each policy comes to Belady's optimum), swaps and bytes moved; with
--hardware, the cost model's predicted decode tok/s.

examples:
  hotexperts simulate trace.npz --policies lru,decay,auto,belady --slots 16,32,64
  hotexperts simulate run.route.csv --moe-cache 8GiB --model-shape qwen3-30b-a3b --hardware rtx4090-7950x
  hotexperts simulate e64k4-code.npz --policies lru,decay --slots 8,16 --prefetch
"""

TRACE_HELP = ("routing trace: a .npz (hotexperts trace), or a raw one as bench --route-trace reads it "
              "(.route.csv, *_routing.jsonl, a folder of them, or a shared-trace name)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="replay a routing trace through the cache policies",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("trace", metavar="TRACE", help=TRACE_HELP)
    p.add_argument("--policies", default=",".join(ALL_POLICIES), metavar="P[,P...]",
                   help="policies to compare (belady: the optimum, needs the future)")
    p.add_argument("--slots", default=None, metavar="K[,K...]", help="per-layer slot counts to sweep (hot:K)")
    add_cache_budget_arguments(p, sweep=True)
    add_hardware_argument(p, "profile", None, extra="without it no tok/s are predicted")
    p.add_argument("--static-profile", default=None, metavar="FILE",
                   help="routing profile JSON (hotexperts auto / --save-profile) for the static policy")
    p.add_argument("--model-shape", default=None, metavar="PRESET",
                   help="model shape for the cost model and byte budgets (default: from the trace)")
    p.add_argument("--expert-mb", type=float, default=None, metavar="MB",
                   help="bytes of one expert in MB (GPU format), instead of --model-shape")
    p.add_argument("--fit-fraction", type=float, default=0.5, metavar="F",
                   help="share of the decode tokens that tunes (warm state, static set); the rest is scored, "
                        "every policy from the same warm state")
    add_json_argument(p, "the results")
    p.add_argument("--markdown", action="store_true", help="also print hit %% (÷ Belady) as a markdown grid")
    add_plots_argument(p, "hit rate per policy, per-layer heatmap")
    add_prefetch_arguments(p)
    p.set_defaults(func=run)


def add_prefetch_arguments(p) -> None:
    g = p.add_argument_group("next-layer prefetch (a trace with predictions: trace/learned.py)")
    g.add_argument("--prefetch", action="store_true",
                   help="also replay with next-layer prefetch from the trace's stored predictions, through "
                        "the planner's request_prefetch; prints hit rates without / with it")
    g.add_argument("--prefetch-fills", type=int, default=2, metavar="N",
                   help="most prefetch loads per request (request_prefetch's max_fills)")
    g.add_argument("--prefetch-cold-steps", type=int, default=8, metavar="S",
                   help="a resident may give its slot to a prefetch when not routed for S steps")
    g.add_argument("--prefetch-lands", choices=LANDS, default="layer",
                   help="layer: fills complete before the next layer's lookup (a fast idle link); token: "
                        "they stay in flight until the end of the token (a slow link)")


def run(args: argparse.Namespace) -> int:
    """`hotexperts simulate`: --moe-cache in the simulator's budget syntax, the trace any file import_trace
    reads; every capacity compared held out (heldout.sweep)."""
    trace = import_trace(args.trace)
    prefetch = prefetch_spec(args, trace)
    shape = costmodel.shape_for_trace(trace, args.model_shape, args.expert_mb)
    hw = profiles.get_profile(args.profile) if args.profile else None
    nbytes = shape.expert_bytes_gpu if shape else 0
    slots, budgets = capacities(args.slots, budget_for_simulator(args.moe_cache), trace, nbytes)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    kw = dict(slots=slots, budgets=budgets, fit_fraction=args.fit_fraction,
              params=policy_params(args, trace, policies, hw), max_swaps_per_step=args.max_swaps,
              prompt_bypass=args.pp_bypass, expert_nbytes=nbytes, progress=print_progress)
    rows = sweep(trace, policies, **kw)
    with_prefetch = [] if prefetch is None else sweep(trace, policies, prefetch=prefetch, **kw)
    if hw is not None and shape is not None:
        for r in rows:
            r.predicted = costmodel.predict_cache(shape, hw, r).to_dict()
    print(format_table(rows, trace))
    if args.markdown:
        print("\n" + markdown_grid(rows, trace.num_experts))
    if with_prefetch:
        print("\n" + prefetch_table(rows, with_prefetch))
    write_outputs(args, rows, trace, with_prefetch)
    return 0


def prefetch_spec(args: argparse.Namespace, trace: RoutingTrace) -> Prefetch | None:
    """--prefetch: the trace file's stored predictions, or a clear error when it carries none."""
    if not args.prefetch:
        return None
    path = Path(args.trace)
    predicted = load_predicted(path, trace) if path.suffix == ".npz" and path.is_file() else None
    if predicted is None:
        raise HotExpertsError(f"--prefetch needs a trace .npz that carries next-layer predictions (the "
                              f"'predicted' array); {args.trace} has none. Record one with "
                              f"scripts/routing_traces.py (trace/learned.save_recorded)")
    return Prefetch(predicted, max_fills=args.prefetch_fills, cold_steps=args.prefetch_cold_steps,
                    lands=args.prefetch_lands)


def capacities(slots: str | None, budget: str | None, trace: RoutingTrace,
               expert_nbytes: int) -> tuple[list[int], list[int]]:
    """(per-layer slot counts, global slot budgets) to sweep: --slots, or the simulator's budget list (a
    bare number = slots, a size = bytes / expert_nbytes), else E/16, E/8, E/4, E/2 per layer."""
    if slots and budget:
        raise HotExpertsError("give --slots (per layer) or --budget (global), not both")
    if budget:
        return [], [_budget_slots(b, expert_nbytes) for b in budget.split(",")]
    if slots:
        return [int(s) for s in slots.split(",")], []
    E = trace.num_experts
    return sorted({max(1, E * f // 16) for f in (1, 2, 4, 8)}), []


def _budget_slots(item: str, expert_nbytes: int) -> int:
    if not re.search(r"[a-zA-Z]", item):
        return int(item)
    if not expert_nbytes:
        raise HotExpertsError("a byte budget needs the expert size: pass --expert-mb or --model-shape")
    return parse_bytes(item) // expert_nbytes


def policy_params(args: argparse.Namespace, trace: RoutingTrace, policies: list[str], hw) -> dict:
    """Per policy, the extra constructor kwargs: auto's pay-back costs (the h200 profile without
    --hardware), static's --static-profile."""
    static = load_profile(args.static_profile, trace.num_experts) if args.static_profile else None
    cost = auto_cost_params(costmodel.payback_shape(trace, args.model_shape, args.expert_mb),
                            hw or profiles.get_profile("h200"))
    params = {p: cost for p in policies if p in ("auto", "adaptive")}
    params.update({p: {"profile": static} for p in policies if p == "static" and static is not None})
    return params


def write_outputs(args: argparse.Namespace, rows: list[SimResult], trace: RoutingTrace,
                  with_prefetch: list[SimResult] = ()) -> None:
    """--json FILE (every result; with --prefetch also `prefetch_results`) and --plots DIR."""
    if args.json:
        out = {"trace": str(args.trace), "meta": trace.meta, "results": [r.to_dict() for r in rows]}
        if with_prefetch:
            out["prefetch_results"] = [r.to_dict() for r in with_prefetch]
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plots:
        from hotexperts.trace import plots  # matplotlib: imported only to plot
        for path in plots.write_all(rows, trace.moe_layers, args.plots):
            print(f"wrote {path}")


def print_progress(done: int, total: int, what: str) -> None:
    """sweep's progress as one stderr line per capacity."""
    print(f"simulate: {done}/{total} capacities done ({what})", file=sys.stderr, flush=True)


def markdown_grid(rows: list[SimResult], num_experts: int) -> str:
    """Capacity rows x policy columns: decode hit rate % (÷ Belady)."""
    pols = list(dict.fromkeys(r.policy for r in rows))
    caps = list(dict.fromkeys((r.slots, r.budget) for r in rows))
    lines = ["| capacity | " + " | ".join(pols) + " |", "|---" * (len(pols) + 1) + "|"]
    for s, b in caps:
        cap = f"{s}/layer ({100 * s / num_experts:.1f}%)" if s is not None else f"{b} total"
        cells = {r.policy: r for r in rows if (r.slots, r.budget) == (s, b)}
        txt = [f"{100 * c.hit_rate:.1f}" + (f" ({c.vs_belady:.3f})" if c.vs_belady else "")
               for c in (cells[p] for p in pols)]
        lines.append(f"| {cap} | " + " | ".join(txt) + " |")
    return "\n".join(lines)


def format_table(rows: list[SimResult], trace: RoutingTrace) -> str:
    head = (f"{trace.meta.get('model')}: {trace.num_tokens} tokens ({int(trace.is_prompt.sum())} prompt), "
            f"{trace.num_layers} MoE layers x {trace.num_experts} experts, top-{trace.top_k}")
    rule = ("held out: tuned on the first part of the decode tokens, scored on the rest; every policy "
            "(Belady included) starts from the tuning part's hot set")
    lines = [head, rule, f"{'policy':<11} {'capacity':>12} {'hit%':>6} {'/belady':>7} {'prompt%':>7} "
             f"{'swaps/tok':>9} {'GB moved':>9} {'pred tok/s':>10}"]
    for r in rows:
        cap = f"{r.slots}/layer" if r.slots is not None else f"{r.budget} total"
        vb = f"{r.vs_belady:.3f}" if r.vs_belady else "-"
        pred = f"{r.predicted['decode_tps']:.1f}" if r.predicted else "-"
        lines.append(f"{r.policy:<11} {cap:>12} {100 * r.hit_rate:6.1f} {vb:>7} "
                     f"{100 * r.prompt_hit_rate:7.1f} {r.swaps_per_token:9.2f} "
                     f"{r.bytes_moved / 1e9:9.2f} {pred:>10}")
    return "\n".join(lines)


def prefetch_table(rows: list[SimResult], with_prefetch: list[SimResult]) -> str:
    """Per policy and capacity: hit % without / with prefetch, prefetch fills and on-demand swaps per token,
    the planner's useful / late / wasted prefetches (shares of those issued) and the guesses' miss recall."""
    if not with_prefetch:
        return ""
    pf = with_prefetch[0].prefetch
    lines = [f"next-layer prefetch: {pf['guesses']} guesses, <= {pf['max_fills']} fills per request, cold "
             f"after {pf['cold_steps']} steps, fills land before the next {pf['lands']}",
             f"{'policy':<11} {'capacity':>12} {'hit%':>6} {'+pf%':>6} {'gain':>6} {'pf/tok':>7} "
             f"{'swaps/tok':>9} {'useful':>6} {'late':>6} {'wasted':>6} {'miss rec':>8}"]
    for base, r in zip(rows, with_prefetch, strict=True):
        p, n = r.prefetch, max(r.prefetch["issued"], 1)
        cap = f"{r.slots}/layer" if r.slots is not None else f"{r.budget} total"
        rec = f"{p['miss_recall']:.3f}" if p["miss_recall"] is not None else "-"
        lines.append(f"{r.policy:<11} {cap:>12} {100 * base.hit_rate:6.1f} {100 * r.hit_rate:6.1f} "
                     f"{100 * (r.hit_rate - base.hit_rate):+6.1f} {r.prefetch_fills_per_token:7.2f} "
                     f"{r.swaps_per_token:9.2f} {p['useful'] / n:6.2f} {p['late'] / n:6.2f} "
                     f"{p['wasted'] / n:6.2f} {rec:>8}")
    return "\n".join(lines)
