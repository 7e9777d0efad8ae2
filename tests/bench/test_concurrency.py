"""The concurrency test (bench/concurrency.py, `hotexperts bench --parallel`): parsing, the rows it reports
(aggregate = N x per-request, all N rows in every step), per placement through the harness (replayed
routing, a hybrid cache), the table, and the CLI flag."""

import pytest
import torch

from hotexperts.bench import concurrency as bc
from hotexperts.bench.harness import run_bench
from hotexperts.bench.workload import parse_tests
from hotexperts.cli import main
from hotexperts.engine.engine import Engine
from hotexperts.engine.presets import build_in_memory
from hotexperts.errors import HotExpertsError
from tests.bench.routing import random_trace_source

pytestmark = pytest.mark.usefixtures("one_thread")


def test_concurrency_rows_keep_every_request_in_every_step():
    eng = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu", max_context=96, parallel=4)
    tokens = list(range(100, 196))
    c = bc.concurrency(eng, tokens, [1, 2, 4], steps=3, repeats=1, depth=16)
    rows = {r["N"]: r for r in c["rows"]}
    assert set(rows) == {1, 2, 4} and c["one_request_tok_per_s"] > 0
    for n, r in rows.items():
        assert r["aggregate_tok_per_s"] == pytest.approx(n * r["per_request_tok_per_s"])
        assert r["vs_one_request"] == pytest.approx(r["aggregate_tok_per_s"] / c["one_request_tok_per_s"])
    t = eng.batch.timings
    assert t.rows == (1 + 2 + 4) * (2 + 3)                      # warm-up + timed steps, N rows each
    assert sorted(eng.batch.free_slots) == [0, 1, 2, 3]         # every request released
    assert "aggregate tok/s" in bc.table([{"label": "gpu", "concurrency": c}])
    with pytest.raises(HotExpertsError, match="8 slots"):
        bc.concurrency(eng, tokens, [1, 8])
    eng.close()


def test_bench_runs_the_concurrency_test_per_placement():
    lm = build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")
    _, source = random_trace_source(lm.cfg, 600)
    report = run_bench(lm, ["gpu", "cache:6"], [None], parse_tests("tg2"), 1, source, torch.device("cpu"),
                       parallel_ns=[1, 2])
    assert report["parallel_slots"] == 2
    for res in report["results"]:
        assert res["error"] is None, res["error"]
        assert [r["N"] for r in res["concurrency"]["rows"]] == [1, 2]
        assert "tg2" in res["tests"]


def test_cli_bench_parallel_prints_the_table(capsys):
    rc = main(["bench", "--model", "preset:tiny-qwen3-moe", "--device", "cpu", "--placements", "gpu",
               "--tests", "tg2", "--repeats", "1", "--hardware", "none", "--parallel", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "concurrency (N requests batched" in out and "x one-request" in out
    assert main(["bench", "--model", "preset:tiny-qwen3-moe", "--device", "cpu", "--parallel", "99"]) == 2
