"""`hotexperts auto`: choose the cache policy and its parameters for a model from a routing trace, and write
them as a routing profile (`--moe-policy P --moe-profile FILE`). The flags only; trace/auto.py's `run` does
the work.

    hotexperts auto TRACE (--slots K | --moe-cache SIZE) [--hardware HW] [--model-shape S] [--out FILE]
"""

from __future__ import annotations

import argparse

from hotexperts.cli.flags import (
    HelpFormatter,
    add_cache_budget_arguments,
    add_hardware_argument,
    budget_for_simulator,
)
from hotexperts.cli.simulate import TRACE_HELP
from hotexperts.trace import auto

DESCRIPTION = """\
Pick the cache policy and its parameters for a model from a routing trace: every candidate is tuned on the
first half of the trace's decode tokens and scored on the second (predicted tok/s on --hardware); the winner
is written as a routing profile for generate/serve (--moe-policy P --moe-profile FILE).

example:
  hotexperts auto trace.npz --moe-cache 8GiB --model-shape qwen3-30b-a3b --hardware my-box.json
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("auto", help="choose the cache policy for a model from a routing trace",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("trace", metavar="TRACE", help=TRACE_HELP)
    p.add_argument("--slots", type=int, default=None, metavar="K", help="slots per MoE layer (hot:K)")
    add_cache_budget_arguments(p, sweep=False)
    add_hardware_argument(p, "profile", "h200")
    p.add_argument("--model-shape", default=None, metavar="PRESET",
                   help="model shape for the cost model (default: from the trace)")
    p.add_argument("--expert-mb", type=float, default=None, metavar="MB",
                   help="bytes of one expert in MB (GPU format), instead of --model-shape")
    p.add_argument("--out", default="moe-profile.json", metavar="FILE", help="routing profile to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """trace/auto.run with --moe-cache in the simulator's budget syntax."""
    args.budget = budget_for_simulator(args.moe_cache)
    return auto.run(args)
