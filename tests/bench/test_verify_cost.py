"""The verify-step cost test (bench/verify.py, `hotexperts bench --verify-t`) and the drafting flags of
`hotexperts generate` (cli/generate.py) that drive the same verify step."""

import re

import numpy as np
import pytest
import torch

from hotexperts.bench import verify as bv
from hotexperts.bench.harness import run_bench
from hotexperts.bench.workload import parse_tests
from hotexperts.cli import main
from hotexperts.engine.engine import Engine
from hotexperts.engine.presets import build_in_memory
from tests.bench.routing import random_trace_source

TINY = ["generate", "--model", "preset:tiny-qwen3-moe", "--dtype", "float32", "--device", "cpu"]


def test_trace_union_counts_distinct_experts_per_window():
    ids = np.array([[[0, 1]], [[1, 2]], [[3, -1]], [[3, 3]]])       # [N=4, Lm=1, K=2]
    assert bv.trace_union(ids, 1) == pytest.approx((2 + 2 + 1 + 1) / 4)
    assert bv.trace_union(ids, 2) == pytest.approx((3 + 1) / 2)
    assert bv.trace_union(ids, 8) == 0.0


def test_verify_cost_rows_and_speedup_function():
    eng = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu", max_context=128)
    tokens = list(range(100, 228))
    v = bv.verify_cost(eng, tokens, [1, 2, 4], steps=2, repeats=1, depth=16)
    rows = {r["T"]: r for r in v["rows"]}
    assert set(rows) == {1, 2, 4} and rows[1]["cost_vs_1"] == 1.0
    r4 = rows[4]
    assert list(r4["speedup_at"]) == ["1", "1.5", "2", "2.5", "3", "3.5", "4"]
    assert r4["speedup_at"]["2"] == pytest.approx(2 / r4["cost_vs_1"])
    assert r4["cost_vs_T_singles"] == pytest.approx(r4["cost_vs_1"] / 4)
    K = eng.config.top_k
    assert rows[1]["distinct_experts_per_layer"] == K
    assert K <= rows[4]["distinct_experts_per_layer"] <= 4 * K
    assert "experts/layer" in bv.table([{"label": "gpu", "verify": v}])


def test_bench_runs_verify_per_placement_with_replayed_routing():
    lm = build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")
    ids, source = random_trace_source(lm.cfg, 400)
    report = run_bench(lm, ["gpu", "cache:6"], [None], parse_tests("tg2"), 1, source, torch.device("cpu"),
                       verify_ts=[1, 4])
    for res in report["results"]:
        assert res["error"] is None, res["error"]
        rows = {r["T"]: r for r in res["verify"]["rows"]}
        assert rows[4]["distinct_experts_per_layer"] == pytest.approx(bv.trace_union(ids, 4))
        assert rows[4]["ms_per_step"] > 0


def test_generate_with_ngram_drafting_prints_its_stats(capsys):
    rc = main([*TINY, "--prompt", "Once upon a time", "--max-tokens", "16", "--draft", "ngram",
               "--draft-max", "4", "--draft-always"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert re.search(r"draft ngram: \d+/\d+ accepted, [\d.]+ tokens per verify step", err)


@pytest.mark.parametrize("args,message", [
    (["--draft", "4"], "is --draft-max 4 here"), (["--draft", "eagle"], "--draft must be one of"),
    (["--draft", "ngram", "--draft-max", "16"], "--draft-max must be in"),
    (["--draft", "mtp"], "not written yet"),
])
def test_bad_drafting_flags_exit_2(capsys, args, message):
    assert main([*TINY, "--prompt", "Hi", *args]) == 2
    assert message in capsys.readouterr().err
