"""`hotexperts` command line: dispatch only. Each subcommand is a module exposing `add_parser(subparsers)`
(registers its sub-parser and arguments) and `run(args) -> int`:

    generate  cli/generate.py         serve   cli/serve.py        bench   cli/bench.py
    trace     cli/trace.py            make-model  engine/presets.py
    simulate  trace/simulate.py       calibrate   trace/calibrate.py      auto  trace/auto.py
The commands that load a model live in this package and share cli/flags.py; the ones over files (traces,
profiles, presets) keep their add_parser/run beside their code. HotExpertsError -> "error: <message>" on
stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from hotexperts import __version__
from hotexperts.cli import bench, generate, serve, trace
from hotexperts.engine import presets
from hotexperts.errors import HotExpertsError
from hotexperts.trace import auto, calibrate, simulate

COMMANDS = (generate, presets, trace, simulate, calibrate, auto, bench, serve)


def _register(subparsers, module) -> None:
    """module.add_parser(subparsers), then route every sub-parser it added to module.run."""
    before = set(subparsers.choices)
    module.add_parser(subparsers)
    for name in set(subparsers.choices) - before:
        subparsers.choices[name].set_defaults(_run=module.run)


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
