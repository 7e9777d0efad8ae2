"""Placement flags (llama.cpp meanings), Placement.parse, contradictions, VRAM budget accounting."""

import argparse

import pytest
import torch

from hotexperts.cli.flags import add_placement_arguments, placement_from_args
from hotexperts.config import ModelConfig
from hotexperts.errors import PlacementError
from hotexperts.experts.budget import Budget, GiB, MiB, parse_bytes, parse_cache
from hotexperts.experts.build import build_executor
from hotexperts.experts.placement import Placement
from hotexperts.experts.store import ExpertStore
from hotexperts.weights import LayerExperts

E, D, I = 4, 32, 32
CFG = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=D, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, num_experts=E, top_k=2, moe_intermediate_size=I,
                  moe_layers=(0, 1, 2))
STORE = ExpertStore({l: LayerExperts(torch.randn(E, 2 * I, D), torch.randn(E, D, I)) for l in CFG.moe_layers})
SB = STORE.expert_nbytes                       # 3 * 32 * 32 * 4 bytes = 12 KiB


def flags(*argv) -> Placement:
    p = argparse.ArgumentParser()
    add_placement_arguments(p)
    return placement_from_args(p.parse_args(list(argv)))


def test_flags_map_to_placements():
    assert flags() == Placement()
    assert flags("--experts", "gpu").mode == "gpu"
    assert flags("--cpu-moe").mode == "cpu" and flags("--experts", "cpu").mode == "cpu"
    assert flags("--n-cpu-moe", "3") == Placement(mode="layers", n_cpu_layers=3)
    assert flags("--n-cpu-moe", "auto").n_cpu_layers is None
    p = flags("--moe-hot-k", "44", "--moe-window", "128", "--moe-rebalance-interval", "60",
              "--moe-pp-bypass", "64")
    assert (p.mode, p.hot_k, p.window, p.rebalance_interval, p.pp_bypass) == ("hot", 44, 128, 60, 64)
    p = flags("--moe-cache", "8GiB", "--moe-policy", "lru")
    assert (p.mode, p.cache_bytes, p.policy) == ("cache", 8 * GiB, "lru")
    assert flags("--moe-cache", "2000slots").cache_slots == 2000
    assert flags("--moe-profile", "p.json").mode == "static"
    assert flags("--moe-cache", "8", "--moe-profile", "p.json").profile == "p.json"     # warm start
    p = flags("--vram-budget", "16")
    assert p.mode == "layers" and p.n_cpu_layers is None and p.vram_budget == 16 * GiB
    auto = flags("--vram-budget", "auto", "--cpu-moe").vram_budget
    assert auto == ("auto" if torch.cuda.is_available() else None)     # on CPU: no limit, said in a warning
    assert flags("--expert-quant", "int4", "--cpu-moe").expert_quant == "int4"


@pytest.mark.parametrize("argv, msg", [
    (["--experts", "gpu", "--cpu-moe"], "contradict"),
    (["--cpu-moe", "--n-cpu-moe", "2"], "contradict"),
    (["--moe-hot-k", "4", "--moe-cache", "8GiB"], "contradict"),
    (["--n-cpu-moe", "2", "--moe-cache", "8GiB"], "contradict"),
    (["--moe-window", "64"], "needs --moe-hot-k"),
    (["--moe-policy", "lru"], "needs --moe-cache"),
    (["--moe-cache", "8", "--moe-policy", "static"], "needs --moe-profile"),
    (["--cpu-moe", "--moe-profile", "p.json"], "needs a cache"),
    (["--moe-cache", "lots"], "cannot read"),
    (["--vram-budget", "12XB"], "cannot read"),
    (["--n-cpu-moe", "x"], "integer"),
])
def test_contradictions_are_placement_errors(argv, msg):
    with pytest.raises(PlacementError, match=msg):
        flags(*argv)


def test_parse_strings():
    assert Placement.parse("gpu") == Placement()
    assert Placement.parse("layers:2") == Placement(mode="layers", n_cpu_layers=2)
    assert Placement.parse("hot:3").hot_k == 3
    p = Placement.parse("cache:1.5GiB:decay")
    assert (p.cache_bytes, p.policy) == (int(1.5 * GiB), "decay")
    assert Placement.parse("static:x.json").profile == "x.json"
    assert Placement.parse("cache:12slots").describe() == "cache:12slots"
    for bad in ("fast", "hot:x", "gpu:3", "static:"):
        with pytest.raises(PlacementError):
            Placement.parse(bad)
    with pytest.raises(PlacementError, match="ends the whole placement.*'2=slots4,3=cpu@lru'"):
        Placement.parse("2=slots4@lru,3=cpu")


def test_sizes():
    assert parse_bytes("8GiB") == parse_bytes("8") == 8 * GiB
    assert parse_bytes("512MiB") == 512 * MiB and parse_bytes("2GB") == 2 * 10 ** 9
    assert parse_cache("2000slots") == (None, 2000) and parse_cache("1") == (GiB, None)
    b = Budget(total=10 * MiB, reserved=4 * MiB, slot_bytes=MiB)
    assert b.slots_available() == 6 and b.slots_available(staging_bytes=2 * MiB) == 4
    assert Budget(None, 5, 1).slots_available() is None
    with pytest.raises(PlacementError, match="smaller than the CUDA context, dense"):
        Budget(total=GiB, reserved=2 * GiB, slot_bytes=MiB).slots_available()


def test_budget_drives_slots_and_layers():
    reserved = 1000
    total = reserved + 5 * E * SB + SB // 2         # room for 5 layers of a 3-layer model: all fit
    ex = build_executor(Placement(mode="layers", vram_budget=total), STORE, CFG, "cpu",
                        reserved_bytes=reserved)
    assert ex.slots.num_slots == 3 * E and ex.slots.hot_set() == {l: list(range(E)) for l in (0, 1, 2)}
    total = reserved + 2 * E * SB + 1                # two GPU layers fit -> n-cpu-moe auto = 1
    ex = build_executor(Placement(mode="layers", vram_budget=total), STORE, CFG, "cpu",
                        reserved_bytes=reserved)
    assert ex.slots.layers == [1, 2] and ex.slots.resident_count(1) == E
    with pytest.warns(RuntimeWarning, match="limited to 7 slots"):
        p = Placement.parse("cache:100slots", vram_budget=reserved + 7 * SB)
        ex = build_executor(p, STORE, CFG, "cpu", reserved_bytes=reserved)
    assert ex.slots.num_slots == 7 and ex.planner.capacity.budget == 7
    ex = build_executor(Placement.parse("cache:auto", vram_budget=reserved + 5 * SB), STORE, CFG, "cpu",
                        reserved_bytes=reserved)
    assert ex.slots.num_slots == 5
    ex = build_executor(Placement.parse("hot:2"), STORE, CFG, "cpu")
    assert ex.slots.num_slots == 6 and ex.planner.capacity == {0: 2, 1: 2, 2: 2}


def test_auto_cache_trades_staging_against_slots():
    """Every expert fits: no staging pools. A tight budget: staging takes at most a quarter, slots the rest
    (experts/solve.py; tests/experts/test_solve.py covers the rules)."""
    reserved = 1000
    p = Placement.parse("cache:auto", vram_budget=reserved + 13 * SB, prompt_mode="stream")
    ex = build_executor(p, STORE, CFG, "cpu", reserved_bytes=reserved)
    assert ex.slots.num_slots == 3 * E and ex.stream is None and not ex.plan.staging
    p = Placement.parse("cache:auto", vram_budget=reserved + 8 * SB, prompt_mode="stream")
    ex = build_executor(p, STORE, CFG, "cpu", reserved_bytes=reserved)
    assert ex.plan.staging.pools == 2 and ex.plan.staging.experts == 1         # 2 of 8 slots' bytes
    assert ex.slots.num_slots == 6 and ex.stream is not None and ex.stream.stage.capacity == 1


def test_budget_errors():
    with pytest.raises(PlacementError, match="smaller than the CUDA context, dense"):
        build_executor(Placement(mode="cpu", vram_budget=100), STORE, CFG, "cpu", reserved_bytes=1000)
    with pytest.raises(PlacementError, match="--moe-hot-k 3 needs 9 expert slots"):
        build_executor(Placement.parse("hot:3", vram_budget=8 * SB), STORE, CFG, "cpu")
    with pytest.raises(PlacementError, match="--n-cpu-moe 0 needs"):
        build_executor(Placement.parse("layers:0", vram_budget=8 * SB), STORE, CFG, "cpu")
    with pytest.raises(PlacementError, match="all experts on the GPU need"):
        build_executor(Placement.parse("gpu", vram_budget=8 * SB), STORE, CFG, "cpu")
    with pytest.raises(PlacementError, match="in \\[0, 3\\]"):
        build_executor(Placement.parse("layers:4"), STORE, CFG, "cpu")
    with pytest.raises(PlacementError, match="needs a CUDA device"):
        build_executor(Placement.parse("cpu", vram_budget="auto"), STORE, CFG, "cpu")


def test_static_profile_without_hot_set_needs_a_size(tmp_path):
    from hotexperts.experts.profile import Profile, save_profile

    path = save_profile(tmp_path / "p.json", Profile(E, {l: [1.0] * E for l in CFG.moe_layers}, {}))
    with pytest.raises(PlacementError, match="lists no hot experts"):
        build_executor(Placement.parse(f"static:{path}"), STORE, CFG, "cpu")
    ex = build_executor(Placement.parse(f"static:{path}", cache_slots=5), STORE, CFG, "cpu")
    assert ex.slots.num_slots == 5


# ---- the placement grammar and the solved plan -----------------------------------------------------------
def test_grammar_sugar_aliases_and_suffixes():
    assert Placement.parse("cpu-moe") == Placement.parse("cpu")
    assert Placement.parse("n-cpu-moe").n_cpu_layers is None and Placement.parse("hot").hot_k is None
    p = Placement.parse("cache+z2")
    assert (p.mode, p.cache_bytes, p.cache_slots, p.gpu_misses) == ("cache", None, None, 2)
    e = Placement.parse("all=cpu,1-2=slots3@lru+z1")
    assert e.mode == "explicit" and e.layer_map == ((None, None, "cpu"), (1, 2, "slots3"))
    assert (e.policy, e.gpu_misses) == ("lru", 1)
    assert Placement.parse(e.describe()) == e                                  # round trip
    for bad in ("0-1=tpu", "2-1=cpu", "x=cpu", "0=slotsx"):
        with pytest.raises(PlacementError):
            Placement.parse(bad)


def _plan(text, total=None, reserved=1000, staging=0):
    from hotexperts.experts.solve import ModelSizes, solve

    sizes = ModelSizes(tuple(CFG.moe_layers), E, SB, staging)
    return solve(Placement.parse(text), sizes, Budget(total, reserved, SB))


def test_flags_and_texts_solve_to_one_plan_per_layer():
    assert _plan("layers:1").where == {0: "cpu", 1: "gpu", 2: "gpu"}
    assert _plan("layers:1").text() == "0=cpu,1-2=gpu" == _plan("0=cpu,1-2=gpu").text()
    assert _plan("hot:3").text() == "all=slots3@window-lfu" and _plan("hot:3").num_slots(E) == 9
    auto = _plan("layers:auto", total=1000 + 2 * E * SB)                       # two GPU layers fit
    assert auto.where == {0: "cpu", 1: "gpu", 2: "gpu"} and auto.vram["slots"] == 2 * E * SB
    shared = _plan("0=gpu,1-2=shared", total=1000 + (E + 5) * SB)
    assert shared.shared_slots == 5 and shared.managed == [1, 2] and shared.text() == "0=gpu,1-2=shared@auto"
    assert "shared pool of 5 slots" in shared.describe()
    with pytest.raises(PlacementError, match="mixes per-layer slots and a shared pool"):
        _plan("0=slots2,1-2=shared")
    with pytest.raises(PlacementError, match="without a place"):
        _plan("0=cpu")


def test_an_explicit_mixed_plan_runs_and_matches_the_reference():
    from hotexperts.experts.reference import DenseExecutor

    torch.manual_seed(0)
    ex = build_executor(Placement.parse("0=cpu,1=gpu,2=slots2@lru"), STORE, CFG, "cpu")
    ref = DenseExecutor({l: STORE.layer(l) for l in STORE.layers}, "cpu", torch.float32)
    assert ex.plan.text() == "0=cpu,1=gpu,2=slots2@lru" and ex.planner.layers == [2]
    for _ in range(4):
        x = torch.randn(3, D)
        ids = torch.stack([torch.randperm(E)[:2] for _ in range(3)])
        w = torch.rand(3, 2)
        for l in CFG.moe_layers:
            torch.testing.assert_close(ex(l, x, ids, w), ref(l, x, ids, w), rtol=1e-4, atol=1e-4)
        ex.end_step()
    assert ex.slots.resident_count(1) == E and ex.slots.resident_count(2) <= 2
