"""The batched paths give the per-layer results bit for bit: observe_step == observe per layer (stats,
policy state, every later plan and swap), lookup_step == lookup, and the vectorized plan ranking ==
the tuple-sorting reference it replaced. Random traces (with -1 cells, prompt steps, layer subsets)
and a synthetic Qwen3-shaped trace, every policy, per-layer capacity and a global budget."""

from dataclasses import replace

import numpy as np
import pytest

from hotexperts.experts.policies import NEG, Belady, CachePolicy, Capacity, make_policy, plan_by_scores
from hotexperts.experts.profile import Profile
from hotexperts.trace import synthetic as syn
from hotexperts.trace.simulate import SimulatedCache, passes

POLICIES = ("lru", "window-lfu", "decay", "static", "belady", "auto")


def random_steps(seed, E, layers, K, n=60):
    """(step, prompt, tokens, layers, experts [n, M]) per forward pass: skewed ids (ties, repeats), -1
    cells, prompt passes over and under the bypass, some passes on a subset of the layers."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        prompt = rng.random() < 0.1
        T = int(rng.integers(2, 10)) if prompt else 1
        M = T * K + int(rng.integers(0, 3))                    # M >= top-k: padding cells
        x = (rng.zipf(1.4, size=(len(layers), M)) - 1) % E if rng.random() < 0.6 else \
            rng.integers(0, E, size=(len(layers), M))
        x[rng.random(x.shape) < 0.15] = -1
        keep = np.ones(len(layers), bool) if rng.random() < 0.7 else rng.random(len(layers)) < 0.6
        out.append((t, prompt, T, [l for l, k in zip(layers, keep, strict=True) if k], x[keep]))
    return out


def synthetic_steps(num_layers=6, num_experts=32, top_k=4, seed=0):
    p = replace(syn.preset("qwen3-30b-a3b"), num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                num_requests=2, prompt_tokens=12, gen_tokens=50)
    tr = syn.generate(p, seed=seed)
    ids, layers = tr.ids.astype(np.int64), list(tr.moe_layers)
    steps = [(s, pr, r.size, layers, ids[r].transpose(1, 0, 2).reshape(len(layers), -1))
             for s, pr, r in passes(tr)]
    return steps, layers, num_experts


def build(name, steps, layers, E, bypass, seed):
    rng = np.random.default_rng(seed)
    if name == "belady":
        return Belady([(t, l, x[i]) for t, p, T, ls, x in steps if not (p and T > bypass)
                       for i, l in enumerate(ls)])
    if name == "static":
        counts = {l: rng.integers(0, 4, E).astype(float).tolist() for l in layers}
        return make_policy("static", profile=Profile(E, counts, {}))
    params = {"window-lfu": dict(window=int(rng.choice([1, 3, 16])), interval=int(rng.choice([1, 3])),
                                 margin=float(rng.choice([0, 1]))),
              "decay": dict(half_life=float(rng.choice([2, 64])), interval=int(rng.choice([1, 2]))),
              "auto": dict(interval=int(rng.choice([1, 4])), cpu_seconds_per_expert=7e-5,
                           copy_seconds_per_expert=float(rng.choice([1e-9, 7e-5])))}.get(name, {})
    return make_policy(name, **params)


def replay(name, steps, layers, E, cap, batched, seed, bypass=6, max_swaps=2):
    ctl = SimulatedCache(build(name, steps, layers, E, bypass, seed), layers, E, cap.get("slots"),
                          max_swaps, budget=cap.get("budget"), prompt_bypass=bypass, max_fills_per_step=3)
    log = []
    for t, prompt, T, ls, x in steps:
        if batched:
            ctl.observe_step(t, ls, x, ctl.lookup_step(ls, x), prompt=prompt, tokens=T)
        else:
            for i, l in enumerate(ls):
                ctl.observe(t, l, x[i], prompt, tokens=T, hits=ctl.lookup(l, x[i]))
        swaps = ctl.end_step(t, prompt)
        log.append(swaps)
        ctl.commit(swaps if t % 5 else swaps[: len(swaps) // 2])       # some fills stay pending
    return ctl, log


def policy_state(pol):
    """The policy's arrays (the Adaptive's two Decays), for a bit-for-bit comparison."""
    out = {}
    for owner, pre in ((pol, ""), (getattr(pol, "slow", None), "slow."),
                       (getattr(pol, "fast", None), "fast.")):
        for k in ("last", "counts", "f", "t", "s", "seen"):
            if owner is not None and isinstance(getattr(owner, k, None), np.ndarray):
                out[pre + k] = getattr(owner, k).copy()
    return out


def assert_same(a, b):
    (ca, la), (cb, lb) = a, b
    assert la == lb
    assert ca.stats == cb.stats and ca.resident == cb.resident and ca.pending == cb.pending
    assert ca.backlog == cb.backlog and ca.decode_steps == cb.decode_steps
    sa, sb = policy_state(ca.policy), policy_state(cb.policy)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k
    np.testing.assert_array_equal(ca._prompt, cb._prompt)


def capacities(E, L, seed):
    rng = np.random.default_rng(seed)
    return [dict(slots=int(rng.integers(1, E))), dict(budget=int(rng.integers(1, L * E)))]


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("seed", range(6))
def test_observe_step_equals_per_layer_loop_random(name, seed):
    rng = np.random.default_rng(seed)
    E, K = int(rng.choice([8, 16, 32])), int(rng.integers(1, 4))
    layers = sorted(rng.choice(50, int(rng.integers(1, 5)), replace=False).tolist())
    steps = random_steps(seed, E, layers, K)
    for cap in capacities(E, len(layers), seed):
        assert_same(replay(name, steps, layers, E, cap, False, seed),
                    replay(name, steps, layers, E, cap, True, seed))


@pytest.mark.parametrize("name", POLICIES)
def test_observe_step_equals_per_layer_loop_synthetic(name):
    steps, layers, E = synthetic_steps()
    for cap in (dict(slots=6), dict(slots=20), dict(budget=40), dict(budget=130)):
        loop = replay(name, steps, layers, E, cap, False, 0, bypass=8, max_swaps=4)
        assert_same(loop, replay(name, steps, layers, E, cap, True, 0, bypass=8, max_swaps=4))
        assert sum(len(s) for s in loop[1]) > 0


def test_observe_step_accepts_other_shapes_and_dtypes():
    """[n, T, K] int16 experts, list hits, hits=None (no stats), no layers at all."""
    a = SimulatedCache(make_policy("window-lfu", interval=1), [3, 5], 8, 2)
    b = SimulatedCache(make_policy("window-lfu", interval=1), [3, 5], 8, 2)
    x = np.array([[[1, 2], [2, -1]], [[4, 4], [-1, -1]]], np.int16)            # [n=2, T=2, K=2]
    hits = [[[True, False], [True, True]], [[False, False], [True, True]]]
    a.observe_step(0, [3, 5], x, hits, prompt=True, tokens=2)
    a.observe_step(1, [5], x[1:], None)
    a.observe_step(2, [], np.zeros((0, 4), np.int64), np.zeros((0, 4), bool))
    b.observe(0, 3, [1, 2, 2, -1], True, tokens=2, hits=[True, False, True])
    b.observe(0, 5, [4, 4, -1, -1], True, tokens=2, hits=[False, False])
    b.observe(1, 5, [4, 4, -1, -1], False)
    assert a.stats == b.stats and a.stats[3].prompt_hits == 2 and a.stats[5].misses == 0
    np.testing.assert_array_equal(a.policy.counts, b.policy.counts)
    assert a.end_step(3, prompt=True) == b.end_step(3, prompt=True)
    assert a.end_step(4) == b.end_step(4)


def test_observe_step_with_a_layer_twice_is_the_loop():
    x = np.array([[1, 2], [2, 3], [3, -1]])
    a = SimulatedCache(make_policy("window-lfu", window=2, interval=1), [0, 1], 8, 2)
    b = SimulatedCache(make_policy("window-lfu", window=2, interval=1), [0, 1], 8, 2)
    a.observe_step(0, [0, 1, 0], x, np.zeros((3, 2), bool))
    for i, l in enumerate([0, 1, 0]):
        b.observe(0, l, x[i], hits=[False] * int((x[i] >= 0).sum()))
    np.testing.assert_array_equal(a.policy.counts, b.policy.counts)
    assert a.stats == b.stats and a.end_step(0) == b.end_step(0)


def test_default_access_step_loops_over_access():
    class Recorder(CachePolicy):
        name = "recorder"

        def bind(self, layers, num_experts):
            super().bind(layers, num_experts)
            self.calls = []

        def access(self, step, layer, experts, prompt):
            self.calls.append((step, layer, [int(e) for e in experts if e >= 0], prompt))

        def scores(self, step, layer):
            return np.full(self.E, NEG)

    ctl = SimulatedCache(Recorder(), [2, 7, 9], 8, 2)
    ctl.observe_step(4, [9, 2], np.array([[1, -1, 3], [-1, -1, -1]]), np.zeros((2, 3), bool))
    assert ctl.policy.calls == [(4, 9, [1, 3], False), (4, 2, [], False)]
    assert ctl.end_step(4) == []


def test_lookup_step_equals_lookup():
    ctl = SimulatedCache(make_policy("lru"), [0, 1, 2], 8, 3)
    ctl.observe_step(0, [0, 1, 2], np.array([[1, 2, 3], [4, -1, 5], [-1, -1, -1]]), None)
    ctl.commit(ctl.end_step(0))
    x = np.array([[1, 2, 7, -1], [5, 5, 4, 0], [0, 1, -1, 2]])
    h = ctl.lookup_step([0, 1, 2], x)
    assert h.shape == x.shape and not h[x < 0].any()
    for i in range(3):
        assert h[i][x[i] >= 0].tolist() == ctl.lookup(i, x[i])
    assert h[0].tolist() == [True, True, False, False] and h[1].tolist() == [True, True, True, False]


# ---- the vectorized plan ranking == the tuple-based one it replaced ----------------------------------

def reference_plan(policy, step, resident, capacity, scores):
    """plan_by_scores as it was: Python tuples sorted (ties: layer, expert), per-layer np.argpartition."""
    budget = getattr(capacity, "budget", None)
    groups = [(list(resident), budget)] if budget is not None else [([l], capacity[l]) for l in resident]
    ranked = []
    for layers, slots in groups:
        res = {l: np.fromiter(resident[l], np.int64, len(resident[l])) for l in layers}
        occ = {l: int(r.size) for l, r in res.items()}
        free = slots - sum(occ.values())
        floor = NEG
        if free <= 0:
            mins = [scores[l][r].min() for l, r in res.items() if r.size]
            floor = min(mins) if mins else np.inf
        cands = []
        for l in layers:
            s = scores[l]
            ok = np.isfinite(s) & (s > floor)
            ok[res[l]] = False
            cands += [(-float(s[e]), l, int(e)) for e in np.flatnonzero(ok)]
        cands = [(-x, l, e) for x, l, e in sorted(cands)]
        victims = []
        for l in layers:
            r = res[l]
            if r.size > len(cands) > 0:
                r = r[np.argpartition(scores[l][r], len(cands) - 1)[:len(cands)]]
            victims += [(float(scores[l][e]), l, int(e)) for e in r]
        victims = sorted(victims)[:len(cands)]
        vi = 0
        for cand in cands:
            sc, lc, c = cand
            if free > 0 and occ[lc] < capacity[lc]:
                if not policy.accept(step, cand, None):
                    break
                ranked.append((np.inf, [(lc, c, None)]))
                free, occ[lc] = free - 1, occ[lc] + 1
                continue
            if vi >= len(victims):
                break
            sv, lv, v = victims[vi]
            if not policy.accept(step, cand, victims[vi]):
                break
            if lv == lc:
                ranked.append((sc - sv, [(lc, c, v)]))
            elif occ[lc] < capacity[lc]:
                ranked.append((sc - sv, [(lv, None, v), (lc, c, None)]))
                occ[lv], occ[lc] = occ[lv] - 1, occ[lc] + 1
            else:
                continue
            vi += 1
    ranked.sort(key=lambda g: -g[0])
    return [s for _, swaps in ranked for s in swaps]


@pytest.mark.parametrize("seed", range(60))
def test_plan_ranking_equals_tuple_reference(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.choice([4, 16, 64]))
    layers = rng.permutation(int(rng.integers(1, 6))).tolist()          # not in id order
    levels = rng.choice([2, 5, 1000])                                  # few levels: many ties
    scores = {l: np.where(rng.random(E) < 0.2, NEG, rng.integers(0, levels, E).astype(float) / 4)
              for l in layers}
    resident = {}
    for l in layers:                                                   # a set with a history (order)
        s = set(rng.choice(E, int(rng.integers(0, E + 1)), replace=False).tolist())
        for e in rng.choice(E, int(rng.integers(0, E)), replace=True).tolist():
            s.discard(e) if rng.random() < 0.5 else s.add(e)
        resident[l] = s
    if seed % 3 == 1:                                                  # few candidates: victims are
        for l in layers:                                               # picked within each layer
            out = np.setdiff1d(np.arange(E), list(resident[l]))
            scores[l][out[rng.random(out.size) < 0.8]] = NEG
    total = sum(len(s) for s in resident.values())
    caps = {l: int(rng.integers(len(resident[l]), E + 1)) for l in layers}
    budget = total + int(rng.integers(-2, 3))
    for capacity in (Capacity(caps), Capacity({l: E for l in layers}, budget), Capacity(caps, budget)):
        for pol in (CachePolicy(), make_policy("window-lfu", margin=float(rng.choice([0, 0.5]))),
                    make_policy("auto", cpu_seconds_per_expert=1.0, copy_seconds_per_expert=30.0)):
            pol.bind(layers, E)
            assert plan_by_scores(pol, 0, resident, capacity, scores) == \
                reference_plan(pol, 0, resident, capacity, scores)


@pytest.mark.parametrize("window", [1, 2, 7])
def test_window_lfu_counts_each_layers_last_window_accesses(window):
    """Per-layer and batched accesses mixed: counts = the ids of each layer's last `window` accesses."""
    rng = np.random.default_rng(window)
    E, layers = 6, [0, 1, 2]
    pol = make_policy("window-lfu", window=window)
    pol.bind(layers, E)
    hist = {l: [] for l in layers}
    for t in range(80):
        x = rng.integers(-1, E, size=(3, int(rng.integers(0, 4))))
        if rng.random() < 0.3:
            l = int(rng.integers(0, 3))
            pol.access(t, l, x[l], False)
            hist[l].append(x[l])
        else:
            rows = np.flatnonzero(rng.random(3) < 0.7)
            pol.access_step(t, rows, x[rows], False)
            for r in rows.tolist():
                hist[r].append(x[r])
        for l in layers:
            ids = np.concatenate([np.zeros(0, np.int64), *hist[l][-window:]]).astype(np.int64)
            np.testing.assert_array_equal(pol.counts[l], np.bincount(ids[ids >= 0], minlength=E))
