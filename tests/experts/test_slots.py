"""SlotCache: delayed fills are never read before they complete; a slot a step still reads is never
refilled; evictions leave the tables at once; pool shrinks on out-of-memory."""

import pytest
import torch

from hotexperts.experts.hybrid import HybridExecutor
from hotexperts.experts.planner import CachePlanner
from hotexperts.experts.policies import make_policy
from hotexperts.experts.slots import SlotCache
from hotexperts.experts.store import ExpertStore
from hotexperts.kernels.gpu_moe import gpu_moe
from hotexperts.weights import LayerExperts

E, D, I = 4, 32, 32


class FakeEvent:
    """query() is False until the test releases it; record() starts new (unfinished) work."""

    def __init__(self, kind):
        self.kind, self.released, self.records = kind, False, 0

    def record(self, stream=None):
        self.records += 1
        self.released = False

    def query(self):
        return self.released

    def synchronize(self):
        self.released = True


class Factory:
    def __init__(self):
        self.events = []

    def __call__(self, kind):
        ev = FakeEvent(kind)
        self.events.append(ev)
        return ev

    def fills(self):
        return [e for e in self.events if e.kind == "fill"]


def random_layer(g):
    return LayerExperts(torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g))


def make(num_slots=2):
    g = torch.Generator().manual_seed(0)
    store = ExpertStore({0: random_layer(g)})
    ctl = CachePlanner(make_policy("lru"), [0], E, capacity=num_slots, max_swaps_per_step=4)
    fac = Factory()
    slots = SlotCache(store, [0], num_slots, "cpu", event_factory=fac)
    return store, ctl, slots, fac


def spy_kernel(slots, fac, reads):
    """gpu_moe that asserts every slot it may read holds a completed fill."""
    def kernel(x, ids, weights, w13, w2, slot_of, out=None, **kw):
        pools = [(w13, slot_of)] + [(p[0], p[2]) for p in kw.get("more", ())]
        for pool, table in pools:
            if pool is not slots.w13:                      # a staging pool, not the slot cache
                continue
            for e in ids.flatten().tolist():
                s = int(table[e])
                if s >= 0:
                    fill = [f for f in slots.fill_log if f.slot == s and f.expert == e][-1]
                    assert fill.event.query(), f"slot {s} read before its fill completed"
                    reads.append((e, s))
        return gpu_moe(x, ids, weights, w13, w2, slot_of, out, **kw)
    return kernel


def test_fill_is_not_used_until_its_event_completes():
    store, ctl, slots, fac = make()
    slots.fill_log = []
    orig = slots._try_copy

    def logged(fill):
        orig(fill)
        if fill.event is not None and fill not in slots.fill_log:
            slots.fill_log.append(fill)
    slots._try_copy = logged

    reads = []
    ex = HybridExecutor(store, "cpu", slots=slots, planner=ctl, gpu_kernel=spy_kernel(slots, fac, reads))
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    ids, w = torch.tensor([[1, 2]]), torch.tensor([[0.6, 0.4]])
    ref = HybridExecutor(store, "cpu")(0, x, ids, w)                        # all on the CPU

    assert slots.issue([(0, 1, None)]) == [(0, 1, None)]
    assert slots.poll() == []                                               # fill event not done
    assert int(slots.mirror(0)[1]) == -1 and int(slots.slot_of(0)[1]) == -1
    assert 1 not in slots.residency.resident[0]
    torch.testing.assert_close(ex(0, x, ids, w), ref, rtol=1e-4, atol=1e-4)     # computed on the CPU
    assert reads == []

    fac.fills()[0].released = True
    assert slots.poll() == [(0, 1, None)]
    assert 1 in slots.residency.resident[0] and slots.resident(0) == [1]
    torch.testing.assert_close(ex(0, x, ids, w), ref, rtol=1e-4, atol=1e-4)
    assert reads == [(1, int(slots.mirror(0)[1]))]                          # now read from its slot


def test_slot_is_not_refilled_while_a_step_reads_it():
    store, ctl, slots, fac = make(num_slots=1)
    slots.fill_now({0: [1]})
    assert slots.residency.resident[0] == {1}
    s = int(slots.mirror(0)[1])
    ex = HybridExecutor(store, "cpu", slots=slots, planner=ctl)
    x, ids, w = torch.randn(1, D), torch.tensor([[1, 3]]), torch.tensor([[0.5, 0.5]])
    ex(0, x, ids, w)                                                        # the step reads slot s ...
    read = slots.last_read[0]
    assert read.records == 1 and not read.query()                           # ... and is still in flight

    assert slots.issue([(0, 3, 1)]) == [(0, 3, 1)]                          # evict 1 -> load 3 into s
    assert int(slots.mirror(0)[1]) == -1 and int(slots.slot_of(0)[1]) == -1  # 1 leaves at once
    torch.testing.assert_close(slots.w13[s], store.layer(0).w13[1])         # but s is not overwritten
    assert slots.fills[0].event is None and slots.poll() == []

    read.released = True                                                    # the step finished
    assert slots.poll() == []                                               # copy issued, fill pending
    torch.testing.assert_close(slots.w13[s], store.layer(0).w13[3])
    torch.testing.assert_close(slots.w2[s], store.layer(0).w2[3])
    fac.fills()[-1].released = True
    assert slots.poll() == [(0, 3, 1)] and slots.resident(0) == [3] and slots.residency.resident[0] == {3}


def test_free_slot_moves_between_layers_and_duplicates_are_skipped():
    g = torch.Generator().manual_seed(1)
    store = ExpertStore({l: random_layer(g) for l in (0, 1)})
    slots = SlotCache(store, [0, 1], 1, "cpu")
    # a duplicate and a load without a free slot are skipped
    assert slots.issue([(0, 2, None), (0, 2, None), (1, 0, None)]) == [(0, 2, None)]
    slots.poll()
    assert slots.issue([(0, None, 2), (1, 0, None)]) == [(0, None, 2), (1, 0, None)]
    slots.poll()
    assert slots.hot_set() == {0: [], 1: [0]}
    torch.testing.assert_close(slots.w13[0], store.layer(1).w13[0])


def test_pool_shrinks_on_out_of_memory(monkeypatch):
    import hotexperts.experts.slots as mod

    real = mod.alloc_like

    def fake(w, n, device):
        if n > 3:
            raise torch.cuda.OutOfMemoryError("fake OOM")
        return real(w, n, device)

    monkeypatch.setattr(mod, "alloc_like", fake)
    store, *_ = make()
    with pytest.warns(RuntimeWarning, match="shrinking"):
        slots = SlotCache(store, [0], 6, "cpu")
    assert slots.num_slots == 3 and len(slots.free) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_swaps_never_synchronise_the_host():
    """Swaps are issued between graphed decode steps while one runs: a host sync there (e.g. a
    `cuda_tensor[i, j] = v` write) would stall the host until that step ends."""
    g = torch.Generator().manual_seed(0)
    store = ExpertStore({0: random_layer(g), 1: random_layer(g)}).pin()
    slots = SlotCache(store, [0, 1], 3, "cuda")
    slots.fill_now({0: [0, 1], 1: [2]})
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        slots.mark_read_all()
        slots.issue([(0, 3, 0), (1, 1, 2)])                 # evict and refill, both layers
        slots.poll()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    slots.wait_all()
    assert set(slots.resident(0)) == {1, 3} and set(slots.resident(1)) == {1}
