"""Next-layer prediction (experts/predict.py): the guess is layer L+1's router on L's residual, the same from
the executor's input; recall counts what it covers; prefetching on the hybrid decode path keeps outputs
exact (tokens identical to the DenseExecutor reference, and to prefetch off on the tiny presets; every read
of the slots equals, bit for bit, the same kernel over the store's own experts) and does issue fills."""

import functools
import math

import pytest
import torch

from hotexperts.config import ModelConfig
from hotexperts.engine.presets import build_in_memory
from hotexperts.errors import HotExpertsError
from hotexperts.experts.build import build_executor
from hotexperts.experts.placement import Placement
from hotexperts.experts.predict import NextLayerPredictor, recall
from hotexperts.experts.reference import DenseExecutor
from hotexperts.experts.store import ExpertStore
from hotexperts.models.transformer import MoETransformer
from hotexperts.weights import LayerExperts

E, K = 8, 2
CFG = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=8, num_experts=E, top_k=K, moe_intermediate_size=32,
                  moe_layers=(0, 1, 3), intermediate_size=24, qk_norm="head", eos_token_ids=())
PROMPT = [1, 5, 9, 2, 7, 3, 11, 4, 8, 6]
N_GEN = 10


def tiny(seed=0):
    torch.manual_seed(seed)
    model = MoETransformer(CFG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)                  # not all ones: the input recovery divides by them
            else:
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(seed)
    D, I = CFG.hidden_size, CFG.moe_intermediate_size
    store = ExpertStore({i: LayerExperts(torch.randn(E, 2 * I, D, generator=g) * 0.3,
                                         torch.randn(E, D, I, generator=g) * 0.3) for i in CFG.moe_layers})
    return model, store


MODEL, STORE = tiny()


def run(executor):
    """Prefill + greedy decode with end_step after every forward -> (tokens, [last logits rows])."""
    kv = MODEL.new_kv_cache(len(PROMPT) + N_GEN + 1)
    with torch.no_grad():
        logits = MODEL(torch.tensor(PROMPT), torch.arange(len(PROMPT)), kv, executor)
        executor.end_step()
        rows, toks = [logits[-1]], []
        for i in range(N_GEN):
            toks.append(int(rows[-1].argmax()))
            logits = MODEL(torch.tensor([toks[-1]]), torch.tensor([len(PROMPT) + i]), kv, executor)
            executor.end_step()
            rows.append(logits[-1])
    return toks, rows


REF_TOKS, REF_ROWS = run(DenseExecutor({l: STORE.layer(l) for l in STORE.layers}))


def test_next_layer_skips_dense_layers_and_ends_at_the_last_moe_layer():
    p = NextLayerPredictor.from_model(MODEL)
    assert [p.next_layer(l) for l in (0, 1, 3)] == [1, 3, None]
    assert p.predict(3, torch.randn(2, CFG.hidden_size)) is None
    assert p.predict_from_input(3, torch.randn(2, CFG.hidden_size)) is None


def test_prediction_is_the_next_routers_top_k_plus_extra_on_the_residual():
    h = torch.randn(5, CFG.hidden_size)
    nxt = MODEL.model.layers[3]
    logits = nxt.mlp.gate(nxt.post_attention_layernorm(h))
    for extra in (0, 3):
        got = NextLayerPredictor.from_model(MODEL, extra).predict(1, h)
        assert got.shape == (5, K + extra)
        assert torch.equal(got, torch.topk(logits, K + extra, dim=-1).indices)
    with pytest.raises(HotExpertsError, match="extra guesses"):
        NextLayerPredictor.from_model(MODEL, -1)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_prediction_from_the_executor_input_equals_the_one_from_the_residual(zero_centered):
    p = NextLayerPredictor.from_model(MODEL, extra=2)
    norm = MODEL.model.layers[0].post_attention_layernorm
    h = torch.randn(6, CFG.hidden_size) * 7.0
    old = norm.zero_centered
    try:
        norm.zero_centered = zero_centered
        xn = norm(h)                                                 # what the executor receives
        assert torch.equal(p.predict_from_input(0, xn), p.predict(0, h))
    finally:
        norm.zero_centered = old


def test_misses_are_the_unique_guesses_without_a_slot():
    p = NextLayerPredictor.from_model(MODEL)
    row = torch.tensor([-1, 0, -1, 3, -1, -1, 1, -1], dtype=torch.int32)
    assert p.misses(0, torch.tensor([[2, 1], [2, 7], [6, 0]]), row) == [0, 2, 7]


def test_recall_counts_covered_cells_among_the_counted_ones():
    actual = torch.tensor([[1, 2], [3, 4], [5, -1]])
    pred = torch.tensor([[2, 9, 1], [4, 0, 0], [7, 7, 7]])
    assert recall(pred, actual) == pytest.approx(3 / 5)             # -1 never counts
    counted = torch.tensor([[True, False], [True, True], [True, True]])
    assert recall(pred, actual, counted) == pytest.approx(2 / 4)           # 1 and 4 of 1, 3, 4, 5
    assert math.isnan(recall(pred, actual, torch.zeros(3, 2, dtype=torch.bool)))
    with pytest.raises(HotExpertsError, match="rows"):
        recall(pred[:2], actual)


@pytest.mark.parametrize(("text", "extra"), [("cache:3slots:lru", 0), ("cache:3slots:lru", 2),
                                             ("cache:4slots:decay", 2), ("cache:6slots:auto", 2),
                                             ("0=cpu,1-3=slots3", 2)])
def test_prefetch_keeps_decode_exact_and_issues_fills(text, extra):
    ex = build_executor(Placement.parse(text), STORE, CFG, "cpu")
    ex.enable_prediction(NextLayerPredictor.from_model(MODEL, extra), cold_steps=0)
    toks, rows = run(ex)
    assert toks == REF_TOKS
    for a, b in zip(rows, REF_ROWS, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    st = ex.stats()
    pf = st["prefetch"]
    assert pf["predictions"] > 0 and pf["issued"] > 0                    # the check discriminates
    assert pf["useful"] + pf["late"] + pf["wasted"] <= pf["issued"]
    for l in ex.slots.layers:                                        # residency stays one truth
        assert set(ex.slots.resident(l)) == ex.slots.residency.resident[l]
    assert st["total"]["hits"] + st["total"]["misses"] == (len(PROMPT) + N_GEN) * K * len(CFG.moe_layers)


def test_prefetch_needs_a_planner():
    for text in ("cpu", "gpu"):
        ex = build_executor(Placement.parse(text), STORE, CFG, "cpu")
        if hasattr(ex, "enable_prediction"):
            with pytest.raises(HotExpertsError, match="slots"):
                ex.enable_prediction(NextLayerPredictor.from_model(MODEL))
    ex = build_executor(Placement.parse("cache:3slots"), STORE, CFG, "cpu")
    with pytest.raises(HotExpertsError, match="max_fills"):
        ex.enable_prediction(NextLayerPredictor.from_model(MODEL), max_fills=-1)


def test_stats_have_no_prefetch_entry_without_prediction():
    ex = build_executor(Placement.parse("cache:3slots"), STORE, CFG, "cpu")
    run(ex)
    assert ex.stats()["prefetch"] is None


# ---- the tiny presets: prefetch on decodes what prefetch off decodes, every slot read checked ----------
PRESETS = ("tiny-qwen3-moe", "tiny-qwen3.5-moe")
PRESET_PLACEMENTS = ("cache:6slots:lru", "cache:12slots:decay", "hot:3")


@functools.cache
def preset(name):
    return build_in_memory(name, dtype="float32", device="cpu")


def decode(lm, executor, n=10):
    """Prefill + greedy decode of the preset through `executor` -> (tokens, [V] logits rows)."""
    prompt = [3, 9, 4, 12, 7, 15, 5, 11, 6, 13, 8, 10]
    kv = lm.model.new_kv_cache(len(prompt) + n + 1)
    with torch.no_grad():
        rows = [lm.model(torch.tensor(prompt), torch.arange(len(prompt)), kv, executor)[-1]]
        executor.end_step()
        toks = []
        for i in range(n):
            toks.append(int(rows[-1].argmax()))
            rows.append(lm.model(torch.tensor([toks[-1]]), torch.tensor([len(prompt) + i]), kv, executor)[-1])
            executor.end_step()
    return toks, rows


class SlotReadCheck:
    """Wraps a hybrid executor's GPU kernel. At every read of the slots: the table read equals the host
    mirror the misses are split by, the occupancy is within the planner's capacity (hot:K, the budget) and
    the pool, and the result equals, bit for bit, the same kernel over the store's own experts with the
    mirror's hits (a slot overwritten while read, or holding another expert, gives other bits)."""

    def __init__(self, ex):
        self.ex, self.kernel, self.reads = ex, ex.cache.gpu_moe, 0
        ex.cache.gpu_moe = self

    def __call__(self, x, ids, weights, w13, w2, slot_of=None, out=None, **kw):
        y = self.kernel(x, ids, weights, w13, w2, slot_of, out=out, **kw)
        s = self.ex.slots
        layer = s.layers[(slot_of.data_ptr() - s.table.data_ptr()) // (s.table.stride(0) * 4)]
        assert torch.equal(slot_of, s.mirror(layer))
        hit = (s.mirror(layer)[ids.clamp(min=0)] >= 0) & (ids >= 0)
        own = s.store.layer(layer)
        assert torch.equal(y, self.kernel(x, ids.masked_fill(~hit, -1), weights, own.w13, own.w2, None, **kw))
        self.check_capacity()
        self.reads += 1
        return y

    def check_capacity(self):
        p, res = self.ex.planner, self.ex.slots.residency
        occ = res.occupied(p.layers)
        assert all(len(occ[l]) <= p.capacity[l] for l in p.layers)
        assert p.capacity.budget is None or res.total(p.layers) <= p.capacity.budget
        assert res.total() <= self.ex.slots.num_slots


class SlowEvent:
    """A fill or read event that completes only after two queries (a copy or a step still running)."""

    def __init__(self):
        self.left = 0

    def record(self, stream=None):
        self.left = 2

    def query(self):
        self.left = max(0, self.left - 1)
        return self.left == 0

    def synchronize(self):
        self.left = 0


def decode_checked(name, text, predict: bool, events=None):
    lm = preset(name)
    ex = build_executor(Placement.parse(text), lm.store, lm.cfg, "cpu", event_factory=events)
    check = SlotReadCheck(ex)
    if predict:
        ex.enable_prediction(NextLayerPredictor.from_model(lm.model, 2), cold_steps=0)
    toks, rows = decode(lm, ex)
    return toks, rows, ex.stats(), check.reads


@pytest.mark.parametrize("text", PRESET_PLACEMENTS)
@pytest.mark.parametrize("name", PRESETS)
def test_prefetch_on_decodes_what_prefetch_off_decodes(name, text):
    off_toks, off_rows, off, _ = decode_checked(name, text, False)
    toks, rows, on, reads = decode_checked(name, text, True)
    assert toks == off_toks
    for a, b in zip(rows, off_rows, strict=True):
        # other hits, so another order of the same fp32 sum: not bit for bit (see scripts/bench_prefetch.py)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    pf = on["prefetch"]
    assert reads > 0 and pf["issued"] > 0 and pf["useful"] > 0            # prefetches did serve hits
    assert on["total"]["hits"] + on["total"]["misses"] == off["total"]["hits"] + off["total"]["misses"]


@pytest.mark.parametrize("name", PRESETS)
def test_fills_and_reads_that_complete_late_keep_decode_exact(name):
    toks, rows, on, _ = decode_checked(name, "cache:12slots:lru", True, events=lambda kind: SlowEvent())
    ref_toks, ref_rows, _, _ = decode_checked(name, "cache:12slots:lru", False)
    assert toks == ref_toks
    for a, b in zip(rows, ref_rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    pf = on["prefetch"]
    assert pf["busy"] > 0 and pf["issued"] > 0          # requests met a busy link, others filled


def test_the_slot_read_check_catches_a_slot_holding_another_expert():
    lm = preset("tiny-qwen3-moe")
    ex = build_executor(Placement.parse("hot:3"), lm.store, lm.cfg, "cpu")
    SlotReadCheck(ex)
    layer = ex.slots.layers[0]
    e, slot = next((e, int(s)) for e, s in enumerate(ex.slots.mirror(layer).tolist()) if s >= 0)
    ex.slots.w13[slot].copy_(lm.store.layer(layer).w13[(e + 1) % lm.cfg.num_experts])
    with pytest.raises(AssertionError):
        decode(lm, ex, n=1)
