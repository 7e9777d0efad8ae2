"""HybridExecutor == DenseExecutor (greedy tokens identical, logits close, fp32) for every placement;
cache statistics consistent with the routing; prompt streaming path; profile round trip."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from hotexperts.config import KernelOptions, ModelConfig
from hotexperts.experts.build import build_executor
from hotexperts.experts.gpu_executor import GpuExecutor
from hotexperts.experts.placement import Placement
from hotexperts.experts.profile import profile_from_counts, save_profile
from hotexperts.experts.reference import DenseExecutor
from hotexperts.experts.store import ExpertStore
from hotexperts.weights import LayerExperts
from tests.tiny_model import random_experts, random_model

E, K = 8, 2
CFG = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, num_experts=E, top_k=K, moe_intermediate_size=32,
                  moe_layers=(0, 2), intermediate_size=24, qk_norm="head", eos_token_ids=())
PROMPT = [1, 5, 9, 2, 7, 3, 11, 4, 8, 6]
N_GEN = 8


def tiny(seed=0):
    return random_model(CFG, seed), ExpertStore(random_experts(CFG, seed))


MODEL, STORE = tiny()


def run(executor, prompt=PROMPT, n=N_GEN, chunk=None, after_prefill=None):
    """Prefill (in chunks) + greedy decode; end_step after every forward. -> (tokens, [logits rows])."""
    kv = MODEL.new_kv_cache(len(prompt) + n + 1)
    dev = next(MODEL.parameters()).device
    chunk = chunk or len(prompt)
    with torch.no_grad():
        for s in range(0, len(prompt), chunk):
            part = prompt[s:s + chunk]
            pos = torch.arange(s, s + len(part), device=dev)
            logits = MODEL(torch.tensor(part, device=dev), pos, kv, executor)
            executor.end_step()
        if after_prefill is not None:
            after_prefill()
        rows, toks = [logits[-1]], []
        for i in range(n):
            toks.append(int(rows[-1].argmax()))
            pos = len(prompt) + i
            tok = torch.tensor([toks[-1]], device=dev)
            logits = MODEL(tok, torch.tensor([pos], device=dev), kv, executor)
            executor.end_step()
            rows.append(logits[-1])
    return toks, rows


REF_TOKS, REF_ROWS = run(DenseExecutor({l: STORE.layer(l) for l in STORE.layers}))


def routed_counter(ex):
    seen = {"n": 0}

    def on_route(layer, ids, weights):
        seen["n"] += ids.numel()

    ex.on_route = on_route
    return seen


def check_same(ex, ref_toks=REF_TOKS, ref_rows=REF_ROWS, **kw):
    seen = routed_counter(ex)
    toks, rows = run(ex, **kw)
    assert toks == ref_toks
    for a, b in zip(rows, ref_rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    st = ex.stats()
    if st is not None:
        tot = st["total"]
        assert tot["hits"] + tot["misses"] == seen["n"]              # every routed selection counted once
    return ex


@pytest.mark.parametrize("text", ["cpu", "layers:1", "hot:0", "hot:3", f"hot:{E}",
                                  "cache:0slots", "cache:5slots:lru", "cache:5slots:window-lfu",
                                  "cache:5slots:decay", "cache:6slots:auto", f"cache:{2 * E}slots"])
def test_placement_matches_reference(text):
    p = Placement.parse(text, rebalance_interval=1 if "lfu" in text or "hot:3" in text else None, window=8)
    ex = check_same(build_executor(p, STORE, CFG, "cpu"))
    if ex.slots is not None and ex.planner is not None:                   # mirror == controller view
        for l in ex.slots.layers:
            assert set(ex.slots.resident(l)) == ex.slots.residency.resident[l]


def test_gpu_placement_executors():
    ex = build_executor(Placement.parse("gpu"), STORE, CFG, "cpu")
    assert isinstance(ex, DenseExecutor) and not ex.graph_safe          # on CUDA: GpuExecutor, graph-safe
    check_same(ex)
    check_same(GpuExecutor(STORE, "cpu"))                                # the CUDA executor, run on the CPU


def test_hit_rates_for_extremes_and_swaps_happen():
    full = check_same(build_executor(Placement.parse("layers:0"), STORE, CFG, "cpu"))
    none = check_same(build_executor(Placement.parse("cpu"), STORE, CFG, "cpu"))
    layers = check_same(build_executor(Placement.parse("layers:1"), STORE, CFG, "cpu"))
    assert none.stats()["total"]["hits"] == 0
    lay = layers.stats()["layers"]
    assert lay[0]["hits"] == 0 and lay[2]["misses"] == 0            # layer 0 on the CPU, layer 2 on the GPU
    lru = check_same(build_executor(Placement.parse("cache:4slots:lru"), STORE, CFG, "cpu"))
    t = lru.stats()["total"]
    assert t["swaps"] > 0 and t["hits"] > 0 and t["misses"] > 0
    assert t["bytes_moved"] == t["swaps"] * STORE.expert_nbytes
    assert full.stats()["total"]["misses"] == 0 and full.planner is None


def test_prompt_stream_path_and_bypass_keeps_decode_set():
    p = Placement.parse("cache:6slots:lru", pp_bypass=4, prompt_mode="stream")
    for chunk in (None, 5):                                          # one prompt chunk, or two of 5 > 4
        ex = build_executor(p, STORE, CFG, "cpu")
        acquired = []
        real = ex.stream.stage.acquire
        ex.stream.stage.acquire = lambda layer, *rest, a=acquired, r=real: a.append(layer) or r(layer, *rest)
        check_same(ex, chunk=chunk)
        assert acquired == [0, 2] * (1 if chunk is None else 2)      # every prompt layer streamed
        # prompt routing never reached the policy (LRU's last-access steps are all decode steps)
        n_prompt_steps = 1 if chunk is None else 2
        last = ex.planner.policy.last                               # [Lm, E] step, -inf = never
        assert ((last >= 0) & (last < n_prompt_steps)).sum() == 0
        assert np.floor(ex.planner.policy.last.max()) == n_prompt_steps + N_GEN - 1   # step + rank bonus


def test_prompt_stream_copies_only_the_experts_without_a_slot():
    """A streamed prompt chunk computes resident experts from their slots and stages only the others."""
    p = Placement.parse(f"hot:{E // 2}", pp_bypass=4, prompt_mode="stream")
    ex = build_executor(p, STORE, CFG, "cpu")
    check_same(ex)                                                    # from load-time placeholders
    staged = []
    real = ex.stream.stage.acquire
    ex.stream.stage.acquire = lambda layer, missing=None, index=0, r=real: (staged.append(missing)
                                                                          or r(layer, missing, index))
    toks, rows = run(ex)                                              # now warm: the same tokens
    assert toks == REF_TOKS
    for a, b in zip(rows, REF_ROWS, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert staged
    for missing in staged:
        assert missing is not None and len(missing) < E               # some experts came from the slots
    for layer, missing in zip(STORE.layers, staged, strict=False):
        assert set(missing).isdisjoint(ex.slots.resident(layer))


@pytest.mark.parametrize("text, slots, per_pool", [("cpu", 0, 3), ("cpu", 0, 1), (f"hot:{E // 4}", 4, 3),
                                                    ("cache:5slots:lru", 5, 2)])
def test_prompt_stream_through_pools_of_a_part_of_a_layer(text, slots, per_pool):
    """A budget too tight for two whole-layer pools: two pools of `per_pool` experts; a layer's missing
    experts stream in parts (one pass each, summed) and the tokens stay the reference's."""
    SB = STORE.expert_nbytes
    total = (slots + 2 * per_pool) * SB                       # slots first, the pools get exactly the rest
    p = Placement.parse(text, pp_bypass=4, prompt_mode="stream", vram_budget=total)
    ex = build_executor(p, STORE, CFG, "cpu")
    assert (ex.plan.staging.pools, ex.plan.staging.experts) == (2, per_pool)
    assert ex.stream.stage.capacity == per_pool and ex.plan.vram["staging"] == 2 * per_pool * SB
    parts = []
    real = ex.stream.stage.acquire
    ex.stream.stage.acquire = lambda layer, part=None, index=0, r=real: (parts.append((layer, index, part))
                                                                         or r(layer, part, index))
    check_same(ex)
    most = -(-E // per_pool)                                  # ceil(E / pool) parts: a layer with no slot
    for layer in STORE.layers:                                # (one streamed prompt chunk per run)
        got = [part for l, _, part in parts if l == layer]
        assert got and all(len(part) <= per_pool for part in got)
        assert len(got) == most if text == "cpu" else len(got) <= most
        assert sorted(e for part in got for e in part) == sorted(set(e for part in got for e in part))


@pytest.mark.parametrize("text", [f"hot:{E // 2}", "cache:6slots:lru", "cache:6slots:auto"])
def test_a_cache_is_full_from_load_and_its_first_prompt_replaces_unrouted_placeholders(text):
    ex = build_executor(Placement.parse(text, pp_bypass=4, prompt_mode="stream"), STORE, CFG, "cpu")
    n = ex.slots.num_slots
    assert sum(ex.slots.resident_count(l) for l in STORE.layers) == n          # no idle slot at load
    assert ex.stats()["total"]["swaps"] == n                                  # the load's copies, counted
    ctl = ex.planner
    placeholders = {l: {e for e in range(E) if ctl.is_placeholder(l, e)} for l in STORE.layers}
    assert all(placeholders[l] == set(ex.slots.resident(l)) for l in STORE.layers)
    routed = {l: set() for l in STORE.layers}
    ex.on_route = lambda layer, ids, w: routed[layer].update(ids[ids >= 0].tolist())
    toks, _ = run(ex, n=0)                                                    # the prompt only
    for l in STORE.layers:
        res = set(ex.slots.resident(l))
        kept = res & placeholders[l]
        assert kept <= routed[l] or len(res & routed[l]) == len(routed[l])    # unrouted ones only if room
        assert res & routed[l]                                                # the prompt's experts moved in
    assert sum(ex.slots.resident_count(l) for l in STORE.layers) == n          # still full, never over
    toks, rows = run(ex)                                                      # and the tokens stay exact
    assert toks == REF_TOKS


def test_static_profile_and_warm_start(tmp_path):
    counts = {0: [9, 0, 5, 0, 0, 7, 0, 0], 2: [0, 8, 0, 0, 6, 0, 0, 1]}
    path = save_profile(tmp_path / "p.json", profile_from_counts(counts, capacity=2))
    ex = build_executor(Placement.parse(f"static:{path}"), STORE, CFG, "cpu")
    assert ex.slots.num_slots == 4
    assert sorted(ex.slots.resident(0)) == [0, 5] and sorted(ex.slots.resident(2)) == [1, 4]
    check_same(ex)
    warm = build_executor(Placement.parse("hot:2", profile=str(path)), STORE, CFG, "cpu")
    assert sorted(warm.slots.resident(0)) == [0, 5]
    check_same(warm)
    out = warm.export_profile(str(tmp_path / "out.json"))
    again = build_executor(Placement.parse(f"static:{out}"), STORE, CFG, "cpu")
    assert again.slots.hot_set() == warm.slots.hot_set()                   # the exported hot set, loaded
    check_same(again)


@pytest.fixture
def exact_cpu_kernel():
    """The CPU kernel's exact fp32-activation path: the dequantized oracle computes with exact activations
    (the default int8-activation path is checked against its own reference in tests/kernels)."""
    return KernelOptions(act_quant=False)


def test_expert_quant_on_a_mixed_store_quantizes_only_its_dense_matrices(exact_cpu_kernel):
    """A Q4_K_M-like store (w13 int4g32, w2 dense): --expert-quant int8 turns w2 into int8 and keeps w13;
    the tokens are those of that mixed store run by the reference."""
    from hotexperts.experts.build import quantized_store
    from hotexperts.quant import quantize_int4g32

    mixed = ExpertStore({l: LayerExperts(quantize_int4g32(STORE.layer(l).w13), STORE.layer(l).w2)
                         for l in STORE.layers})
    with pytest.warns(RuntimeWarning, match=r"only the dense expert matrices \(w2\) become int8"):
        q = quantized_store(mixed, "int8")
    le = q.layer(STORE.layers[0])
    assert le.w13 is mixed.layer(STORE.layers[0]).w13 and le.w2.fmt == "int8"
    ref_toks, _ = run(DenseExecutor({l: q.layer(l) for l in q.layers}))
    with pytest.warns(RuntimeWarning):
        ex = build_executor(Placement.parse("cache:5slots:lru", expert_quant="int8"), mixed, CFG, "cpu",
                            options=exact_cpu_kernel)
    assert run(ex)[0] == ref_toks
    from hotexperts.errors import PlacementError

    assert quantized_store(q, "int8") is q               # a second call (bench: load, then placement)
    with pytest.raises(PlacementError, match="already int4g32"):
        quantized_store(ExpertStore({l: LayerExperts(le.w13, le.w13) for l in q.layers}), "int8")
    with pytest.raises(PlacementError, match="q4_k: q4_k needs .* multiple of 256.*int8 \\(per row\\)"):
        quantized_store(STORE, "q4_k")                   # hidden 32: no 256-blocks


@pytest.mark.parametrize("quant, fmt", [("int8", "int8"), ("int4", "int4g32"), ("int8g", "int8g32")])
def test_quantized_experts_match_the_quantized_reference(quant, fmt, exact_cpu_kernel):
    q = STORE.quantize(fmt)
    ref_toks, ref_rows = run(DenseExecutor({l: q.layer(l) for l in q.layers}))
    ex = build_executor(Placement.parse("cache:5slots:lru", expert_quant=quant), STORE, CFG, "cpu",
                        options=exact_cpu_kernel)
    toks, rows = run(ex)
    assert toks == ref_toks
    for a, b in zip(rows, ref_rows, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("text", ["cpu", "layers:1", "cache:5slots:lru", "hot:3"])
def test_q4_k_m_like_store_int4g32_gate_up_and_int8g16_down(text, exact_cpu_kernel):
    """A Q4_K_M GGUF's formats (w13 int4g32; w2 int8g16 with zero, Q4_K layers converted exactly): every
    placement gives the reference's tokens for that store."""
    from hotexperts.quant import int8g_from_int4g32, quantize_int4g32

    q = ExpertStore({l: LayerExperts(quantize_int4g32(STORE.layer(l).w13),
                                     int8g_from_int4g32(quantize_int4g32(STORE.layer(l).w2), 16))
                     for l in STORE.layers})
    ref_toks, _ = run(DenseExecutor({l: q.layer(l) for l in q.layers}))
    assert run(build_executor(Placement.parse(text), q, CFG, "cpu", options=exact_cpu_kernel))[0] == ref_toks


def test_stats_table_and_heatmap(tmp_path):
    ex = check_same(build_executor(Placement.parse("cache:5slots:lru"), STORE, CFG, "cpu"))
    table = ex.cache_stats.table()
    assert "hit%" in table and table.splitlines()[-1].split()[0] == "all"
    png = ex.cache_stats.heatmap(str(tmp_path / "h.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"


@pytest.mark.parametrize("text", ["cache:5slots:lru", "cache:6slots:auto", "hot:3"])
def test_replaying_the_recorded_trace_reproduces_live_hits(text):
    from hotexperts.trace.record import RouteRecorder
    from hotexperts.trace.simulate import simulate

    p = Placement.parse(text, rebalance_interval=2)
    ex = build_executor(p, STORE, CFG, "cpu")
    rec = RouteRecorder(CFG.moe_layers, K)
    rec.begin_request()
    ex.on_route = rec
    run(ex, after_prefill=lambda: rec.mark_prompt(False))
    trace = rec.to_trace({"model": "tiny", "num_experts": E, "top_k": K, "moe_layers": list(CFG.moe_layers)})
    ctl = ex.planner
    kw = {"slots": p.hot_k} if p.mode == "hot" else {"budget": ex.slots.num_slots}
    sim = simulate(trace, ctl.policy.__class__(**ctl.policy.params()), prompt_bypass=p.pp_bypass,
                   max_swaps_per_step=p.max_swaps_per_step, **kw)
    live = [[ctl.stats[l].hits, ctl.stats[l].misses, ctl.stats[l].prompt_hits, ctl.stats[l].prompt_misses]
            for l in CFG.moe_layers]
    assert [list(map(int, c)) for c in sim.layer_counts] == live
    assert sim.swaps == sum(ctl.stats[l].loads for l in CFG.moe_layers)


@contextmanager
def on_cuda():
    """MODEL on the GPU for the block (moved back after it): yields (a fresh store of STORE's experts, the
    DenseExecutor reference run on CUDA)."""
    global MODEL
    model_cpu = MODEL
    MODEL = MODEL.cuda()
    try:
        store = ExpertStore({l: STORE.layer(l) for l in STORE.layers})
        yield store, run(DenseExecutor({l: store.layer(l) for l in store.layers}, "cuda"))
    finally:
        MODEL = model_cpu.cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("text, prompt_mode", [("gpu", "auto"), ("cpu", "auto"), ("cpu", "stream"),
                                               ("layers:1", "auto"), ("hot:3", "stream"),
                                               ("cache:5slots:lru", "auto"), ("cache:6slots:auto", "hybrid")])
def test_cuda_placement_matches_reference(text, prompt_mode):
    with on_cuda() as (store, ref):
        ex = build_executor(Placement.parse(text, pp_bypass=4, prompt_mode=prompt_mode, decode="sync"), store,
                            CFG, "cuda")
        assert ex.graph_safe == (text == "gpu")
        check_same(ex, ref[0], ref[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("copy", ["memcpy", "gather"])
@pytest.mark.parametrize("text", ["hot:3", "cache:5slots:lru", "cpu"])
def test_cuda_streamed_prompt_copies_match_reference(text, copy):
    """Staged experts copied run by run or gathered by the GPU in one launch per part: the same tokens."""
    with on_cuda() as (store, ref):
        ex = build_executor(Placement.parse(text, pp_bypass=4, prompt_mode="stream", decode="sync"), store,
                            CFG, "cuda", options=KernelOptions(stage_copy=copy))
        check_same(ex, ref[0], ref[1])


def test_missing_cells_are_neither_hits_nor_misses():
    """-1 ids (missing cells of a replayed trace) must not read the last expert's slot as a hit."""
    ex = build_executor(Placement.parse("cache:20slots:lru"), STORE, CFG, "cpu")
    layer, K = STORE.layers[0], CFG.top_k
    x = torch.randn(1, CFG.hidden_size)
    last = torch.full((1, K), E - 1)
    for _ in range(3):                                   # expert E-1 becomes resident
        ex(layer, x, last, torch.full((1, K), 1.0 / K))
        ex.end_step()
    assert E - 1 in ex.slots.residency.resident[layer]
    before = ex.stats()["total"]
    y = ex(layer, x, torch.full((1, K), -1), torch.full((1, K), 1.0 / K))
    after = ex.stats()["total"]
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"]
    assert torch.count_nonzero(y) == 0


@pytest.mark.parametrize("decode", ["sync", "worker"])
@pytest.mark.parametrize("text", ["cpu", "layers:1", "cache:0slots", "hot:0"])
def test_a_layer_whose_cells_are_all_missing_returns_zeros(text, decode):
    """A replayed trace row without any expert for a layer (every id -1) on a layer with no slots: the MoE
    part is 0, not None (seen: `hotexperts bench --route-trace qwen.route.csv` on a CPU box crashed)."""
    ex = build_executor(Placement.parse(text, decode=decode), STORE, CFG, "cpu")
    x = torch.randn(3, CFG.hidden_size)
    for T in (1, 3):
        y = ex(STORE.layers[0], x[:T], torch.full((T, K), -1), torch.full((T, K), 1.0 / K))
        assert y is not None and torch.equal(y, torch.zeros_like(x[:T]))
        ex.end_step()
    ex.close()
