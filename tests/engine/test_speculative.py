"""Speculative decoding (engine/speculative.py, Generator's loop): greedy output identical to plain decoding
over placements and architectures (incl. hybrid linear-attention ones, whose state is rolled back), stop
conditions inside a verify step, penalties and logprobs, the acceptance rule's distribution, the n-gram
drafter, the off-switch, settings validation and the statistics."""

from __future__ import annotations

import pytest
import torch

from hotexperts.engine.engine import Engine
from hotexperts.engine.sampling import Sampler, SamplingParams, accept_draft, filtered_probs
from hotexperts.engine.speculative import AutoSwitch, NgramDrafter, SpecConfig, SpecStats
from hotexperts.errors import HotExpertsError
from hotexperts.experts.placement import Placement

PROMPT = [5, 17, 300, 2, 77, 900, 41, 8, 123, 64]
N = 24
pytestmark = pytest.mark.usefixtures("one_thread")          # tests/conftest.py


class ScriptedDrafter:
    """Drafts the known plain output, wrong on purpose in a repeating pattern: all right, wrong at 2nd,
    wrong at 1st, all right but short: so verify steps accept all, some and none of their drafts."""

    def __init__(self, prompt, reference, vocab):
        self.tokens, self.P, self.ref, self.V, self.n = list(prompt), len(prompt), reference, vocab, 0

    def append(self, token):
        self.tokens.append(int(token))

    def draft(self, k):
        done = len(self.tokens) - self.P
        d = list(self.ref[done:done + k])
        self.n += 1
        kind = self.n % 4
        if kind == 1 and len(d) > 1:
            d[1] = (d[1] + 1) % self.V
        elif kind == 2 and d:
            d[0] = (d[0] + 1) % self.V
        elif kind == 3:
            d = d[:1]
        return d


def load(preset, placement="gpu", spec=None):
    return Engine.load(f"preset:{preset}", dtype="float32", device="cpu",
                       placement=Placement.parse(placement), max_context=96, speculative=spec)


def plain(preset, params, placement="gpu"):
    eng = load(preset, placement)
    try:
        return list(eng.generate(PROMPT, params)), eng
    finally:
        eng.close()


def speculative(preset, params, reference, placement="gpu", draft_max=4):
    eng = load(preset, placement, SpecConfig("ngram", draft_max=draft_max, auto_off=False))
    eng.generator.new_drafter = lambda prompt: ScriptedDrafter(prompt, reference, eng.config.vocab_size)
    try:
        return list(eng.generate(PROMPT, params)), eng
    finally:
        eng.close()


@pytest.mark.parametrize("preset,placement", [
    ("tiny-qwen3-moe", "gpu"), ("tiny-qwen3-moe", "cache:6"), ("tiny-qwen3-moe", "0-1=cpu,2-3=gpu"),
    ("tiny-mixtral", "gpu"), ("tiny-olmoe", "hot:4"),
    ("tiny-qwen3.5-moe", "gpu"), ("tiny-qwen3.5-moe", "cache:6"), ("tiny-qwen3-next", "gpu"),
])
def test_greedy_output_is_plain_greedy(preset, placement):
    params = SamplingParams(max_tokens=N)
    ref, _ = plain(preset, params, placement)
    assert len(set(ref)) >= 4, "degenerate generation: the test would not discriminate"
    got, eng = speculative(preset, params, ref, placement)
    assert got == ref
    st = eng.stats()["speculative"]["last"]
    assert st["verify_steps"] >= 4 and 0 < st["accepted"] < st["drafted"]      # some, not all, accepted
    assert st["emitted"] == st["accepted"] + st["verify_steps"]
    assert st["distinct_experts"] > 0 and st["cells_per_layer"] >= st["distinct_experts_per_layer"]
    assert eng.stats()["last"]["decode_tokens"] == N - 1
    if eng.config.linear_layers:
        assert st["rollbacks"] >= 1                                            # rejected drafts rolled back


def test_a_cache_plans_verify_steps_as_decode_steps():
    """The cache's planner sees a verify step's expert union as one decode step (not as a prompt chunk)."""
    params = SamplingParams(max_tokens=N)
    ref, _ = plain("tiny-qwen3-moe", params, "cache:6")
    _, eng = speculative("tiny-qwen3-moe", params, ref, "cache:6")
    last = eng.stats()["last"]
    assert eng.executor.planner.decode_steps == last["decode_steps"]
    cache = eng.stats()["cache"]["total"]
    prompt_cells = len(PROMPT) * eng.config.top_k * len(eng.config.moe_layers)
    decode_cells = (last["decode_steps"] - eng.stats()["speculative"]["last"]["verify_steps"]) \
        * eng.config.top_k * len(eng.config.moe_layers) + eng.stats()["speculative"]["last"]["expert_cells"]
    assert cache["hits"] + cache["misses"] == prompt_cells + decode_cells


def test_stop_id_and_max_tokens_inside_a_verify_step():
    ref, _ = plain("tiny-qwen3-moe", SamplingParams(max_tokens=N))
    stop = ref[9]
    want = ref[:ref.index(stop)]
    got, eng = speculative("tiny-qwen3-moe", SamplingParams(max_tokens=N, stop_token_ids=(stop,)), ref,
                           draft_max=6)
    assert got == want and eng.finish_reason == "stop"
    got, eng = speculative("tiny-qwen3-moe", SamplingParams(max_tokens=7), ref, draft_max=6)
    assert got == ref[:7] and eng.finish_reason == "length"


def test_penalties_and_logprobs_follow_plain_decoding():
    params = SamplingParams(max_tokens=N, repetition_penalty=1.3, frequency_penalty=0.5, logprobs=2)
    eng = load("tiny-qwen3.5-moe")
    ref = list(eng.generate(PROMPT, params))
    ref_lp = eng.token_logprobs
    got, eng = speculative("tiny-qwen3.5-moe", params, ref)
    assert got == ref
    assert [t for t, _, _ in eng.token_logprobs] == [t for t, _, _ in ref_lp]
    for (_, lp, alts), (_, ref_lp1, ref_alts) in zip(eng.token_logprobs, ref_lp, strict=True):
        assert lp == pytest.approx(ref_lp1, abs=1e-4)
        assert [a for a, _ in alts] == [a for a, _ in ref_alts]


def test_sampling_runs_and_is_reproducible_with_a_seed():
    params = SamplingParams(max_tokens=N, temperature=0.9, top_p=0.95, seed=3)
    ref, _ = plain("tiny-qwen3-moe", SamplingParams(max_tokens=N))
    a, eng = speculative("tiny-qwen3-moe", params, ref)
    b, _ = speculative("tiny-qwen3-moe", params, ref)
    assert a == b and len(a) == N
    assert eng.stats()["speculative"]["last"]["verify_steps"] > 0


def test_ngram_drafting_end_to_end_equals_plain():
    """The real drafter: random tiny models fall into loops, which prompt lookup then drafts."""
    prompt, params = [5, 17, 300, 2, 77, 900, 41, 8, 5, 17, 300, 2, 77], SamplingParams(max_tokens=40)
    eng = load("tiny-qwen3-moe")
    ref = list(eng.generate(prompt, params))
    eng = load("tiny-qwen3-moe", spec=SpecConfig("ngram", draft_max=6, auto_off=False))
    assert list(eng.generate(prompt, params)) == ref
    assert eng.stats()["speculative"]["last"]["accepted"] > 0


# ---- the acceptance rule -------------------------------------------------------------------------------
def test_accept_draft_keeps_the_target_distribution():
    """P(token) = p(token) whatever the draft: accept d with p(d), else draw from p without d."""
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.0])
    gen = torch.Generator().manual_seed(0)
    for draft in (1, 3, 4):
        counts = torch.zeros(5)
        accepted = 0
        for _ in range(6000):
            tok, ok = accept_draft(probs, draft, gen)
            counts[tok] += 1
            accepted += ok
        torch.testing.assert_close(counts / 6000, probs, atol=0.025, rtol=0)
        assert accepted / 6000 == pytest.approx(float(probs[draft]), abs=0.025)
    assert accept_draft(torch.tensor([float("nan"), 1.0]), 0, gen) == (None, False)


def test_sampler_accept_greedy_is_argmax_and_sampling_uses_filtered_probs():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    s = Sampler(SamplingParams(), None)
    assert s.accept(logits, 1) == (1, True) and s.accept(logits, 3) == (1, False)
    params = SamplingParams(temperature=1.0, top_k=1, seed=0)          # top_k=1: only token 1 has mass
    s = Sampler(params, torch.Generator().manual_seed(0))
    assert filtered_probs(logits, params)[3] == 0
    assert s.accept(logits, 3) == (1, False) and s.accept(logits, 1) == (1, True)


# ---- the drafter, the switch, the settings ---------------------------------------------------------------
def test_ngram_drafter_takes_the_latest_longest_match():
    d = NgramDrafter([1, 2, 3, 4, 9, 2, 3, 5, 6], ngram_max=3, ngram_min=1)
    for t in (7, 2, 3):
        d.append(t)
    assert d.draft(2) == [5, 6]                   # (2, 3) last seen before 5, 6 (the later match wins)
    d.append(4)                                   # (2, 3, 4) occurred only at the start: the 3-gram wins
    assert d.draft(3) == [9, 2, 3]
    assert NgramDrafter([1, 2, 3], 3, 2).draft(4) == []           # no earlier occurrence
    assert NgramDrafter([1, 2, 1, 2], 2, 2).draft(0) == []
    assert NgramDrafter([8, 8, 8], 2, 1).draft(4) == [8]           # the match overlaps the suffix


def test_auto_switch_turns_drafting_off_when_slower_and_tries_again():
    sw = AutoSwitch(window=4, cooldown=3)
    assert sw.allow()
    for _ in range(4):
        sw.record(True, 2, 1.0)                   # 2 tok/s drafting, plain rate unknown
    assert sw.state == "probing" and not sw.allow()
    for _ in range(4):
        sw.record(False, 1, 0.25)                 # 4 tok/s plain
    assert sw.allow()
    for _ in range(4):
        sw.record(True, 2, 1.0)
    assert sw.state == "off" and sw.switched_off == 1
    for _ in range(3):
        assert not sw.allow()
        sw.record(False, 1, 0.25)
    assert sw.allow()
    for _ in range(4):
        sw.record(True, 3, 0.5)                   # 6 tok/s: faster than plain, stays on
    assert sw.state == "on" and sw.switched_off == 1


def test_auto_off_switch_in_the_generator():
    """A drafter whose drafts are always wrong makes verify steps slower per token: drafting goes off."""
    eng = load("tiny-qwen3-moe", spec=SpecConfig("ngram", draft_max=8))
    eng.generator.switch = AutoSwitch(window=3, cooldown=100)
    eng.generator.new_drafter = lambda prompt: ScriptedDrafter(prompt, [0] * 100, eng.config.vocab_size)
    ref, _ = plain("tiny-qwen3-moe", SamplingParams(max_tokens=40))
    assert list(eng.generate(PROMPT, SamplingParams(max_tokens=40))) == ref
    st = eng.stats()["speculative"]
    assert st["switched_off"] == 1 and st["switch"] == "off" and st["last"]["plain_steps"] > 20


@pytest.mark.parametrize("kw,msg", [
    (dict(method="eagle"), "--draft must be one of"), (dict(method="mtp"), "not written yet"),
    (dict(method="ngram", draft_max=16), "--draft-max"), (dict(method="ngram", draft_max=0), "--draft-max"),
    (dict(method="ngram", draft_max=4, draft_min=5), "--draft-min"),
    (dict(method="ngram", ngram_min=3, ngram_max=2), "n-gram sizes"),
])
def test_bad_settings_are_refused(kw, msg):
    with pytest.raises(HotExpertsError, match=msg):
        SpecConfig(**kw)


def test_spec_stats_ratios_and_sums():
    a = SpecStats(verify_steps=2, drafted=8, accepted=3, emitted=5, layer_calls=4, distinct_experts=10,
                  expert_cells=16)
    a.add(SpecStats(verify_steps=2, drafted=0, accepted=1, emitted=3))
    d = a.as_dict()
    assert d["accepted_per_step"] == 1.0 and d["tokens_per_step"] == 2.0 and d["acceptance_rate"] == 0.5
    assert d["distinct_experts_per_layer"] == 2.5 and d["cells_per_layer"] == 4.0
    assert SpecStats().as_dict()["tokens_per_step"] == 0.0


def test_without_drafting_no_verify_step_runs():
    eng = load("tiny-qwen3-moe")
    list(eng.generate(PROMPT, SamplingParams(max_tokens=8)))
    st = eng.stats()
    assert st["speculative"]["method"] == "none" and st["speculative"]["last"]["verify_steps"] == 0
    assert st["last"]["decode_tokens"] == st["last"]["decode_steps"] == 7


@pytest.mark.parametrize("placement", ["cache:10slots:lru", "hot:4"])
@pytest.mark.parametrize("defer", [False, True])
def test_greedy_output_through_the_native_worker_is_plain_greedy(placement, defer):
    """The cache's verify steps through the native CPU worker's mailbox (the path that is CUDA-graphed on a
    GPU), with the bookkeeping deferred by one step as on CUDA or not: plain greedy output, every routed cell
    accounted once, the planner stepping once per decode forward."""
    params = SamplingParams(max_tokens=N)
    ref, _ = plain("tiny-qwen3-moe", params)
    eng = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu", max_context=96,
                      placement=Placement.parse(placement, decode="worker"),
                      speculative=SpecConfig("ngram", draft_max=4, auto_off=False))
    eng.generator.new_drafter = lambda prompt: ScriptedDrafter(prompt, ref, eng.config.vocab_size)
    eng.executor.defer = defer
    try:
        assert eng.executor.worker is not None
        assert list(eng.generate(PROMPT, params)) == ref
        spec, last = eng.stats()["speculative"]["last"], eng.stats()["last"]
        assert spec["verify_steps"] >= 4 and 0 < spec["accepted"] < spec["drafted"]
        cache = eng.stats()["cache"]["total"]
        cells = eng.config.top_k * len(eng.config.moe_layers)
        assert cache["hits"] + cache["misses"] == len(PROMPT) * cells + spec["expert_cells"] + (
            last["decode_steps"] - spec["verify_steps"]) * cells
        if eng.executor.planner is not None:
            assert eng.executor.planner.decode_steps == last["decode_steps"]
    finally:
        eng.close()
