"""Penalties, logprobs and generation_config defaults of engine/sampling.py."""

import math

import pytest
import torch

from hotexperts.engine.sampling import (
    Sampler,
    SamplingParams,
    generation_defaults,
    sample,
    token_logprobs,
)
from hotexperts.errors import HotExpertsError


def test_neutral_penalties_keep_greedy_exact():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    s = Sampler(SamplingParams(), None, [1, 2, 3])
    assert s(logits) == int(torch.argmax(logits)) == sample(logits, SamplingParams())
    assert s.counts is None                                   # untouched: no penalty state at all


def test_frequency_presence_and_repetition():
    logits = torch.tensor([3.0, 2.9, 1.5, -1.0])
    s = Sampler(SamplingParams(frequency_penalty=0.5), None)
    assert [s(logits) for _ in range(3)] == [0, 1, 0]          # 3-0.5 < 2.9; then 2.9-0.5 < 2.5
    s = Sampler(SamplingParams(presence_penalty=2.0), None)   # presence: once, not per count
    assert [s(logits) for _ in range(4)] == [0, 1, 2, 0]
    s = Sampler(SamplingParams(repetition_penalty=2.0), None, prompt_ids=[0])
    assert s(logits) == 1                                     # 3/2 = 1.5 < 2.9
    s = Sampler(SamplingParams(repetition_penalty=2.0), None, prompt_ids=[3])
    pen = s._penalize(logits.clone())
    assert pen[3] == -2.0 and pen[0] == 3.0                   # a negative logit is multiplied


def test_logprobs_record():
    logits = torch.tensor([2.0, 1.0, 0.0])
    s = Sampler(SamplingParams(logprobs=2), None)
    tok = s(logits)
    (t, lp, alts), = s.logprobs
    ref = torch.log_softmax(logits, -1)
    assert t == tok == 0 and math.isclose(lp, float(ref[0]), rel_tol=1e-6)
    assert [a[0] for a in alts] == [0, 1] and math.isclose(alts[1][1], float(ref[1]), rel_tol=1e-6)
    assert token_logprobs(logits, 2, 0)[2] == ()


@pytest.mark.parametrize("bad", [dict(presence_penalty=3), dict(frequency_penalty=-2.5),
                                 dict(repetition_penalty=0), dict(logprobs=21), dict(logprobs=-1)])
def test_bad_values(bad):
    with pytest.raises(HotExpertsError):
        SamplingParams(**bad)


def test_generation_defaults():
    assert generation_defaults(None) == {"temperature": 0.0}
    assert generation_defaults({"temperature": 0.6, "top_p": 0.95}) == {"temperature": 0.0}   # no do_sample
    qwen3 = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1, 2]}
    assert generation_defaults(qwen3) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert generation_defaults({"do_sample": True}) == {"temperature": 1.0}


def test_generator_records_logprobs_per_token():
    from hotexperts.engine.engine import Engine
    engine = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu")
    toks = list(engine.generate([1, 2, 3], SamplingParams(max_tokens=4, logprobs=1)))
    lps = engine.token_logprobs
    assert [e[0] for e in lps[:len(toks)]] == toks and all(e[1] <= 0 for e in lps)
    greedy = list(engine.generate([1, 2, 3], SamplingParams(max_tokens=4)))
    assert greedy == toks and engine.token_logprobs == []
