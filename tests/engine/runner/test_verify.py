"""The T-token verify step (engine/runner/verify.py): the logits of T single decode steps, through the decode
path (whole static cache, decode bias, recurrent delta rule), for every architecture kind incl. hybrid ones;
size checks; the expert-union counter; a CUDA graph per T bucket (GPU)."""

from __future__ import annotations

import pytest
import torch

from hotexperts.engine.engine import Engine
from hotexperts.engine.runner.verify import (
    MAX_VERIFY_T,
    EagerVerifyStep,
    ExpertUnion,
    GraphVerifyStep,
    make_verify_step,
)
from hotexperts.errors import HotExpertsError
from hotexperts.experts.placement import Placement
from hotexperts.models.cache import recurrent_buffers

pytestmark = pytest.mark.usefixtures("one_thread")          # tests/conftest.py
PROMPT = [5, 17, 300, 2, 77, 900, 41, 8]
DRAFT = [11, 400, 23, 9, 70, 5, 61]
PRESETS = ["tiny-qwen3-moe", "tiny-mixtral", "tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-gpt-oss"]


def engine(preset: str, placement: str = "gpu", device: str = "cpu", **kw) -> Engine:
    return Engine.load(f"preset:{preset}", dtype="float32", device=device,
                       placement=Placement.parse(placement, **kw), max_context=64)


def single_steps(eng: Engine, tokens: list[int], pos: int) -> torch.Tensor:
    return torch.stack([eng.decode_one(t, pos + i).float().clone() for i, t in enumerate(tokens)])   # [T, V]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("T", [2, 5, 8])
def test_verify_matches_single_steps(preset, T):
    eng = engine(preset)
    tokens = DRAFT[:T]
    eng.prefill(PROMPT)
    ref = single_steps(eng, tokens, len(PROMPT))
    state_ref = [b.clone() for b in recurrent_buffers(eng.generator.kv)]
    eng.prefill(PROMPT)
    got = eng.verify(tokens, len(PROMPT))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)     # GEMM row blocking only (fp32)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    for buf, want in zip(recurrent_buffers(eng.generator.kv), state_ref, strict=True):
        torch.testing.assert_close(buf, want, atol=1e-5, rtol=1e-5)   # the state after the same T tokens


def test_hybrid_models_have_recurrent_buffers_and_plain_ones_none():
    assert recurrent_buffers(engine("tiny-qwen3-moe").generator.kv) == []
    assert len(recurrent_buffers(engine("tiny-qwen3.5-moe").generator.kv)) == 2


@pytest.mark.parametrize("placement", ["cpu", "cache:4"])
def test_verify_through_hybrid_placements(placement):
    eng = engine("tiny-qwen3-moe", placement)
    try:
        eng.prefill(PROMPT)
        ref = single_steps(eng, DRAFT[:4], len(PROMPT))
        eng.prefill(PROMPT)
        torch.testing.assert_close(eng.verify(DRAFT[:4], len(PROMPT)), ref, atol=2e-5, rtol=2e-5)
    finally:
        eng.close()


WORKER_PLACEMENTS = ["cpu", "hot:4", "cache:10slots:lru", "cache:24slots"]


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen3.5-moe"])
@pytest.mark.parametrize("placement", WORKER_PLACEMENTS)
def test_verify_through_the_native_worker_equals_single_steps(preset, placement):
    """Hybrid placements with the native CPU worker: the verify step's misses go through the mailbox (the
    graph-safe path) and give T single steps' logits and greedy tokens."""
    eng = engine(preset, placement, decode="worker")
    try:
        assert eng.executor.worker is not None
        for T in (2, 7):
            eng.prefill(PROMPT)
            ref = single_steps(eng, DRAFT[:T], len(PROMPT))
            eng.prefill(PROMPT)
            got = eng.verify(DRAFT[:T], len(PROMPT))
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
            assert (got.argmax(-1) == ref.argmax(-1)).all()
        st = eng.stats()["cache"]
        assert st["decode"] == "worker" and st["total"]["misses"] > 0
    finally:
        eng.close()


def test_bad_sizes_are_refused():
    eng = engine("tiny-qwen3-moe")
    eng.prefill(PROMPT)
    with pytest.raises(HotExpertsError, match="2..16 tokens"):
        eng.verify([1], 8)
    with pytest.raises(HotExpertsError, match="2..16 tokens"):
        eng.verify(list(range(MAX_VERIFY_T + 1)), 8)
    with pytest.raises(HotExpertsError, match="does not fit"):
        eng.verify([1, 2, 3], 62)


def test_expert_union_counts_distinct_experts():
    union = ExpertUnion(num_experts=6, device=torch.device("cpu"))
    union.count(torch.tensor([[0, 3], [3, 5], [-1, 0]]))             # {0, 3, 5}
    union.count(torch.tensor([[1, 1], [-1, -1]]))                    # {1}
    union.calls = 2
    assert int(union.total) == 4 and union.per_layer() == 2.0
    with union.paused():
        union.count(torch.tensor([[2, 4]]))
        union.calls += 1
    assert int(union.total) == 4 and union.calls == 2


def test_verify_step_counts_the_union_of_its_tokens():
    eng = engine("tiny-qwen3-moe")
    routed = []
    eng.executor.on_route = lambda layer, ids, w: routed.append(set(ids.flatten().tolist()))
    eng.prefill(PROMPT)
    routed.clear()
    eng.verify(DRAFT[:4], len(PROMPT))
    union = eng.generator.verify_step.union
    assert union.calls == len(eng.config.moe_layers) == len(routed)
    assert int(union.total) == sum(len(r) for r in routed)
    assert union.cells == union.calls * 4 * eng.config.top_k


def test_cpu_gets_the_eager_step():
    eng = engine("tiny-qwen3-moe")
    assert type(make_verify_step(eng.model, eng.generator.kv, eng.executor, "cpu")) is EagerVerifyStep


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen3.5-moe"])
def test_graph_per_bucket_matches_eager(preset):
    """The all-GPU placement (GpuExecutor + Triton) captures one graph per T and replays the eager logits;
    the capture's warm-up forwards leave a linear layer's state as it was."""
    eng = Engine.load(f"preset:{preset}", dtype="float32", device="cuda", max_context=64)
    step = eng.generator.verify_step = make_verify_step(eng.model, eng.generator.kv, eng.executor, "cuda")
    assert isinstance(step, GraphVerifyStep)
    for T in (2, 4, 2):
        eng.prefill(PROMPT)
        ref = single_steps(eng, DRAFT[:T], len(PROMPT))
        eng.prefill(PROMPT)
        got = eng.verify(DRAFT[:T], len(PROMPT)).float()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert step.graphed_sizes == {2, 4}
    assert eng.stats()["verify_graphs"] == [2, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen3.5-moe"])
@pytest.mark.parametrize("placement", ["cache:10slots:lru", "cpu", "hot:4"])
def test_graphed_verify_through_the_worker_matches_eager(preset, placement):
    """Hybrid placements on CUDA: the native worker runs, verify steps are sync-free, one graph per T bucket
    whose replay gives the eager verify step's logits and T single steps' greedy tokens; every routed cell
    is accounted once (the graphed steps' routing comes from the mailbox)."""
    eng = Engine.load(f"preset:{preset}", dtype="float32", device="cuda", max_context=64,
                      placement=Placement.parse(placement))
    try:
        ex = eng.executor
        assert ex.worker is not None and ex.verify_graph_safe
        graphed = make_verify_step(eng.model, eng.generator.kv, ex, "cuda")
        eager = EagerVerifyStep(eng.model, eng.generator.kv, ex, "cuda")
        assert isinstance(graphed, GraphVerifyStep)
        for T in (2, 7, 2, 7):
            eng.prefill(PROMPT)
            ref = single_steps(eng, DRAFT[:T], len(PROMPT))
            eng.prefill(PROMPT)
            eng.generator.verify_step = eager
            want = eng.verify(DRAFT[:T], len(PROMPT)).float().clone()
            eng.prefill(PROMPT)
            eng.generator.verify_step = graphed
            got = eng.verify(DRAFT[:T], len(PROMPT)).float().clone()
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            assert (got.argmax(-1) == ref.argmax(-1)).all()
        assert graphed.graphed_sizes == {2, 7} and not graphed.failed
        cells = eng.config.top_k * len(eng.config.moe_layers)
        st = eng.stats()["cache"]["total"]
        verify_tokens, single_tokens = 2 * (2 + 7) * 2, 2 * (2 + 7)
        assert st["hits"] + st["misses"] == (4 * 3 * len(PROMPT) + verify_tokens + single_tokens) * cells
    finally:
        eng.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen3.5-moe"])
def test_graphed_speculative_decoding_through_the_cache_is_plain_greedy(preset):
    """The cache placement with graphed verify steps (the worker's mailbox) drafts and verifies to plain
    greedy output; a scripted drafter (right, partly wrong and wrong drafts of the plain output) makes the
    verify steps happen whatever the random model writes, and rejections roll a linear layer's state back."""
    from hotexperts.engine.sampling import SamplingParams
    from hotexperts.engine.speculative import SpecConfig
    from tests.engine.test_speculative import ScriptedDrafter

    params, prompt = SamplingParams(max_tokens=40), [5, 17, 300, 2, 77, 900, 41, 8, 5, 17, 300, 2, 77]
    kw = dict(dtype="float32", device="cuda", max_context=96, placement=Placement.parse("cache:10slots:lru"))
    plain = Engine.load(f"preset:{preset}", **kw)
    ref = list(plain.generate(prompt, params))
    plain.close()
    eng = Engine.load(f"preset:{preset}", **kw, speculative=SpecConfig("ngram", draft_max=6, auto_off=False))
    try:
        gen = eng.generator
        gen.new_drafter = lambda p: ScriptedDrafter(p, ref, eng.config.vocab_size)
        assert isinstance(gen.verify_step, GraphVerifyStep)
        assert list(eng.generate(prompt, params)) == ref
        spec = eng.stats()["speculative"]["last"]
        assert gen.verify_step.graphed_sizes and 0 < spec["accepted"] < spec["drafted"]
    finally:
        eng.close()
