"""`hotexperts simulate`: replay a routing trace through the cache policies (no GPU, no model). The flags
only; the replay is trace/simulate.py's `run`. The cache's flags are generate's (--moe-cache, --moe-max-swaps,
--moe-pp-bypass) with the old spellings (--budget, --max-swaps, --pp-bypass) kept.

    hotexperts simulate TRACE [--policies lru,decay,auto] [--slots 8,16 | --moe-cache 600slots,8GiB]
                       [--hardware HW] [--json FILE] [--plots DIR]
TRACE: a .npz of `hotexperts trace`, or any raw file `bench --route-trace` reads (.route.csv,
*_routing.jsonl, a folder of them, a shared-trace name).
"""

from __future__ import annotations

import argparse

from hotexperts.cli.flags import (
    HelpFormatter,
    add_cache_budget_arguments,
    add_hardware_argument,
    add_json_argument,
    add_plots_argument,
    budget_for_simulator,
)
from hotexperts.trace import simulate

DESCRIPTION = """\
Replay a recorded routing trace through the cache policies at several cache sizes, without a GPU or a model:
a table of hit rates (and how close each policy comes to Belady's optimum), swaps and bytes moved; with
--hardware, the cost model's predicted decode tok/s.

examples:
  hotexperts simulate trace.npz --policies lru,decay,auto,belady --slots 16,32,64
  hotexperts simulate run.route.csv --moe-cache 8GiB --model-shape qwen3-30b-a3b --hardware rtx4090-7950x
"""

TRACE_HELP = ("routing trace: a .npz (hotexperts trace), or a raw one as bench --route-trace reads it "
              "(.route.csv, *_routing.jsonl, a folder of them, or a shared-trace name)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="replay a routing trace through the cache policies",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("trace", metavar="TRACE", help=TRACE_HELP)
    p.add_argument("--policies", default=",".join(simulate.ALL_POLICIES), metavar="P[,P...]",
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """trace/simulate.run with --moe-cache in the simulator's budget syntax."""
    args.budget, args.plot = budget_for_simulator(args.moe_cache), args.plots
    return simulate.run(args)
