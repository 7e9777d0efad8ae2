"""scripts/profile_decode.py end to end on the CPU (its GPU run reads CUDA kernels; here operators stand in):
it prints the step times and a per-token table and writes $OUT/profile_decode.txt."""

import sys

from scripts import profile_decode


def test_the_decode_profile_runs_and_writes_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = "--model preset:tiny-qwen3-moe --device cpu --prompt 4 --tokens 2 --profiled 1".split()
    monkeypatch.setattr(sys, "argv", ["profile_decode.py", *argv])
    profile_decode.main()
    text = (tmp_path / "profile_decode.txt").read_text()
    assert "tok/s" in text and "per token" in text
    rows = [line for line in text.splitlines() if line.strip().endswith(("aten::mm", "aten::addmm"))]
    assert rows, text                                        # the matmuls show up in the per-token table
    assert "tok/s" in capsys.readouterr().out
