"""trace/learned.py: recording a trained model gives a valid trace with prompt and decode tokens and one
prediction per cell; prediction recall is computed from the actual routing (perfect guesses recall 1,
disjoint guesses 0, the trained model's guesses beat chance); the predictions are saved beside the trace and
drive the simulator's prefetch."""

import numpy as np
import pytest

from hotexperts.errors import HotExpertsError
from hotexperts.experts.predict import NextLayerPredictor
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.heldout import split
from hotexperts.trace.learned import (
    Request,
    domain_requests,
    prediction_recall,
    record,
    save_recorded,
    switch_requests,
)
from hotexperts.trace.simulate import Prefetch, load_predicted, simulate
from hotexperts.trace.train import TrainSpec, train

SPEC = TrainSpec(num_experts=16, top_k=2, hidden=32, layers=3, heads=2, kv_heads=1, expert_hidden=16,
                 seq_len=48, seqs_per_domain=2, steps=25, lr=1e-2, warmup=2)
TEXT = {"prose": (b"the cat sat on the mat and the dog ran to the park. " * 30,
                  b"a bird sang in the tree. " * 40),
        "code": (b"def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 30,
                 b"for i in range(10):\n    x += i\n" * 40)}


@pytest.fixture(scope="module")
def trained():
    return train(SPEC, TEXT)


@pytest.fixture(scope="module")
def recorded(trained):
    reqs = domain_requests(TEXT, "prose", n=1, prompt=16, decode=40) + switch_requests(TEXT, 16, 20)
    return record(trained.model, trained.store, reqs, NextLayerPredictor.from_model(trained.model, extra=1))


def test_recorded_trace_has_prompt_then_decode_tokens_and_predictions(recorded):
    t, pred = recorded.trace, recorded.predicted
    assert t.num_tokens == 16 + 40 + 16 + 40 and t.top_k == 2 and t.num_experts == 16
    assert t.is_prompt.sum() == 32 and list(np.unique(t.request)) == [0, 1]
    assert (t.ids >= 0).all() and t.meta["notes"]
    assert pred.shape == (t.num_tokens, 3, 3)
    assert (pred[:, 0] == -1).all() and (pred[:, 1:] >= 0).all()     # layer 0 has no previous layer
    fit, test = split(t)                                              # the held-out rule applies
    assert fit.num_tokens + test.num_tokens == t.num_tokens


def test_recall_of_perfect_and_disjoint_guesses(recorded):
    t = recorded.trace
    perfect = t.ids.copy()
    assert prediction_recall(t, perfect)["selections"] == 1.0
    assert prediction_recall(t, perfect)["misses"] == 1.0
    assert prediction_recall(t, np.full_like(perfect, -1))["selections"] == 0.0
    first_only = np.repeat(t.ids[..., :1], 2, axis=2)                # covers one of the k = 2 choices
    assert prediction_recall(t, first_only)["selections"] == 0.5
    with pytest.raises(HotExpertsError, match="does not match"):
        prediction_recall(t, perfect[:-1])


def test_trained_guesses_beat_chance(recorded):
    r = prediction_recall(recorded.trace, recorded.predicted[..., :2], fraction=0.25)
    assert r["guesses"] == 2 and r["decode_tokens"] == 80
    assert r["selections"] > 2 * 2 / 16                             # chance: k / E
    assert 0.0 <= r["misses"] <= 1.0


def test_requests_come_from_heldout_text_only():
    (req,) = domain_requests(TEXT, "code", n=1, prompt=10, decode=20)
    assert isinstance(req, Request) and (req.prompt + req.decode) in TEXT["code"][1]
    with pytest.raises(HotExpertsError, match="held-out bytes"):
        domain_requests(TEXT, "code", n=100, prompt=256, decode=768)


def test_predictions_saved_beside_the_trace_drive_the_simulated_prefetch(recorded, tmp_path):
    path = save_recorded(recorded, tmp_path / "rec.npz")
    trace = RoutingTrace.load(path)                               # the plain loader ignores `predicted`
    assert (trace.ids == recorded.trace.ids).all()
    predicted = load_predicted(path, trace)
    assert predicted.dtype == np.int16 and (predicted == recorded.predicted).all()
    r = simulate(trace, "decay", slots=4, prefetch=Prefetch(predicted, cold_steps=1))
    assert r.prefetch["issued"] > 0 and r.prefetch["recall"] > 2 / 16     # better than chance (k / E)
    with pytest.raises(HotExpertsError, match="does not match"):
        load_predicted(path, trace.take(np.arange(trace.num_tokens - 1)))
