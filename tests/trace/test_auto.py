"""`auto` picks a policy by simulation and writes a profile the live cache loads."""

import argparse

import numpy as np
import pytest

from hotexperts.cli.auto import add_parser, run
from hotexperts.errors import HotExpertsError
from hotexperts.experts.policies import policy_from_profile
from hotexperts.experts.profile import load_profile
from hotexperts.trace.auto import choose, split, write
from hotexperts.trace.costmodel import SHAPES
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.profiles import BUILTIN
from hotexperts.trace.simulate import SimulatedCache

SMALL_GRID = {"lru": [{}], "static": [{}], "decay": [{"half_life": 8}],
              "auto": [{"interval": 1, "recency_weight": 4.0, "recency_half_life": 2}]}


def trace(n=200, lm=2, e=16, k=2, stationary=True, seed=0):
    """stationary: a fixed skewed popularity (static wins); else the hot pair changes every 10 tokens."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, e + 1) ** 2
    rows = []
    for t in range(n):
        if stationary:
            rows.append([rng.choice(e, k, replace=False, p=p / p.sum()) for _ in range(lm)])
        else:
            base = (t // 10) * 3 % e
            rows.append([[base, (base + 1) % e] for _ in range(lm)])
    ids = np.array(rows, np.int16)
    meta = dict(model="toy", num_experts=e, top_k=k, moe_layers=list(range(lm)), source="test")
    return RoutingTrace(ids, np.ones(ids.shape, np.float16), np.zeros(n, bool), np.zeros(n, np.int32), meta)


def test_split_in_time():
    fit, test = split(trace(100), 0.5)
    assert fit.num_tokens == 50 and test.num_tokens == 50


def test_static_wins_on_stationary_routing():
    choice = choose(trace(stationary=True), slots=2, grid=SMALL_GRID)
    assert choice.policy == "static"
    assert choice.table[0]["policy"] == "static" and len(choice.table) == 4


def test_recency_wins_on_drifting_routing():
    choice = choose(trace(stationary=False), slots=2, grid=SMALL_GRID)
    assert choice.policy in ("lru", "auto") and choice.result.hit_rate > 0.8


def test_writes_a_profile_the_live_cache_loads(tmp_path):
    t = trace(stationary=False)
    shape = SHAPES["qwen3-30b-a3b"]
    choice = choose(t, budget=4, shape=shape, hw=BUILTIN["h200"], grid=SMALL_GRID)
    prof = load_profile(write(choice, tmp_path / "p.json"), num_experts=16)
    assert prof.policy == choice.policy and prof.meta["score_unit"].startswith("decode tok/s")
    assert sum(len(h) for h in prof.hot.values()) == 4
    pol = policy_from_profile(prof)
    assert pol.name == choice.policy
    ctl = SimulatedCache(pol, [0, 1], 16, None, 4, budget=4)
    ctl.commit(ctl.warm_start(prof))
    assert sum(len(r) for r in ctl.resident.values()) == 4
    ctl.observe(0, 0, [0, 1], hits=ctl.lookup(0, [0, 1]))
    ctl.commit(ctl.end_step(0))


def test_cli(tmp_path, capsys, monkeypatch):
    import hotexperts.trace.auto as auto

    monkeypatch.setattr(auto, "GRID", SMALL_GRID)
    path = trace(n=80).save(tmp_path / "t.npz")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "moe.json"
    assert run(parser.parse_args(["auto", str(path), "--slots", "2", "--out", str(out),
                                  "--model-shape", "qwen3-30b-a3b"])) == 0
    assert load_profile(out).policy in SMALL_GRID and "--moe-profile" in capsys.readouterr().out
    with pytest.raises(HotExpertsError, match="--slots"):
        run(parser.parse_args(["auto", str(path)]))
