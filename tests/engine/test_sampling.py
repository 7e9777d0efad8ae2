"""SamplingParams validation and sample(): greedy, seeds, top-k / top-p / min-p restrictions."""

import pytest
import torch

from hotexperts.engine.sampling import SamplingParams, filtered_probs, make_generator, sample
from hotexperts.errors import HotExpertsError


def test_greedy_is_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert sample(logits, SamplingParams()) == int(logits.argmax())


def test_seed_reproducible_and_different_seeds_differ():
    logits = torch.zeros(5000)                                  # uniform: draws depend only on the seed
    p = SamplingParams(temperature=1.0, seed=123)
    draw = [sample(logits, p, make_generator(p, "cpu")) for _ in range(2)]
    assert draw[0] == draw[1]
    gen = make_generator(p, "cpu")
    a = [sample(logits, p, gen) for _ in range(20)]
    gen = make_generator(p, "cpu")
    assert [sample(logits, p, gen) for _ in range(20)] == a
    q = SamplingParams(temperature=1.0, seed=124)
    gen = make_generator(q, "cpu")
    assert [sample(logits, q, gen) for _ in range(20)] != a


def test_top_k_keeps_k_largest():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0, 3.0])
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(probs.nonzero().flatten().tolist()) == {1, 3}
    p = SamplingParams(temperature=1.0, top_k=2, seed=0)
    gen = make_generator(p, "cpu")
    assert {sample(logits, p, gen) for _ in range(200)} == {1, 3}


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.8)).nonzero().flatten().tolist()
    assert kept == [0, 1]                                       # 0.5 + 0.3 reaches 0.8
    kept = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.81)).nonzero().flatten().tolist()
    assert kept == [0, 1, 2]
    kept = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.1)).nonzero().flatten().tolist()
    assert kept == [0]                                          # the top token always survives


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.4)).nonzero().flatten().tolist()
    assert kept == [0, 1]                                       # 0.15 < 0.4 * 0.5


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0])
    cold = filtered_probs(logits, SamplingParams(temperature=0.1))
    hot = filtered_probs(logits, SamplingParams(temperature=10.0))
    assert cold[1] > 0.99 and 0.5 < hot[1] < 0.6


def test_sampling_frequencies_follow_probs():
    logits = torch.tensor([0.7, 0.2, 0.1]).log()
    p = SamplingParams(temperature=1.0, seed=7)
    gen = make_generator(p, "cpu")
    counts = torch.bincount(torch.tensor([sample(logits, p, gen) for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -1}, {"top_k": 1.5}, {"top_p": 0.0},
    {"top_p": 1.5}, {"min_p": -0.1}, {"min_p": 2.0}, {"max_tokens": 0}, {"seed": "x"}, {"stop": [""]},
    {"stop": [1]}, {"stop_token_ids": [-1]}, {"stop_token_ids": ["a"]},
])
def test_bad_params_raise_clear_error(kwargs):
    with pytest.raises(HotExpertsError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_params_normalise_sequences_and_are_frozen():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3])
    assert p.stop == ("a", "b") and p.stop_token_ids == (3,)
    assert SamplingParams(stop="x").stop == ("x",)
    with pytest.raises(AttributeError):
        p.temperature = 1.0
