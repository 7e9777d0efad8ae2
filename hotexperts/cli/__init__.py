"""`hotexperts` command line: dispatch only. Each subcommand is a module of this package exposing
`add_parser(subparsers)` (registers its sub-parser and arguments, built from cli/flags.py's one vocabulary)
and `run(args) -> int`:

    generate  cli/generate.py         serve      cli/serve.py        bench  cli/bench.py
    trace     cli/trace.py            make-model cli/make_model.py   (run: engine/presets.py)
    simulate  cli/simulate.py (run: trace/simulate.py)    calibrate  cli/calibrate.py (trace/calibrate.py)
    auto      cli/auto.py (run: trace/auto.py)
Every sub-parser prints its help with cli/flags.HelpFormatter (defaults shown). HotExpertsError ->
"error: <message>" on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from hotexperts import __version__
from hotexperts.cli import auto, bench, calibrate, generate, make_model, serve, simulate, trace
from hotexperts.cli.flags import HelpFormatter
from hotexperts.errors import HotExpertsError

COMMANDS = (generate, make_model, trace, simulate, calibrate, auto, bench, serve)


def _register(subparsers, module) -> None:
    """module.add_parser(subparsers), then route every sub-parser it added to module.run, with help written
    for users (cli/flags.HelpFormatter: descriptions as written, defaults shown)."""
    before = set(subparsers.choices)
    module.add_parser(subparsers)
    for name in set(subparsers.choices) - before:
        subparsers.choices[name].set_defaults(_run=module.run)
        subparsers.choices[name].formatter_class = HelpFormatter


def build_parser(commands=COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotexperts",
        description="Run Mixture-of-Experts LLMs larger than VRAM with a hot-expert cache.")
    parser.add_argument("--version", action="version", version=f"hotexperts {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in commands:
        _register(subparsers, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except HotExpertsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
