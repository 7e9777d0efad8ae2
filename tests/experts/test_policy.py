"""Cache policies and the controller on hand-made access sequences with known answers."""

import itertools

import numpy as np
import pytest

from hotexperts.errors import HotExpertsError
from hotexperts.experts.policies import Adaptive, Belady, Decay, WindowLFU, make_policy, policy_from_profile
from hotexperts.experts.profile import ProfileError, load_profile, profile_from_counts, save_profile
from hotexperts.trace.simulate import SimulatedCache

CLASSIC = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def replay(ctl, seq, layer=0, start=0):
    """One decode step per element; element = expert id or list of ids (or {layer: ids})."""
    for t, x in enumerate(seq, start):
        per_layer = x if isinstance(x, dict) else {layer: [x] if isinstance(x, int) else x}
        for l, ids in per_layer.items():
            hits = ctl.lookup(l, ids)
            ctl.observe(t, l, ids, False, hits=hits)
        ctl.commit(ctl.end_step(t))
    return ctl


def misses(ctl, layer=0):
    return ctl.stats[layer].misses


def belady_for(seq, layer=0):
    return Belady([(t, layer, [x]) for t, x in enumerate(seq)])


def optimal_misses(seq, slots):
    """Brute force over every cache content (bypass allowed): the minimum number of misses."""
    pages = sorted(set(seq))
    states = {frozenset(): 0}
    for x in seq:
        nxt = {}
        for s, cost in states.items():
            cost += x not in s
            after = [s] if x in s else [s] + [frozenset(c) | {x}
                                               for k in range(min(len(s), slots - 1) + 1)
                                               for c in itertools.combinations(sorted(s), k)]
            for a in after:
                for drop in range(len(a) + 1):       # any subset may be dropped afterwards too
                    for keep in itertools.combinations(sorted(a), len(a) - drop):
                        key = frozenset(keep)
                        if len(key) <= slots and nxt.get(key, 1 << 30) > cost:
                            nxt[key] = cost
        states = nxt
    assert set(pages) >= set().union(*states)
    return min(states.values())


@pytest.mark.parametrize("slots,expected", [(3, 10), (4, 8)])
def test_lru_classic_sequence(slots, expected):
    ctl = replay(SimulatedCache(make_policy("lru"), [0], 8, slots, None), CLASSIC)
    assert misses(ctl) == expected


def test_lru_textbook_sequence():
    ctl = replay(SimulatedCache(make_policy("lru"), [0], 8, 3, None), TEXTBOOK)
    assert misses(ctl) == 12


@pytest.mark.parametrize("seq", [TEXTBOOK, CLASSIC])
def test_belady_is_optimal(seq):
    ctl = replay(SimulatedCache(belady_for(seq), [0], 8, 3, None), seq)
    assert misses(ctl) == optimal_misses(seq, 3)
    assert misses(ctl) <= 9 if seq is TEXTBOOK else True
    lru = replay(SimulatedCache(make_policy("lru"), [0], 8, 3, None), seq)
    assert misses(ctl) < misses(lru)


def test_window_lfu_hysteresis_keeps_resident_under_margin():
    pol = WindowLFU(window=100, interval=1, margin=2)
    ctl = replay(SimulatedCache(pol, [0], 4, 1, None), [0] * 5)
    assert ctl.resident[0] == {0}
    replay(ctl, [1] * 6, start=5)                      # 6 vs 5: beats by 1 < margin 2
    assert ctl.resident[0] == {0}
    replay(ctl, [1] * 2, start=11)                     # 8 vs 5: beats by 3 > margin 2
    assert ctl.resident[0] == {1}


def test_window_lfu_forgets_outside_window():
    pol = WindowLFU(window=4, interval=1, margin=0)
    ctl = replay(SimulatedCache(pol, [0], 4, 1, None), [0] * 10 + [2] * 3)
    assert ctl.resident[0] == {2}                      # the 10 old accesses left the window


def test_global_budget_gives_hot_layer_more_slots():
    seq = [{0: [0, 1, 2, 3], 1: [5]} for _ in range(20)]
    glob = replay(SimulatedCache(Decay(half_life=8), [0, 1], 8, None, None, budget=5), seq)
    assert len(glob.resident[0]) == 4 and glob.resident[1] == {5}
    per = replay(SimulatedCache(Decay(half_life=8), [0, 1], 8, {0: 3, 1: 2}, None), seq)
    assert glob.hit_rate() > per.hit_rate()


def test_global_budget_moves_slots_between_layers():
    ctl = SimulatedCache(Decay(half_life=2), [0, 1], 8, None, None, budget=2)
    replay(ctl, [{0: [0, 1]}] * 5)
    assert ctl.resident == {0: {0, 1}, 1: set()}
    replay(ctl, [{1: [3, 4]}] * 10, start=5)
    assert ctl.resident == {0: set(), 1: {3, 4}}
    assert ctl.stats[0].evictions == 2 and ctl.stats[1].loads == 2


def test_payback_refuses_swap_costing_more_than_it_saves():
    seq = [[t % 4] for t in range(40)]
    costly = Adaptive(interval=1, cpu_seconds_per_expert=1e-4, copy_seconds_per_expert=1.0)
    assert sum(s.loads for s in replay(SimulatedCache(costly, [0], 4, 2, None), seq).stats.values()) == 0
    cheap = Adaptive(interval=1, cpu_seconds_per_expert=1e-4, copy_seconds_per_expert=1e-9)
    assert replay(SimulatedCache(cheap, [0], 4, 2, None), seq).stats[0].loads > 0


def test_bounded_swaps_per_step_and_backlog():
    ctl = SimulatedCache(WindowLFU(window=10, interval=10, margin=0), [0], 8, 4, max_swaps_per_step=2,
                          max_fills_per_step=2)
    for e in range(4):
        ctl.observe(0, 0, [e])
    first = ctl.end_step(0)
    assert len(first) == 2
    ctl.commit(first)
    second = ctl.end_step(1)                            # no re-plan: the backlog continues
    assert len(second) == 2 and {c for _, c, _ in first + second} == {0, 1, 2, 3}


def test_fills_into_free_slots_are_not_counted_as_swaps():
    ctl = SimulatedCache(make_policy("lru"), [0], 8, 4, max_swaps_per_step=1, max_fills_per_step=None)
    ctl.observe(0, 0, [0, 1, 2, 3])
    fills = ctl.end_step(0)
    assert sorted(c for _, c, _ in fills) == [0, 1, 2, 3] and all(v is None for _, _, v in fills)
    ctl.commit(fills)
    ctl.observe(1, 0, [4, 5])                           # now full: loads evict, one per step
    assert len(ctl.end_step(1)) == 1


def test_prompt_fills_free_slots_without_evicting():
    ctl = SimulatedCache(make_policy("lru"), [0, 1], 8, 2, prompt_bypass=4)
    ctl.observe(0, 0, [5, 5, 5, 6, 7, 1], prompt=True, tokens=6)     # large prompt: policy not fed
    ctl.observe(0, 1, [2, 2, 3], prompt=True, tokens=6)
    fills = ctl.end_step(0, prompt=True)
    assert {(l, c) for l, c, _ in fills} == {(0, 5), (0, 1), (1, 2), (1, 3)}     # ties: lowest id
    ctl.commit(fills)
    ctl.observe(1, 0, [4, 4, 4], prompt=True, tokens=6)
    assert ctl.end_step(1, prompt=True) == []            # full: a prompt never evicts


def test_cold_start_fills_each_layer_and_prompts_replace_only_never_routed_placeholders():
    ctl = SimulatedCache(make_policy("lru"), [0, 1], 8, 3, prompt_bypass=4)
    loads = ctl.cold_start()
    assert loads == [(0, 0, None), (1, 0, None), (0, 1, None), (1, 1, None), (0, 2, None), (1, 2, None)]
    ctl.commit(loads)
    assert ctl.stats[0].loads == 0                              # load time, not swaps
    ctl.observe(0, 0, [5, 5, 1, 6], prompt=True, tokens=6)       # routes placeholder 1: it stays
    ctl.observe(0, 1, [2], prompt=True, tokens=6)
    swaps = ctl.end_step(0, prompt=True)
    assert swaps == [(0, 5, 0), (0, 6, 2)]                     # paired with a placeholder of the same layer
    ctl.commit(swaps)
    assert ctl.resident == {0: {1, 5, 6}, 1: {0, 1, 2}}
    ctl.observe(1, 1, [0])                                       # decode routes placeholder 0 of layer 1
    ctl.commit(ctl.end_step(1))
    ctl.observe(2, 1, [6, 7], prompt=True, tokens=6)             # a later prompt: only 1 is never routed
    assert ctl.end_step(2, prompt=True) == [(1, 6, 1)]
    ctl.observe(3, 0, [7], prompt=True, tokens=6)                # layer 0 holds only routed experts now
    assert ctl.end_step(3, prompt=True) == []                    # a prompt never evicts them


def test_a_placeholder_routed_by_one_prompt_chunk_survives_the_next():
    ctl = SimulatedCache(make_policy("lru"), [0], 8, 3, prompt_bypass=4)
    ctl.commit(ctl.cold_start())                                 # {0, 1, 2}
    ctl.observe(0, 0, [0] * 10 + [5], prompt=True, tokens=11)
    ctl.commit(ctl.end_step(0, prompt=True))                     # 5 takes a never-routed placeholder
    ctl.observe(1, 0, [6, 7], prompt=True, tokens=6)
    ctl.commit(ctl.end_step(1, prompt=True))
    assert 0 in ctl.resident[0] and 5 in ctl.resident[0]         # routed by chunk 1: kept


def test_decode_swaps_that_evict_a_placeholder_count_as_fills():
    ctl = SimulatedCache(make_policy("lru"), [0], 64, 24, max_swaps_per_step=1, max_fills_per_step=64)
    ctl.commit(ctl.cold_start())                                 # experts 0..23, never routed
    ctl.observe(0, 0, list(range(40, 48)))
    swaps = ctl.end_step(0)
    assert len(swaps) == 8 and all(v in range(24) for _, _, v in swaps)   # not 1: at the fills' pace


def test_cold_start_under_a_global_budget_shares_slots_and_moves_them_to_routed_layers():
    ctl = SimulatedCache(make_policy("lru"), [0, 1, 2], 8, None, budget=7, prompt_bypass=4)
    loads = ctl.cold_start()
    assert [sum(1 for l, _, _ in loads if l == x) for x in (0, 1, 2)] == [3, 2, 2]
    ctl.commit(loads)
    ctl.observe(0, 2, [4, 5, 6, 7, 0], prompt=True, tokens=6)   # layer 2 needs 5: slots of layer 0 move
    swaps = ctl.end_step(0, prompt=True)                        # own placeholder first, then the layer with
    assert swaps == [(2, 4, 1), (0, None, 0), (2, 5, None),     # the most spare ones; evictions first
                     (0, None, 1), (2, 6, None), (1, None, 0), (2, 7, None)]
    ctl.commit(swaps)
    assert ctl.resident == {0: {2}, 1: {1}, 2: {0, 4, 5, 6, 7}}


def test_uncommitted_loads_are_not_hits():
    ctl = SimulatedCache(make_policy("lru"), [0], 8, 2, None)
    ctl.observe(0, 0, [3])
    swaps = ctl.end_step(0)
    assert swaps == [(0, 3, None)] and ctl.lookup(0, [3]) == [False]
    ctl.commit(swaps)
    assert ctl.lookup(0, [3, -1, 4]) == [True, False]


def test_prompt_bypass_does_not_flush_decode_set():
    ctl = replay(SimulatedCache(make_policy("lru"), [0], 16, 2, None), [0, 1, 0, 1])
    big = list(range(2, 16)) * 8
    ctl.observe(4, 0, big, True, tokens=100, hits=ctl.lookup(0, big))
    ctl.commit(ctl.end_step(4, prompt=True))
    replay(ctl, [0, 1], start=5)
    assert ctl.resident[0] == {0, 1} and ctl.stats[0].prompt_misses == len(big)
    assert ctl.stats[0].misses == 2


def test_controller_is_deterministic():
    rng = np.random.default_rng(0)
    seq = [{l: rng.integers(0, 16, 2).tolist() for l in (0, 1, 2)} for _ in range(200)]
    for name in ("lru", "window-lfu", "decay", "auto"):
        a = replay(SimulatedCache(make_policy(name), [0, 1, 2], 16, 4, 2), seq)
        b = replay(SimulatedCache(make_policy(name), [0, 1, 2], 16, 4, 2), seq)
        assert a.resident == b.resident and a.stats == b.stats, name


def test_static_profile_roundtrip_and_warm_start(tmp_path):
    counts = {0: [0, 9, 1, 5], 1: [3, 0, 0, 0]}
    prof = profile_from_counts(counts, capacity=2, model="x")
    assert prof.hot == {0: [1, 3], 1: [0]}
    path = save_profile(tmp_path / "p.json", prof)
    back = load_profile(path, num_experts=4)
    assert back.hot == prof.hot and back.counts[0] == [0, 9, 1, 5]
    ctl = SimulatedCache(policy_from_profile(back), [0, 1], 4, 2, None)
    ctl.commit(ctl.warm_start(back))
    assert ctl.resident == {0: {1, 3}, 1: {0}}
    ctl.commit(ctl.end_step(0))
    assert ctl.resident == {0: {1, 3}, 1: {0}}          # static: nothing moves
    assert ctl.export_profile().hot[0] == [1, 3]


def test_global_profile_budget():
    prof = profile_from_counts({0: [9, 8, 7, 1], 1: [2, 0, 0, 0]}, budget=4)
    assert prof.hot == {0: [0, 1, 2], 1: [0]}


def test_profile_errors(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ProfileError, match="not a readable"):
        load_profile(tmp_path / "bad.json")
    path = save_profile(tmp_path / "p.json", profile_from_counts({0: [1, 2]}, 1))
    with pytest.raises(ProfileError, match="2 experts"):
        load_profile(path, num_experts=8)
    with pytest.raises(HotExpertsError, match="unknown cache policy"):
        make_policy("fifo")
