"""Worker decode (experts/mailbox.py + kernels/handoff.py, run with torch ops on the CPU): every placement
gives the reference's greedy tokens and logits; hits, misses and swaps equal the synchronous path's; worker
errors and timeouts raise one clear error; the mailbox protocol itself."""

import numpy as np
import pytest
import torch

from hotexperts.errors import HotExpertsError
from hotexperts.experts import mailbox
from hotexperts.experts.build import build_executor
from hotexperts.experts.mailbox import DecodeHandoff
from hotexperts.experts.placement import Placement
from tests.experts.test_hybrid import CFG, STORE, E, check_same, run

PLACEMENTS = ["cpu", "layers:1", "layers:0", "hot:0", "hot:3", f"hot:{E}", "cache:0slots", "cache:5slots:lru",
              "cache:5slots:window-lfu", "cache:5slots:decay", "cache:6slots:auto", f"cache:{2 * E}slots"]


def executor(text, decode="worker", **kw):
    p = Placement.parse(text, rebalance_interval=1 if "lfu" in text or "hot:3" in text else None, window=8,
                        decode=decode, **kw)
    return build_executor(p, STORE, CFG, "cpu")


@pytest.mark.parametrize("text", PLACEMENTS)
def test_worker_decode_matches_reference(text):
    ex = executor(text)
    assert ex.worker is not None and ex.stats()["decode"] == "worker"
    check_same(ex)
    ex.close()


def _top4():
    """A tiny qwen3_moe with top-4 routing (layers then have >= GPU_SHARE misses) and its oracle's run."""
    from dataclasses import replace

    from hotexperts.experts.reference import DenseExecutor
    from hotexperts.experts.store import ExpertStore
    from tests.tiny_model import random_experts, random_model

    cfg = replace(CFG, top_k=4)
    model, store = random_model(cfg, 1, norms="normal"), ExpertStore(random_experts(cfg, 1))
    return cfg, model, store, DenseExecutor({l: store.layer(l) for l in store.layers})


def _greedy(model, executor, n=8):
    from tests.experts.test_hybrid import PROMPT

    kv = model.new_kv_cache(len(PROMPT) + n + 1)
    rows = []
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT), torch.arange(len(PROMPT)), kv, executor)
        executor.end_step()
        for i in range(n):
            rows.append(logits[-1])
            tok = torch.tensor([int(rows[-1].argmax())])
            logits = model(tok, torch.tensor([len(PROMPT) + i]), kv, executor)
            executor.end_step()
    return rows


@pytest.mark.parametrize("text, z", [("cpu", 1), ("cpu", 2), ("layers:1", 1), ("cache:1slots:lru", 0),
                                     ("cache:1slots:lru", 2), ("hot:0", 1)])
def test_gpu_computed_misses_match_reference(text, z):
    """Misses the GPU computes from host memory (--moe-gpu-misses) sum exactly like the CPU's."""
    cfg, model, store, oracle = _top4()
    want = _greedy(model, oracle)
    p = Placement.parse(text, decode="worker", gpu_misses=z)
    ex = build_executor(p, store, cfg, "cpu")
    assert ex.gpu_misses == z
    got = _greedy(model, ex)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    st = ex.stats()
    assert (st["gpu_miss_count"] > 0) == (z > 0) and st["total"]["misses"] >= st["gpu_miss_count"]
    ex.close()


def test_gpu_misses_are_off_unless_asked_for():
    assert executor("cpu").gpu_misses == 0 and executor("cache:5slots").gpu_misses == 0
    assert executor("hot:3", gpu_misses=2).gpu_misses == 2


def test_split_misses_gives_the_first_z_misses_to_the_gpu():
    from hotexperts.kernels.handoff import split_misses

    ids = torch.tensor([[4, 1, -1, 6, 2, 0, 3, 5, 7]])
    slot_row = torch.full((8,), -1, dtype=torch.int32)
    slot_row[1] = 0                                       # expert 1 is resident: a hit
    cpu, gpu = split_misses(ids, slot_row, 3)            # 7 misses: the GPU takes 7 // 4 = 1
    assert gpu[0].tolist() == [4] + [-1] * 8 and cpu[0].tolist() == [-1, -1, -1, 6, 2, 0, 3, 5, 7]
    cpu, gpu = split_misses(ids, None, 3)                # 8 misses: 2
    assert gpu[0].tolist() == [4, 1] + [-1] * 7
    cpu, gpu = split_misses(ids[:, :3], None, 3)         # 2 misses: none
    assert gpu[0].tolist() == [-1] * 3
    cpu, gpu = split_misses(ids, None, 0)
    assert cpu.tolist() == ids.tolist() and gpu[0].tolist() == [-1] * 9
    cpu, gpu = split_misses(ids[:, :2], None, 2, share=2)   # large experts: one of two misses
    assert gpu[0].tolist() == [4, -1] and cpu[0].tolist() == [-1, 1]


def test_split_misses_applies_the_rule_per_token():
    from hotexperts.kernels.handoff import split_misses

    ids = torch.tensor([[4, 1, 6, 2], [3, 5, 7, 0], [1, -1, -1, -1]])
    slot_row = torch.full((8,), -1, dtype=torch.int32)
    slot_row[1] = 0
    cpu, gpu = split_misses(ids, slot_row, 2, share=2)   # misses per token: 3, 4, 0 -> GPU takes 1, 2, 0
    assert gpu.tolist() == [[4, -1, -1, -1], [3, 5, -1, -1], [-1, -1, -1, -1]]
    assert cpu.tolist() == [[-1, -1, 6, 2], [-1, -1, 7, 0], [-1, -1, -1, -1]]


def _counts(ex):
    st = ex.stats()
    return {l: (v["hits"], v["misses"], v["swaps"]) for l, v in st["layers"].items()}


@pytest.mark.parametrize("text", ["layers:1", "hot:3", "cache:5slots:lru", "cache:6slots:auto"])
def test_worker_and_sync_decode_count_the_same(text):
    worker, sync = executor(text), executor(text, decode="sync")
    assert sync.worker is None
    run(worker)
    run(sync)
    assert _counts(worker) == _counts(sync)
    if worker.planner is not None:
        assert worker.slots.residency.resident == sync.slots.residency.resident
    worker.close()


def test_cpu_time_is_recorded_for_cpu_layers():
    ex = executor("cpu")
    run(ex)
    assert all(v["cpu_s"] > 0 for v in ex.stats()["layers"].values())
    ex.close()


def _handoff():
    return DecodeHandoff(STORE, list(STORE.layers), CFG.top_k, CFG.hidden_size, torch.float32, "cpu")


def test_mailbox_round_trip_equals_the_kernel():
    from hotexperts.kernels.cpu_moe import cpu_moe

    h = _handoff()
    h.self_test(torch.float32)                       # row 0, every expert a miss
    layer = STORE.layers[1]
    x = torch.randn(1, CFG.hidden_size)
    ids = torch.tensor([[3, 5]])
    w = torch.tensor([[0.25, 0.75]])
    slot_row = torch.full((E,), -1, dtype=torch.int32)
    slot_row[5] = 0                                  # expert 5 is a "GPU hit": the worker skips it
    h.post(layer, x, ids, w, slot_row)
    y_gpu = torch.ones(1, CFG.hidden_size)
    got = h.collect(layer, ids, slot_row, y_gpu, torch.float32)
    want = 1.0 + cpu_moe(x, torch.tensor([[3, -1]]), w, STORE.layer(layer))
    torch.testing.assert_close(got, want)
    step = h.take_step()
    assert step.rows.tolist() == [1] and step.ids.shape == (1, 1, CFG.top_k) and step.tokens == 1
    assert step.ids[0, 0, :2].tolist() == [3, 5] and step.miss[0, 0, :2].tolist() == [3, -1]
    assert step.hits[0, 0, :2].tolist() == [False, True]
    assert h.take_step().rows.size == 0              # nothing new
    h.close()


def test_mailbox_round_trip_of_t_tokens_is_one_fused_kernel_call():
    """A row holds a verify step's T tokens: the worker's result is the kernel's over all T tokens' misses,
    plus the GPU part; a later, shorter post on the same row reports only its own tokens."""
    from hotexperts.kernels.cpu_moe import cpu_moe

    h = _handoff()
    assert h.max_tokens == mailbox.MAX_STEP_TOKENS
    layer, T, D = STORE.layers[1], 5, CFG.hidden_size
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g)
    ids = torch.randint(0, E, (T, CFG.top_k), generator=g)
    ids[2, 1] = -1                                   # a missing cell
    w = torch.rand(T, CFG.top_k, generator=g)
    slot_row = torch.full((E,), -1, dtype=torch.int32)
    slot_row[ids[0, 0]] = 0                          # one expert is a "GPU hit": the worker skips it
    h.post(layer, x, ids, w, slot_row)
    y_gpu = torch.full((T, D), 0.5)
    got = h.collect(layer, ids, slot_row, y_gpu, torch.float32)
    cpu_ids = torch.where(slot_row[ids.clamp(min=0)] >= 0, -1, ids)
    torch.testing.assert_close(got, 0.5 + cpu_moe(x, cpu_ids, w, STORE.layer(layer)))
    step = h.take_step()
    assert step.ids.shape == (1, T, CFG.top_k) and step.ntok.tolist() == [T] and step.tokens == T
    assert (step.ids[0] == ids.numpy()).all() and (step.hits[0] == ((slot_row[ids.clamp(min=0)] >= 0)
                                                                    & (ids >= 0)).numpy()).all()
    h.post(layer, x[:2], ids[:2], w[:2], None)       # shorter: the stale cells of tokens 2..4 not reported
    torch.testing.assert_close(h.collect(layer, ids[:2], None, None, torch.float32),
                               cpu_moe(x[:2], ids[:2], w[:2], STORE.layer(layer)))
    step = h.take_step()
    assert step.ids.shape == (1, 2, CFG.top_k) and (step.ids[0] == ids[:2].numpy()).all()
    h.close()


def test_a_step_longer_than_the_mailbox_is_a_clear_error():
    h = DecodeHandoff(STORE, list(STORE.layers), CFG.top_k, CFG.hidden_size, torch.float32, "cpu",
                      max_tokens=3)
    ids = torch.zeros(4, CFG.top_k, dtype=torch.long)
    with pytest.raises(HotExpertsError, match="4 tokens does not fit the decode mailbox"):
        h.post(STORE.layers[0], torch.randn(4, CFG.hidden_size), ids, torch.ones(4, CFG.top_k), None)
    h.close()


def test_no_miss_returns_the_gpu_part_without_waiting():
    h = _handoff()
    h.worker.close()                                 # nobody would answer
    layer = STORE.layers[0]
    slot_row = torch.arange(E, dtype=torch.int32)    # everything resident
    ids = torch.tensor([[1, 2]])
    h.post(layer, torch.randn(1, CFG.hidden_size), ids, torch.ones(1, 2), slot_row)
    y = torch.full((1, CFG.hidden_size), 2.0)
    assert torch.equal(h.collect(layer, ids, slot_row, y, torch.float32), y)
    h.take_step()


def test_worker_error_is_raised_after_the_step():
    ex = executor("cpu")
    layer = STORE.layers[0]
    x = torch.randn(1, CFG.hidden_size)
    ex(layer, x, torch.tensor([[E + 3, 1]]), torch.ones(1, 2))   # an expert id out of range
    with pytest.raises(HotExpertsError, match="out of range"):
        ex.end_step()
    ex.close()


def test_each_worker_failure_reports_its_own_message():
    """The message is handed over with the acknowledgement: a second failure is not reported as the first."""
    ex = executor("cpu")
    layer = STORE.layers[0]
    x = torch.randn(1, CFG.hidden_size)
    for bad in (E + 3, E + 7):
        ex(layer, x, torch.tensor([[bad, 1]]), torch.ones(1, 2))
        with pytest.raises(HotExpertsError, match=f"expert id {bad} out of range"):
            ex.end_step()
    ex.close()


def test_a_silent_worker_times_out_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(mailbox, "TIMEOUT_S", 0.2)
    ex = executor("cpu")
    ex.worker.handoff.worker.close()
    layer = STORE.layers[0]
    ex(layer, torch.randn(1, CFG.hidden_size), torch.tensor([[1, 2]]), torch.ones(1, 2))
    with pytest.raises(HotExpertsError, match="did not answer"):
        ex.end_step()


def test_bad_decode_mode_is_a_placement_error():
    from hotexperts.errors import PlacementError

    with pytest.raises(PlacementError, match="--moe-decode"):
        Placement.parse("cpu", decode="fast")


@pytest.mark.parametrize("decode", ["worker", "sync"])
def test_missing_cells_are_neither_hits_nor_misses_in_either_mode(decode):
    ex = executor("cache:20slots:lru", decode=decode)
    layer, K = STORE.layers[0], CFG.top_k
    x = torch.randn(1, CFG.hidden_size)
    for _ in range(3):                                   # expert E-1 becomes resident
        ex(layer, x, torch.full((1, K), E - 1), torch.full((1, K), 1.0 / K))
        ex.end_step()
    before = ex.stats()["total"]
    y = ex(layer, x, torch.full((1, K), -1), torch.full((1, K), 1.0 / K))
    ex.end_step()
    after = ex.stats()["total"]
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"]
    assert torch.count_nonzero(y) == 0
    ex.close()


# ---- verify steps (T > 1 tokens announced by before_step) through the worker ----------------------------
VERIFY_PLACEMENTS = ["cpu", "layers:1", "hot:3", f"hot:{E}", "cache:5slots:lru", "cache:6slots:auto",
                     f"cache:{2 * E}slots"]


def _speculate(ex, T, singles=2, forbid_sync=False):
    """Prefill, one verify step of the reference's next T tokens, then `singles` T=1 steps -> logits rows
    [T + singles, V], which should be the reference's rows 1.. (each predicts the next reference token)."""
    from tests.experts.test_hybrid import MODEL, PROMPT, REF_TOKS

    P = len(PROMPT)
    kv = MODEL.new_kv_cache(P + T + singles + 1)
    with torch.no_grad():
        MODEL(torch.tensor(PROMPT), torch.arange(P), kv, ex)
        ex.end_step()
        if forbid_sync:
            ex.sync = lambda *a: pytest.fail("a decode or verify step took the synchronous path")
        rows = []
        for tokens, pos in [(REF_TOKS[:T], P)] + [([REF_TOKS[T + i]], P + T + i) for i in range(singles)]:
            ex.before_step()
            rows.append(MODEL(torch.tensor(tokens), torch.arange(pos, pos + len(tokens)), kv, ex))
            ex.end_step()
    return torch.cat(rows)


@pytest.mark.parametrize("text", VERIFY_PLACEMENTS)
@pytest.mark.parametrize("T", [2, 5])
def test_verify_step_through_the_worker_equals_single_steps(text, T):
    """A verify step's T tokens go through the mailbox (never the synchronous path) and give the logits of
    T single steps (fp32 GEMM row blocking only) and the same greedy tokens."""
    from tests.experts.test_hybrid import REF_ROWS

    ex = executor(text)
    got = _speculate(ex, T, forbid_sync=True)
    want = torch.stack(REF_ROWS[1:T + 3])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    ex.close()


@pytest.mark.parametrize("text", ["layers:1", "hot:3", "cache:5slots:lru", "cache:6slots:auto"])
def test_worker_and_sync_verify_steps_count_and_plan_the_same(text):
    """The worker feeds the planner a verify step's T x K cells (the union of its tokens' experts), as the
    synchronous path does: equal hits, misses, swaps and residency."""
    worker, sync = executor(text), executor(text, decode="sync")
    a, b = _speculate(worker, 4), _speculate(sync, 4)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert _counts(worker) == _counts(sync)
    if worker.planner is not None:
        assert worker.slots.residency.resident == sync.slots.residency.resident
        assert worker.planner.decode_steps == sync.planner.decode_steps
    worker.close()


@pytest.mark.parametrize("text", ["hot:3", "cache:5slots:lru", "cache:6slots:auto"])
def test_deferred_verify_steps_give_the_same_logits_and_every_cell_once(text):
    """With defer (the CUDA default) a verify step's routing is taken from the mailbox in the next
    before_step and accounted while the next step runs, as a T = 1 step's is."""
    from tests.experts.test_hybrid import REF_ROWS

    ex = executor(text)
    ex.defer = True
    got = _speculate(ex, 4)
    torch.testing.assert_close(got, torch.stack(REF_ROWS[1:7]), rtol=1e-4, atol=1e-4)
    st = ex.stats()["total"]                                          # stats() flushes the last step
    assert st["hits"] + st["misses"] == (10 + 4 + 2) * CFG.top_k * len(STORE.layers)
    assert ex.planner.decode_steps == 3
    ex.close()


def test_the_planner_observes_the_verify_steps_union():
    ex = executor("cache:5slots:lru")
    routed, observed = {}, []
    ex.on_route = lambda layer, ids, w: routed.setdefault(layer, []).append(ids.clone())
    inner = ex.planner.observe_step

    def spy(step, layers, experts, hits=None, prompt=False, tokens=1):
        observed.append((list(layers), np.asarray(experts).reshape(len(layers), -1).copy(), prompt, tokens))
        return inner(step, layers, experts, hits, prompt, tokens)

    ex.planner.observe_step = spy
    _speculate(ex, 4, singles=0)
    layers, experts, prompt, tokens = observed[-1]                    # the verify step's
    assert not prompt and tokens == 4 and layers == list(STORE.layers)
    for i, l in enumerate(layers):
        ids = routed[l][-1]                                           # [4, K]: the verify call's routing
        assert ids.shape[0] == 4
        assert set(experts[i][experts[i] >= 0].tolist()) == set(ids.flatten().tolist())
        assert sorted(experts[i][experts[i] >= 0].tolist()) == sorted(ids.flatten().tolist())   # all cells
    ex.close()


def test_verify_steps_past_the_mailbox_take_the_synchronous_path():
    from hotexperts.experts.worker_decode import WorkerDecode
    from tests.experts.test_hybrid import REF_ROWS

    ex = executor("cache:5slots:lru")
    ex.worker.close()
    ex.worker = WorkerDecode(ex.cache, DecodeHandoff(STORE, list(STORE.layers), CFG.top_k, CFG.hidden_size,
                                                     torch.float32, "cpu", max_tokens=2))
    got = _speculate(ex, 3)                                           # 3 > 2 tokens: SyncStep, same logits
    torch.testing.assert_close(got, torch.stack(REF_ROWS[1:6]), rtol=1e-4, atol=1e-4)
    st = ex.stats()["total"]
    assert st["hits"] + st["misses"] == (10 + 3 + 2) * CFG.top_k * len(STORE.layers)
    ex.close()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("text", ["cpu", "cpu+2", "layers:1", "hot:3", f"hot:{E}", "cache:5slots:lru",
                                  "cache:6slots:auto", "cache:6slots:lru+0"])
def test_cuda_graphed_worker_decode_matches_reference(text):
    """On CUDA the worker path is the default and the whole decode step is one CUDA graph."""
    from hotexperts.engine.generate import Generator
    from hotexperts.engine.sampling import SamplingParams
    from hotexperts.experts.reference import DenseExecutor
    from hotexperts.experts.store import ExpertStore
    from tests.experts.test_hybrid import MODEL, PROMPT

    model = MODEL.cuda()
    try:
        store = ExpertStore({l: STORE.layer(l) for l in STORE.layers})
        params = SamplingParams(max_tokens=16)
        oracle = DenseExecutor({l: store.layer(l) for l in store.layers}, "cuda")
        ref = Generator(model, oracle, CFG, "cuda", 64)
        want = list(ref.generate(PROMPT, params))
        text, _, z = text.partition("+")                 # "+Z": --moe-gpu-misses Z
        p = Placement.parse(text, rebalance_interval=1 if text == "hot:3" else None,
                            gpu_misses=int(z) if z else None)
        ex = build_executor(p, store, CFG, "cuda")
        assert ex.worker is not None and ex.graph_safe
        gen = Generator(model, ex, CFG, "cuda", 64)
        assert list(gen.generate(PROMPT, params)) == want
        assert gen.decode_step.graphed
        st = ex.stats()["total"]
        assert st["hits"] + st["misses"] == (len(PROMPT) + len(want) - 1) * CFG.top_k * len(STORE.layers)
        ex.close()
    finally:
        model.cpu()


@pytest.mark.parametrize("text", ["layers:1", "hot:3", "cache:5slots:lru", "cache:6slots:auto"])
def test_deferred_bookkeeping_gives_the_same_tokens_and_counts(text):
    """With defer (the CUDA default), a step's stats and policy run while the next step runs; through the
    Generator (which calls before_step) the tokens and, after flush, the counts match the reference."""
    from hotexperts.engine.generate import Generator
    from hotexperts.engine.sampling import SamplingParams
    from tests.experts.test_hybrid import MODEL, PROMPT, REF_TOKS

    ex = executor(text)
    ex.defer = True
    gen = Generator(MODEL, ex, CFG, "cpu", 64)
    toks = list(gen.generate(PROMPT, SamplingParams(max_tokens=len(REF_TOKS))))
    assert toks == REF_TOKS
    st = ex.stats()["total"]                                   # stats() flushes the last step
    assert st["hits"] + st["misses"] == (len(PROMPT) + len(toks) - 1) * CFG.top_k * len(STORE.layers)
    again = list(gen.generate(PROMPT, SamplingParams(max_tokens=len(REF_TOKS))))   # a second request
    assert again == REF_TOKS
    ex.close()


def test_a_failed_step_raises_before_its_token_is_used_even_when_deferred(monkeypatch):
    """Under deferral the worker's failure still stops generation at the step that failed (the Generator
    checks after sampling), with the engine's error class (the server answers 500)."""
    from hotexperts.engine.generate import Generator
    from hotexperts.engine.sampling import SamplingParams
    from hotexperts.errors import ExpertComputeError
    from tests.experts.test_hybrid import MODEL, PROMPT

    monkeypatch.setattr(mailbox, "TIMEOUT_S", 0.2)
    ex = executor("cpu")
    ex.defer = True
    gen = Generator(MODEL, ex, CFG, "cpu", 64)
    it = gen.generate(PROMPT, SamplingParams(max_tokens=6))
    next(it)                                                   # the prefill's token
    ex.worker.handoff.worker.close()                                   # the worker dies
    with pytest.raises(ExpertComputeError, match="did not answer"):
        next(it)                                               # the very next decode step reports it


def test_routing_wider_than_the_mailbox_is_a_clear_error():
    ex = executor("cpu")
    with pytest.raises(HotExpertsError, match="exceeds the model's top-k"):
        ex(STORE.layers[0], torch.randn(1, CFG.hidden_size), torch.tensor([[1, 2, 3]]), torch.ones(1, 3))
    ex.close()


def test_a_closed_executor_refuses_to_run():
    ex = executor("cpu")
    ex.close()
    with pytest.raises(HotExpertsError, match="closed"):
        ex(STORE.layers[0], torch.randn(1, CFG.hidden_size), torch.tensor([[1, 2]]), torch.ones(1, 2))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("T", [1, 3, 16])
def test_cuda_mailbox_round_trip_of_t_tokens(T):
    """The Triton post / collect kernels with a step of T tokens: the kernel's result over the misses plus
    the GPU part, inside a CUDA graph as in a replayed verify step."""
    from hotexperts.experts.store import ExpertStore
    from hotexperts.kernels.cpu_moe import cpu_moe

    store = ExpertStore({l: STORE.layer(l) for l in STORE.layers})
    h = DecodeHandoff(store, list(store.layers), CFG.top_k, CFG.hidden_size, torch.float32, "cuda")
    try:
        h.self_test(torch.float32)
        layer, D = store.layers[1], CFG.hidden_size
        g = torch.Generator().manual_seed(T)
        x, w = torch.randn(T, D, generator=g), torch.rand(T, CFG.top_k, generator=g)
        ids = torch.randint(0, E, (T, CFG.top_k), generator=g)
        slot_row = torch.full((E,), -1, dtype=torch.int32)
        slot_row[int(ids[0, 0])] = 0
        dev = [t.cuda() for t in (x, ids, w, slot_row)]
        y = torch.full((T, D), 0.5, device="cuda")
        graph = torch.cuda.CUDAGraph()
        h.post(layer, *dev[:3], dev[3])                          # warm-up: compiles the T-token kernels
        h.collect(layer, dev[1], dev[3], y, torch.float32)
        with torch.cuda.graph(graph):
            h.post(layer, *dev[:3], dev[3])
            out = h.collect(layer, dev[1], dev[3], y, torch.float32)
        graph.replay()
        torch.cuda.synchronize()
        h.check()
        cpu_ids = torch.where(slot_row[ids] >= 0, -1, ids)
        torch.testing.assert_close(out.cpu(), 0.5 + cpu_moe(x, cpu_ids, w, store.layer(layer)),
                                   rtol=1e-4, atol=1e-4)
        step = h.take_step()
        assert step.tokens == T and (step.ids[0] == ids.numpy()).all()
    finally:
        h.close()
