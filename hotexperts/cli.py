"""`hotexperts` command line: dispatch only. Each subcommand lives in its own module exposing
`add_parser(subparsers) -> None` and `run(args) -> int` (docs/architecture.md, "CLI subcommand convention").

A subcommand module that does not exist (not built yet) is skipped; one that fails to import is reported
on stderr and skipped, so the other subcommands keep working (`build_parser(strict=True)` raises instead,
for tests). HotExpertsError -> "error: <message>" on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hotexperts import __version__
from hotexperts.errors import HotExpertsError

SUBCOMMAND_MODULES = (
    "hotexperts.engine.cli_generate",     # generate
    "hotexperts.engine.presets",          # make-model
    "hotexperts.trace.record",            # trace
    "hotexperts.trace.simulate",          # simulate
    "hotexperts.trace.calibrate",         # calibrate
    "hotexperts.trace.auto",              # auto
    "hotexperts.bench.harness",           # bench
    "hotexperts.server.app",              # serve
)


def _import(name: str, strict: bool):
    """The module, or None when it does not exist (or is broken and strict is False)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        if strict:
            raise
        print(f"warning: {name} unavailable: {exc}", file=sys.stderr)
    except Exception as exc:
        if strict:
            raise
        print(f"warning: {name} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    return None


def _register(subparsers, module) -> None:
    """module.add_parser(subparsers), then route every sub-parser it added to module.run."""
    before = set(subparsers.choices)
    module.add_parser(subparsers)
    for name in set(subparsers.choices) - before:
        subparsers.choices[name].set_defaults(_run=module.run)


def build_parser(strict: bool = False,
                 modules: tuple[str, ...] = SUBCOMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotexperts",
        description="Run Mixture-of-Experts LLMs larger than VRAM with a hot-expert cache.")
    parser.add_argument("--version", action="version", version=f"hotexperts {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        module = _import(name, strict)
        if module is None:
            continue
        try:
            _register(subparsers, module)
        except Exception as exc:
            if strict:
                raise
            print(f"warning: {name} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
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
