"""Must-have 5 of issue 19: the README's two quick-start commands' CLI parts, run as a user would (the
bench one with a tiny budget of tokens and placements so it stays fast), and their output reads true."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_command(prefix: str) -> list[str]:
    """The README's `hotexperts ...` part of the quick-start line that starts with `prefix`."""
    line = next(x for x in README.splitlines() if x.startswith("python -m pip install") and prefix in x)
    return line.split("&&", 1)[1].split()


def test_readme_bench_command_tells_the_truth_on_cpu():
    argv = readme_command("hotexperts bench")
    assert argv[:2] == ["hotexperts", "bench"]
    args = argv[2:]
    args[args.index("--tests") + 1] = "pp8,tg4"                   # tiny budget of tokens
    cmd = [sys.executable, "-m", "hotexperts", "bench", *args, "--repeats", "1", "--placements",
           "cpu-moe,cache", "-t", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES="")).stdout
    if "no CUDA GPU here" not in out:
        pytest.skip("a GPU machine: the CPU wording does not apply")
    head = out[:out.index("PREDICTED")]
    assert out.startswith("note: no CUDA GPU here") and "emulated" in head and "measured" in head
    assert not re.search(r"^\s+gpu pp\d+", out, re.M)             # no 'gpu pp8: ... tok/s' as if measured
    assert all("this CPU" in x for x in out.splitlines() if re.search(r"\b(pp|tg)\d+: [\d.]+ tok/s", x))
    assert "predicted tg4 tok/s" in out and "predicted pp8 tok/s" in out     # the sizes asked for
    assert "GB " not in out.replace("GB/s", "") and "VRAM GiB" in out        # one unit
    assert "read: the ratios between rows" in out
    assert "MEASURED on this machine" in out


def test_readme_test_command_is_the_suite():
    argv = readme_command("pytest")
    assert argv[-3:] == ["-m", "pytest", "-q"]


def usage_lines() -> list[str]:
    """The `hotexperts ...` lines of the README's Usage block, comments cut."""
    block = README.split("## Usage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [x.split("  #")[0].strip() for x in block.splitlines() if x.startswith("hotexperts ")]


def test_readme_lists_every_command_and_docs_cli_describes_it():
    from hotexperts.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    listed = {x.split()[1] for x in usage_lines()}
    assert set(commands) <= listed, set(commands) - listed
    cli_doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert all(f"| `{c}` |" in cli_doc for c in commands)


def test_every_readme_usage_line_parses_as_typed(capsys):
    """Each line's flags exist and take the values shown (parsing only: nothing is loaded or run)."""
    import shlex

    from hotexperts.cli import build_parser

    for line in usage_lines():
        argv = shlex.split(line)[1:]
        if argv == ["--help"]:
            continue
        args = build_parser().parse_args(argv)
        assert callable(args._run), line
    assert "warning" not in capsys.readouterr().err              # no deprecated spelling in the README
