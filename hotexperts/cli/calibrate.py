"""`hotexperts calibrate`: measure this machine into a hardware profile JSON (for `--hardware FILE` in bench,
simulate and auto). The flags only; trace/calibrate.py's `run` measures.

    hotexperts calibrate [--out hardware-profile.json] [--bench BENCH.json ...]
"""

from __future__ import annotations

from hotexperts.cli.flags import HelpFormatter
from hotexperts.trace.calibrate import run
from hotexperts.trace.profiles import BUILTIN

DESCRIPTION = """\
Measure this machine (CPU memory bandwidth, the CPU expert kernel per format, and with a GPU: host-to-device
copies, GPU bandwidth, launches, the decode hand-off) into a hardware profile JSON, which bench, simulate and
auto read with --hardware FILE. Figures it cannot measure here come from --base. With --bench, the decode
terms are fitted to `hotexperts bench --json` reports of this machine.

example:
  hotexperts calibrate --out my-box.json && hotexperts bench --hardware my-box.json
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="measure this machine into a hardware profile JSON",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--out", default="hardware-profile.json", metavar="FILE", help="profile JSON to write")
    p.add_argument("--base", default="h200", choices=sorted(BUILTIN),
                   help="built-in profile for the figures not measured here")
    p.add_argument("--size-mib", type=int, default=1024, metavar="MiB",
                   help="host memory per CPU measurement")
    p.add_argument("--h2d-mib", type=int, default=256, metavar="MiB", help="bytes per H2D measurement (CUDA)")
    p.add_argument("--gap-us", type=float, default=300.0, metavar="US",
                   help="pause before each timed CPU call, in microseconds")
    p.add_argument("--bench", action="append", default=[], metavar="BENCH.json",
                   help="a `hotexperts bench --json` report of this machine: fit the decode terms on it "
                        "(repeatable)")
    p.add_argument("--engine", default=None, metavar="current|ENGINE.json",
                   help="the engine that measured --bench (default: the engine.json beside each report, else "
                        "current; see hotexperts/trace/fit.py)")
    p.set_defaults(func=run)
