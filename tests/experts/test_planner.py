"""CachePlanner.request_prefetch (experts/planner.py): a next-layer guess is a request to the one swap
decider, which fills only when the link is idle, only within a layer's capacity or the global budget, only
into free slots or cold slots of the same layer, never evicting a guessed or recently routed entry; its
ledger counts issued, useful, late and wasted prefetches and the recall of the guesses. Torch-free: the
residency is applied here as its owner would (start, then commit)."""

import pytest

from hotexperts.errors import HotExpertsError
from hotexperts.experts.planner import CachePlanner
from hotexperts.experts.policies import make_policy
from hotexperts.experts.residency import Residency

E = 8


def setup(resident: dict[int, list[int]], capacity=None, budget=None, policy="lru"):
    layers = sorted(resident)
    planner = CachePlanner(make_policy(policy), layers, E, capacity=capacity, budget=budget)
    res = Residency(layers, E)
    loads = [(l, e, None) for l, es in resident.items() for e in es]
    res.start(loads)
    res.commit(loads)
    return planner, res


def apply(res: Residency, swaps, commit: bool = True) -> None:
    res.start(swaps)
    if commit:
        res.commit(swaps)


def route(planner, res, step, layer, experts):
    """Observe `experts` of `layer` at `step` with hit flags from the residency (as the executor does)."""
    planner.observe(step, layer, experts, hits=res.lookup(layer, experts))


def test_nothing_is_filled_while_a_fill_is_in_flight():
    planner, res = setup({0: [0], 1: [0]}, capacity=3)
    apply(res, [(0, 5, None)], commit=False)                    # the link is busy
    assert res.in_flight() and not res.in_flight([1])
    assert planner.request_prefetch(1, 1, [3, 4], res) == []
    assert planner.prefetch.stats.busy == 1
    apply(res, [], commit=False)
    res.commit([(0, 5, None)])
    assert not res.in_flight()
    assert planner.request_prefetch(1, 1, [3, 4], res) == [(1, 3, None), (1, 4, None)]


def test_free_slots_only_within_the_layers_capacity():
    planner, res = setup({0: [0, 1], 1: [0]}, capacity=2)
    route(planner, res, 4, 0, [0, 1])
    route(planner, res, 4, 1, [0])
    assert planner.request_prefetch(5, 0, [6, 7], res) == []      # layer 0 holds K = 2: no cold entry either
    swaps = planner.request_prefetch(5, 1, [5, 6, 7], res, max_fills=3)
    assert swaps == [(1, 5, None)]                                 # one free slot of K = 2, then none cold
    apply(res, swaps)
    assert len(res.resident[1]) == 2


def test_a_global_budget_is_never_exceeded_and_no_slot_moves_between_layers():
    planner, res = setup({0: [0, 1, 2], 1: [0]}, budget=5)
    for step in range(3):
        route(planner, res, step, 0, [0, 1, 2])
    swaps = planner.request_prefetch(3, 1, [4, 5, 6], res, max_fills=3, cold_steps=1)
    assert swaps == [(1, 4, None), (1, 5, 0)]         # the one free slot of 5, then layer 1's own cold entry
    apply(res, swaps)                                 # (never routed), no slot of layer 0 (routed just now)
    assert res.total() == 5 and res.resident[0] == {0, 1, 2} and res.resident[1] == {4, 5}


def test_cold_victims_of_the_same_layer_least_recently_routed_first_never_a_guess():
    planner, res = setup({0: [0, 1, 2, 3]}, capacity=4)
    route(planner, res, 0, 0, [2])
    route(planner, res, 1, 0, [1])
    route(planner, res, 4, 0, [3])
    # step 5, cold_steps 2: 3 was routed at step 4 (kept); 0 never (placeholder), 2 at 0, 1 at 1
    swaps = planner.request_prefetch(5, 0, [0, 6, 7], res, max_fills=3, cold_steps=2)
    assert swaps == [(0, 6, 2), (0, 7, 1)]                          # 0 is guessed: kept although never routed
    apply(res, swaps)
    assert res.resident[0] == {0, 3, 6, 7}
    assert planner.stats[0].loads == 2 and planner.stats[0].evictions == 2


def test_recently_routed_entries_are_never_evicted():
    planner, res = setup({0: [0, 1]}, capacity=2)
    route(planner, res, 3, 0, [0, 1])
    assert planner.request_prefetch(4, 0, [5], res, cold_steps=1) == []
    assert planner.request_prefetch(5, 0, [5], res, cold_steps=1) == [(0, 5, 0)]


def test_unmanaged_layers_and_guesses_already_held_fill_nothing():
    planner, res = setup({0: [0, 1]}, capacity=4)
    assert planner.request_prefetch(0, 7, [3], res) == []
    assert planner.request_prefetch(0, 0, [1, 0, -1], res) == []
    assert planner.request_prefetch(0, 0, [2, 2, 3], res, max_fills=0) == []


def test_bad_bounds_are_refused():
    planner, res = setup({0: [0]}, capacity=2)
    with pytest.raises(HotExpertsError, match="max_fills"):
        planner.request_prefetch(0, 0, [1], res, max_fills=-1)
    with pytest.raises(HotExpertsError, match="cold_steps"):
        planner.request_prefetch(0, 0, [1], res, cold_steps=-1)


def test_ledger_counts_useful_late_wasted_and_recall():
    planner, res = setup({0: [0], 1: [0]}, capacity=3)
    swaps = planner.request_prefetch(1, 1, [3, 4], res)
    assert swaps == [(1, 3, None), (1, 4, None)]
    apply(res, [(1, 3, None)])                                   # 3 lands; 4 still in flight
    res.start([(1, 4, None)])
    route(planner, res, 1, 1, [3, 4, 5, 0])                      # 3 a hit (useful), 4 a miss (late)
    st = planner.prefetch.stats
    assert (st.issued, st.useful, st.late, st.wasted) == (2, 1, 1, 0)
    assert (st.routed, st.covered) == (4, 2)                     # 3 and 4 of 3, 4, 5, 0 were guessed
    assert (st.missed, st.missed_covered) == (3, 2)              # 0 held a slot when guessed
    res.commit([(1, 4, None)])
    swaps = planner.request_prefetch(2, 0, [6], res)
    apply(res, swaps)
    route(planner, res, 2, 0, [0])                               # 6 not routed ...
    route(planner, res, 3, 0, [1, 2])                            # ... and the policy (LRU) evicts it first
    apply(res, planner.plan(3, False, res))
    assert 6 not in res.resident[0]
    d = st.to_dict()
    assert (d["wasted"], d["recall"], d["miss_recall"]) == (1, 2 / 5, 2 / 3)
    assert d["requests"] == 2 and d["predictions"] == 3


def test_guesses_of_another_step_count_no_recall():
    planner, res = setup({0: [0]}, capacity=2)
    planner.request_prefetch(1, 0, [1], res)
    route(planner, res, 2, 0, [1])                                # a later step: the guess expired
    assert planner.prefetch.stats.routed == 0


def test_observe_step_counts_like_observe():
    a, ra = setup({0: [0], 1: [0]}, capacity=3)
    b, rb = setup({0: [0], 1: [0]}, capacity=3)
    for p, r in ((a, ra), (b, rb)):
        apply(r, p.request_prefetch(1, 1, [3, 4], r))
    route(a, ra, 1, 0, [0, 2])
    route(a, ra, 1, 1, [3, 5])
    b.observe_step(1, [0, 1], [[0, 2], [3, 5]], hits=[rb.lookup(0, [0, 2]), rb.lookup(1, [3, 5])])
    assert a.prefetch.stats == b.prefetch.stats and a.prefetch.stats.useful == 1
