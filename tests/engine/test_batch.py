"""BatchDecoder (engine/batch.py): B requests decoded together give each one's tokens decoded alone, over the
tiny architectures (incl. hybrid linear attention, GPT-OSS sinks + sliding windows) and placements CPU tests
run; requests of different prompt lengths joining and leaving mid-run; per-request sampling, stops and
max_tokens; slots freed on finish and release; bad settings refused."""

from __future__ import annotations

import pytest
import torch

from hotexperts.engine.batch import BatchDecoder
from hotexperts.engine.engine import Engine
from hotexperts.engine.sampling import SamplingParams
from hotexperts.errors import ContextLengthError, HotExpertsError
from hotexperts.experts.placement import Placement

CONTEXT = 64
PROMPTS = [[5, 17, 300, 2, 77, 900, 41], [9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [42, 43]]
MAX_TOKENS = [14, 6, 10, 12]          # different lengths: requests leave at different steps
JOIN_AT = [0, 0, 3, 5]                # decode steps run before each request is admitted


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(preset, placement="gpu", parallel=1):
    return Engine.load(f"preset:{preset}", dtype="float32", device="cpu",
                       placement=Placement.parse(placement), max_context=CONTEXT, parallel=parallel)


def alone(eng, params):
    return [list(eng.generate(p, SamplingParams(**(params | {"max_tokens": m}))))
            for p, m in zip(PROMPTS, MAX_TOKENS, strict=True)]


def together(batch: BatchDecoder, params, stop_ids=()):
    """Admit request i after JOIN_AT[i] steps (when a slot is free), step until all finished."""
    seqs, step = [None] * len(PROMPTS), 0
    while any(s is None for s in seqs) or batch.running:
        for i, p in enumerate(PROMPTS):
            if seqs[i] is None and JOIN_AT[i] <= step and batch.free_slots:
                seqs[i] = batch.add(p, SamplingParams(**(params | {"max_tokens": MAX_TOKENS[i]})), stop_ids)
        batch.step()
        step += 1
    return seqs


@pytest.mark.parametrize("preset,placement", [
    ("tiny-qwen3-moe", "gpu"), ("tiny-qwen3-moe", "cache:6"), ("tiny-qwen3-moe", "0-1=cpu,2-3=gpu"),
    ("tiny-mixtral", "gpu"), ("tiny-olmoe", "hot:4"), ("tiny-gpt-oss", "gpu"), ("tiny-glm4-moe", "cpu"),
    ("tiny-qwen3.5-moe", "gpu"), ("tiny-qwen3.5-moe", "cache:6"), ("tiny-qwen3-next", "gpu"),
])
def test_batched_greedy_equals_each_alone(preset, placement):
    ref = load(preset, placement)
    try:
        expected = alone(ref, {})
    finally:
        ref.close()
    eng = load(preset, placement, parallel=4)
    try:
        seqs = together(eng.batch, {})
        assert [s.tokens for s in seqs] == expected
        assert [s.finish_reason for s in seqs] == ["length"] * 4
        assert eng.batch.timings.rows > eng.batch.timings.steps        # rows really shared steps
        assert sorted(eng.batch.free_slots) == [0, 1, 2, 3] and not eng.batch.running
    finally:
        eng.close()


def test_fewer_slots_than_requests_queue_and_reuse_freed_slots():
    ref = load("tiny-qwen3-moe")
    expected = alone(ref, {})
    ref.close()
    eng = load("tiny-qwen3-moe", parallel=2)
    seqs = together(eng.batch, {})                # requests 2 and 3 wait for a slot another one freed
    assert [s.tokens for s in seqs] == expected
    assert {s.slot for s in seqs} == {0, 1}
    eng.close()


def test_each_row_samples_with_its_own_parameters():
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=7),
              SamplingParams(max_tokens=10),
              SamplingParams(max_tokens=10, temperature=1.2, top_p=0.8, seed=3, repetition_penalty=1.3)]
    ref = load("tiny-qwen3-moe")
    expected = [list(ref.generate(p, sp)) for p, sp in zip(PROMPTS, params, strict=False)]
    ref.close()
    eng = load("tiny-qwen3-moe", parallel=3)
    seqs = [eng.batch.add(p, sp) for p, sp in zip(PROMPTS, params, strict=False)]
    while eng.batch.running:
        eng.batch.step()
    assert [s.tokens for s in seqs] == expected
    eng.close()


def test_stop_ids_end_one_row_and_are_not_handed_out():
    ref = load("tiny-qwen3-moe")
    tokens = list(ref.generate(PROMPTS[0], SamplingParams(max_tokens=12)))
    ref.close()
    stop = tokens[4]
    eng = load("tiny-qwen3-moe", parallel=2)
    a = eng.batch.add(PROMPTS[0], SamplingParams(max_tokens=12, stop_token_ids=(stop,)))
    b = eng.batch.add(PROMPTS[1], SamplingParams(max_tokens=12))
    handed_out = {id(a): [a.token], id(b): [b.token]}
    while eng.batch.running:
        for seq in eng.batch.step():
            handed_out[id(seq)].append(seq.token)
    assert a.tokens == tokens[:tokens.index(stop)] and a.finish_reason == "stop"
    assert handed_out[id(a)] == a.tokens + [None]              # the stop id itself is not handed out
    assert len(b.tokens) == 12 and b.finish_reason == "length"
    assert handed_out[id(b)] == b.tokens                       # the last token is handed out too
    eng.close()


def test_release_frees_the_slot_mid_run():
    eng = load("tiny-qwen3-moe", parallel=2)
    batch = eng.batch
    a = batch.add(PROMPTS[0], SamplingParams(max_tokens=20))
    batch.add(PROMPTS[1], SamplingParams(max_tokens=20))
    batch.step()
    with pytest.raises(HotExpertsError, match="slots are busy"):
        batch.add(PROMPTS[2], SamplingParams(max_tokens=4))
    batch.release(a)
    assert a.finish_reason == "cancelled" and a.token is None and a not in batch.running
    c = batch.add(PROMPTS[2], SamplingParams(max_tokens=4))
    assert c.slot == a.slot
    batch.release(a)                               # idempotent
    eng.close()


def test_engine_generate_in_slot_zero_matches_the_one_request_engine():
    ref = load("tiny-qwen3.5-moe")
    expected = list(ref.generate(PROMPTS[0], SamplingParams(max_tokens=8)))
    ref.close()
    eng = load("tiny-qwen3.5-moe", parallel=3)
    assert list(eng.generate(PROMPTS[0], SamplingParams(max_tokens=8))) == expected
    assert eng.stats()["batch"]["slots"] == 3
    eng.close()


def test_bad_input_is_refused_clearly():
    eng = load("tiny-qwen3-moe", parallel=2)
    with pytest.raises(ContextLengthError, match="per slot"):
        eng.batch.add(PROMPTS[0], SamplingParams(max_tokens=CONTEXT))
    with pytest.raises(HotExpertsError, match="empty"):
        eng.batch.add([], SamplingParams(max_tokens=4))
    assert sorted(eng.batch.free_slots) == [0, 1]
    eng.close()
    for bad in (0, 17):
        with pytest.raises(HotExpertsError, match="parallel"):
            load("tiny-qwen3-moe", parallel=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset,placement", [("tiny-qwen3-moe", "gpu"), ("tiny-qwen3-moe", "cache:6"),
                                              ("tiny-qwen3.5-moe", "cache:6")])
def test_batched_greedy_equals_the_graphed_one_request_path_on_cuda(preset, placement):
    """On the GPU the one-request reference runs its CUDA graph (and the hybrid cache its worker decode);
    the batched steps run eagerly through the T-token paths: the same greedy tokens."""
    def engine(parallel):
        return Engine.load(f"preset:{preset}", dtype="float32", device="cuda",
                           placement=Placement.parse(placement), max_context=CONTEXT, parallel=parallel)
    ref = engine(1)
    expected = alone(ref, {})
    ref.close()
    eng = engine(4)
    try:
        assert [s.tokens for s in together(eng.batch, {})] == expected
    finally:
        eng.close()
