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
