"""Bench harness: workloads, routing replay, side-by-side runs, report outputs, predicted mode."""

import json

import numpy as np
import pytest
import torch

from hotexperts.bench import predict as pr
from hotexperts.bench import report as rep
from hotexperts.bench.harness import run_bench
from hotexperts.bench.replay import RoutingReplay
from hotexperts.bench.workload import parse_tests, routing_source
from hotexperts.engine.presets import build_in_memory
from hotexperts.errors import HotExpertsError
from hotexperts.executor import ExpertExecutor
from hotexperts.trace.format import RoutingTrace


def test_parse_tests():
    t = parse_tests("pp512, tg128,tg64@d4096")
    assert [(x.kind, x.n, x.depth) for x in t] == [("pp", 512, 0), ("tg", 128, 0), ("tg", 64, 4096)]
    for bad in ("pp", "tg0", "xx12", "tg12@4096", ""):
        with pytest.raises(HotExpertsError):
            parse_tests(bad)


class Recorder(ExpertExecutor):
    def __init__(self):
        self.calls, self.steps = [], 0

    def __call__(self, layer, x, ids, weights):
        self.calls.append((layer, ids.clone(), weights.clone()))
        return torch.zeros_like(x)

    def end_step(self):
        self.steps += 1


def _trace(n=5, layers=2, k=2, e=8):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, e, (n, layers, k)).astype(np.int16)
    ids[1, 0, 1] = -1                                               # a missing cell
    w = rng.random((n, layers, k)).astype(np.float16)
    meta = {"model": "t", "num_experts": e, "top_k": k, "moe_layers": list(range(layers)), "source": "test"}
    return RoutingTrace(ids, w, np.zeros(n, bool), np.zeros(n, np.int32), meta)


def test_replay_substitutes_routing_advances_and_wraps():
    tr, inner = _trace(), Recorder()
    rp = RoutingReplay(inner, tr, [3, 7], "cpu")
    x = torch.zeros(2, 4)
    fake = torch.zeros(2, 6, dtype=torch.long)
    rp(7, x, fake, torch.ones(2, 6))
    _, ids, w = inner.calls[-1]
    assert ids.tolist() == tr.ids[0:2, 1].astype(int).tolist()       # layer 7 = trace layer 1
    assert torch.allclose(w.sum(-1), torch.ones(2), atol=1e-3)        # renormalised over the known cells
    rp(3, x, fake, torch.ones(2, 6))
    assert inner.calls[-1][1][1, 1] == -1 and inner.calls[-1][2][1, 1] == 0
    rp.end_step()
    assert rp.cursor == 2 and inner.steps == 1
    rp.seek(4)
    rp(3, x, fake, torch.ones(2, 6))                                  # rows 4 and 0: wraps
    assert inner.calls[-1][1].tolist() == tr.ids[[4, 0], 0].astype(int).tolist()
    rp.end_step()
    assert rp.wraps == 1 and rp.cursor == 1
    rp.end_step()                                       # a graph replay calls no layer: one decode token
    assert rp.cursor == 2 and int(rp.pos) == 2 and rp.graph_safe is False


def test_replay_rejects_a_trace_of_another_shape():
    with pytest.raises(ValueError, match="MoE layers"):
        RoutingReplay(Recorder(), _trace(layers=3), [0, 1], "cpu")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_in_memory("tiny-qwen3-moe", dtype="float32", device="cpu")


def test_side_by_side_run_reports_every_placement(tiny, tmp_path):
    src = routing_source("synthetic", "qwen3-30b-a3b", tiny.cfg, num_tokens=256)
    report = run_bench(tiny, ["gpu", "cpu-moe", "layers:2", "hot:4", "cache:20slots:lru"], [None],
                       parse_tests("pp8,tg4"), 2, src, torch.device("cpu"))
    res = {r["label"]: r for r in report["results"]}
    assert all(r["error"] is None for r in res.values()), [r["error"] for r in res.values()]
    assert all(set(r["tests"]) == {"pp8", "tg4"} for r in res.values())
    assert all(len(r["tests"]["tg4"]["runs"]) == 2 for r in res.values())
    assert res["cpu-moe"]["hit_rate"] == 0.0 and res["cpu-moe"]["n_cpu_layers"] == len(tiny.cfg.moe_layers)
    assert res["layers:2"]["n_cpu_layers"] == 2
    assert 0.0 <= res["hot:4"]["hit_rate"] <= 1.0 and res["hot:4"]["decode_tokens"] == 8
    assert res["gpu"]["hit_rate"] is None
    assert report["distinct_experts"]["of"] == tiny.cfg.num_experts
    text = rep.table(report)
    assert "synthetic routing" in text and "| cpu-moe |" in text.replace("cpu-moe (cpu)", "cpu-moe")
    path = rep.save_json(report, tmp_path / "r.json")
    assert json.loads(path.read_text())["results"][0]["label"] == "gpu"
    pngs = rep.plots(report, tmp_path)
    assert any(p.name == "bench_layer_hits.png" for p in pngs) and all(p.stat().st_size > 0 for p in pngs)


def test_the_plans_say_why_a_smaller_prompt_chunk_was_chosen(tiny):
    """A budget that holds every expert at a 128-token prompt chunk but not at 512 (the bench's context for
    pp512 is 520): the plan runs 128 and its line under the table says why."""
    from hotexperts.engine.engine import reserved_parts
    from hotexperts.experts.budget import GiB, MiB

    cpu = torch.device("cpu")
    at = {c: sum(reserved_parts(tiny, 520, torch.float32, cpu, c).values()) for c in (128, 256)}
    assert at[256] - at[128] > 2 * MiB
    budget = (at[128] + tiny.store.nbytes + MiB) / GiB
    src = routing_source("router", None, tiny.cfg)
    report = run_bench(tiny, ["n-cpu-moe"], [budget], parse_tests("pp512"), 1, src, torch.device("cpu"))
    (r,) = report["results"]
    assert r["error"] is None and r["prefill_chunk"] == 128 and r["n_cpu_layers"] == 0
    assert r["plan_notes"] == ["prompt chunk 128, not 512: its smaller workspace makes every expert "
                               "resident, 512 does not plan at all"]      # tiny: its workspace > experts
    assert "; prompt chunk 128; prompt chunk 128, not 512: its smaller workspace" in rep.table(report)


def test_budget_too_small_is_reported_not_raised(tiny):
    src = routing_source("router", None, tiny.cfg)
    report = run_bench(tiny, ["hot"], [1e-6], parse_tests("tg2"), 1, src, torch.device("cpu"))
    assert "VRAM budget" in report["results"][0]["error"]


def test_predicted_mode_plans_real_slot_counts():
    shape = pr.shape_for("preset:qwen3-30b-a3b-mini", "int4")
    plan = pr.real_plan(shape, 16)
    assert plan["slots"] > 0 and 0 < plan["n_cpu_moe"] < 48 and plan["hot_k"] == plan["slots"] // 48
    assert pr.placements_for(plan, ["cpu-moe", "n-cpu-moe", "hot", "cache"]) == [
        "cpu", f"layers:{plan['n_cpu_moe']}", f"hot:{plan['hot_k']}", f"cache:{plan['cache_slots']}slots"]
    assert pr.shape_for("preset:tiny-qwen3-moe", "int4") is None
    results = [{"label": "cpu-moe", "placement": "cpu", "error": None, "hit_rate": 0.0},
               {"label": "n-cpu-moe", "placement": f"layers:{plan['n_cpu_moe']}", "error": None,
                "hit_rate": None},
               {"label": "cache", "placement": f"cache:{plan['cache_slots']}slots", "error": None,
                "hit_rate": 0.9, "layer_hit": [0.9] * 48, "swaps": 10, "decode_tokens": 100}]
    from hotexperts.trace.profiles import get_profile

    rows = pr.predictions({"results": results}, shape, get_profile("rtx4090-7950x"), plan)
    by = {r["label"]: r["decode_tps"] for r in rows}
    assert by["cpu-moe"] < by["n-cpu-moe"] < by["cache"]
    hw = get_profile("rtx4090-7950x")
    shown, notes = pr.checked(rows, hw)
    assert [r["label"] for r in shown] == ["cpu-moe", "cache"]        # no stock figure for layer offload
    assert any("layer offload row not printed" in n for n in notes)
    text = pr.table(shown, shape, hw, plan, parse_tests("pp128,tg64"), notes)
    assert "PREDICTED" in text and "predicted tg64 tok/s" in text and "predicted pp128 tok/s" in text
    assert "VRAM GB" not in text
    gpu = pr.predictions({"results": [{"label": "gpu", "placement": "gpu", "error": None, "hit_rate": None}]},
                         shape, hw, plan)
    kept, notes = pr.checked(gpu, hw)
    assert not kept and "llama.cpp/pull/15631" in notes[0]          # 56 tok/s vs published ~200: hidden


def test_placement_names_take_a_gpu_misses_suffix():
    from hotexperts.bench.harness import resolve

    assert resolve("cache+z0", None, "none", None).gpu_misses == 0
    assert resolve("n-cpu-moe+z2", None, "none", None).gpu_misses == 2
    assert resolve("cpu-moe", None, "none", None).gpu_misses is None
