"""The simulator on small hand-made traces: known hit counts, prompt accounting, sweeps, no torch, next-layer
prefetch through the planner (oracle guesses help, empty guesses change nothing, the caps hold; its CLI:
tests/cli/test_simulate_cli.py)."""

import subprocess
import sys

import numpy as np
import pytest

from hotexperts.errors import HotExpertsError
from hotexperts.experts.residency import Residency
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.heldout import compare, sweep
from hotexperts.trace.simulate import Prefetch, load_predicted, passes, simulate

CLASSIC = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]


def make_trace(ids, is_prompt=None, request=None, num_experts=8):
    """ids [N, Lm, K] (or [N] for one layer, top-1)."""
    ids = np.asarray(ids, np.int16)
    if ids.ndim == 1:
        ids = ids[:, None, None]
    n, lm, k = ids.shape
    is_prompt = np.zeros(n, bool) if is_prompt is None else np.asarray(is_prompt, bool)
    request = np.zeros(n, np.int32) if request is None else np.asarray(request, np.int32)
    meta = dict(model="toy", num_experts=num_experts, top_k=k, moe_layers=list(range(lm)), source="test")
    return RoutingTrace(ids, np.ones(ids.shape, np.float16), is_prompt, request, meta)


def random_trace(n=300, lm=3, k=2, e=16, seed=0):
    rng = np.random.default_rng(seed)
    hot = rng.zipf(1.5, size=(n, lm, k)) % e
    ids = np.stack([np.stack([rng.permutation(e)[:k] if t % 5 == 0 else np.unique(hot[t, l])[:1].repeat(k)
                              for l in range(lm)]) for t in range(n)])
    for t in range(n):                                   # keep K ids of a token distinct
        for l in range(lm):
            if ids[t, l, 0] == ids[t, l, 1]:
                ids[t, l, 1] = (ids[t, l, 0] + 1) % e
    return make_trace(ids, num_experts=e)


def test_lru_known_hit_count():
    r = simulate(make_trace(CLASSIC), "lru", slots=3, expert_nbytes=100, cold_start=False)   # textbook: empty
    assert r.decode_selections == 12 and round(r.hit_rate * 12) == 2
    assert r.swaps == 10 and r.bytes_moved == 1000 and r.layer_hit_rate == [pytest.approx(2 / 12)]


def test_belady_bounds_demand_policies():
    t = random_trace()
    rows = sweep(t, ("lru", "window-lfu", "decay", "auto", "belady"), slots=[2, 4])
    for cap in (2, 4):
        best = next(r for r in rows if r.policy == "belady" and r.slots == cap)
        assert best.vs_belady == 1.0
        for r in rows:
            if r.slots == cap:
                assert r.hit_rate <= best.hit_rate + 1e-12, r.policy
                assert r.vs_belady == pytest.approx(r.hit_rate / best.hit_rate)


def test_prompt_counted_apart_and_bypassed():
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    prompt = [False] * 2 + [True] * 6 + [False] * 2
    t = make_trace(ids, prompt, [0, 0] + [1] * 8)
    sizes = [(p, r.size) for _, p, r in passes(t)]
    assert sizes == [(False, 1), (False, 1), (True, 6), (False, 1), (False, 1)]
    seen = simulate(t, "lru", slots=2, prompt_bypass=64, cold_start=False)   # the prompt flushes expert 1
    assert seen.prompt_selections == 6 and seen.decode_selections == 4 and seen.decode_tokens == 4
    assert seen.prompt_hit_rate == 0.0 and seen.hit_rate == pytest.approx(1 / 4)
    hidden = simulate(t, "lru", slots=2, prompt_bypass=4, cold_start=False)  # the prompt bypasses the policy
    assert hidden.hit_rate == pytest.approx(2 / 4)


def test_cold_start_fills_every_slot_before_routing_is_known():
    t = make_trace([0, 0, 0, 0], num_experts=8)               # expert 0 only, decode: slot 0 holds it at once
    warm = simulate(t, "lru", slots=2)
    empty = simulate(t, "lru", slots=2, cold_start=False)
    assert warm.hit_rate == 1.0 and empty.hit_rate == pytest.approx(3 / 4)
    assert warm.swaps == 0 and empty.swaps == 1                # placeholder loads are load time, not swaps


def test_global_budget_beats_even_split_on_skewed_layers():
    ids = np.stack([np.array([[t % 4], [7]]) for t in range(200)])    # layer 0: 4 experts cycle; layer 1: one
    t = make_trace(ids)
    per = simulate(t, "lru", slots=2)
    glob = simulate(t, "lru", budget=4 + 1)
    assert glob.hit_rate > per.hit_rate and glob.budget == 5 and glob.slots is None
    with pytest.raises(HotExpertsError, match="exactly one"):
        simulate(t, "lru", slots=2, budget=4)


def test_deterministic():
    t = random_trace(seed=3)
    a = [r.to_dict() for r in sweep(t, ("lru", "auto", "window-lfu"), budgets=[6])]
    b = [r.to_dict() for r in sweep(t, ("lru", "auto", "window-lfu"), budgets=[6])]
    assert a == b


def test_the_replay_never_imports_the_held_out_comparison():
    """One-way flow (import-linter's trace contract checks it statically too): heldout builds on simulate."""
    code = ("import sys, hotexperts.trace.simulate; "
            "assert 'hotexperts.trace.heldout' not in sys.modules; "
            "assert not hasattr(hotexperts.trace.simulate, 'sweep')")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_simulator_imports_no_torch():
    code = ("import sys, hotexperts.trace.simulate, hotexperts.trace.auto, hotexperts.trace.costmodel, "
            "hotexperts.experts.planner, hotexperts.experts.solve, hotexperts.trace.real_shape; "
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("spec,policy", [("hot:4", "lru"), ("hot:3", "window-lfu"), ("cache:10", "auto")])
def test_replay_reproduces_live_cpu_cache(spec, policy):
    """Record a live CPU run with a hot cache; the simulator gives the same per-layer hits and misses."""
    pytest.importorskip("torch")
    try:
        from hotexperts.engine.engine import Engine
        from hotexperts.engine.sampling import SamplingParams
        from hotexperts.experts.placement import Placement
        from hotexperts.trace.record import record
    except ImportError as e:
        pytest.skip(f"live engine not available: {e}")
    extra = {"window": 16, "rebalance_interval": 3} if policy == "window-lfu" else {}
    p = Placement.parse(spec, policy=policy, **extra)
    eng = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu", placement=p,
                      use_cuda_graph=False)
    trace = record(eng, [[1, 2, 3, 4, 5, 6], [7, 8, 9]], SamplingParams(max_tokens=10))
    ctl = eng.executor.planner
    live = eng.stats()["cache"]["layers"]
    budget = ctl.capacity.budget
    cap = {"slots": ctl.capacity[ctl.layers[0]]} if budget is None else {"budget": budget}
    r = simulate(trace, policy, max_swaps_per_step=ctl.max_swaps, prompt_bypass=ctl.prompt_bypass,
                 **cap, **ctl.policy.params())
    sim = [(h + ph, m + pm) for h, m, ph, pm in r.layer_counts]
    assert sim == [(live[k]["hits"], live[k]["misses"]) for k in sorted(live, key=int)]
    assert sum(h for h, _ in sim) > 0 and r.swaps == sum(s.loads for s in ctl.stats.values())


def oracle_guesses(trace: RoutingTrace) -> np.ndarray:
    """The real next-layer ids as predictions (column 0: no previous layer)."""
    guesses = trace.ids.copy()
    guesses[:, 0] = -1
    return guesses


SAME = ("hit_rate", "layer_counts", "swaps", "bytes_moved", "prompt_hit_rate")


@pytest.mark.parametrize("policy", ["lru", "decay", "window-lfu"])
def test_oracle_prefetch_raises_the_hit_rate(policy):
    t = random_trace(n=300)
    base = simulate(t, policy, slots=4)
    pf = simulate(t, policy, slots=4, prefetch=Prefetch(oracle_guesses(t), cold_steps=1))
    assert pf.hit_rate > base.hit_rate + 0.01, (base.hit_rate, pf.hit_rate)
    p = pf.prefetch
    assert pf.prefetch_fills == p["issued"] > 0 and p["useful"] > 0 and p["recall"] == 1.0
    assert p["useful"] + p["late"] + p["wasted"] <= p["issued"]
    assert pf.prefetch_fills_per_token == pytest.approx(pf.prefetch_fills / pf.decode_tokens)


def test_prefetch_landing_after_the_token_serves_no_same_token_lookup():
    t = random_trace(n=300)
    pf = simulate(t, "decay", slots=4, prefetch=Prefetch(oracle_guesses(t), cold_steps=1, lands="token"))
    p = pf.prefetch
    assert p["issued"] > 0 and p["useful"] == 0 and p["late"] == p["issued"] and p["busy"] > 0


@pytest.mark.parametrize("lands", ["layer", "token"])
def test_empty_guesses_change_nothing(lands):
    t = random_trace(n=200, seed=2)
    base = simulate(t, "decay", slots=4, expert_nbytes=10)
    none = simulate(t, "decay", slots=4, expert_nbytes=10,
                    prefetch=Prefetch(np.full((t.num_tokens, t.num_layers, 3), -1, np.int16), lands=lands))
    assert all(getattr(none, k) == getattr(base, k) for k in SAME)
    assert none.prefetch_fills == 0 and none.prefetch["issued"] == 0 and base.prefetch is None


@pytest.mark.parametrize("cap", [{"slots": 3}, {"budget": 7}])
def test_prefetch_keeps_the_planner_caps(monkeypatch, cap):
    """Every issue (on-demand or prefetch) leaves each layer within hot:K and all within the budget; no
    request fills more than max_fills."""
    t = random_trace(n=200, seed=4)
    start = Residency.start

    def checked(self, swaps):
        start(self, swaps)
        occ = self.occupied()
        assert all(len(s) <= cap.get("slots", t.num_experts) for s in occ.values()), occ
        assert sum(len(s) for s in occ.values()) <= cap.get("budget", 10**9), occ

    monkeypatch.setattr(Residency, "start", checked)
    wide = oracle_guesses(t)[..., [0, 1, 0, 1]]                           # 4 guesses per layer, 2 distinct
    r = simulate(t, "lru", **cap, prefetch=Prefetch(wide, max_fills=1, cold_steps=0))
    assert 0 < r.prefetch_fills <= r.prefetch["requests"] - r.prefetch["busy"]


def test_prefetch_bytes_count_apart_from_swaps():
    t = random_trace(n=200)
    r = simulate(t, "decay", slots=4, expert_nbytes=100, prefetch=Prefetch(oracle_guesses(t), cold_steps=1))
    assert r.bytes_moved == 100 * (r.swaps + r.prefetch_fills) and r.prefetch_fills > 0


def test_held_out_prefetch_replays_the_test_rows_and_bad_predictions_are_refused(tmp_path):
    t = random_trace(n=200)
    rows = compare(t, ("lru", "decay"), slots=4, prefetch=Prefetch(oracle_guesses(t), cold_steps=1))
    plain = compare(t, ("lru", "decay"), slots=4)
    assert [r.decode_tokens for r in rows] == [r.decode_tokens for r in plain]
    assert all(r.prefetch["recall"] == 1.0 for r in rows)                # the test rows' own guesses
    with pytest.raises(HotExpertsError, match="does not match"):
        simulate(t, "lru", slots=4, prefetch=Prefetch(oracle_guesses(t)[:-1]))
    with pytest.raises(HotExpertsError, match="lands"):
        Prefetch(oracle_guesses(t), lands="never")
    assert load_predicted(t.save(tmp_path / "plain.npz"), t) is None
