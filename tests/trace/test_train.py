"""trace/train.py: the training experts compute what the DenseExecutor oracle computes, the balance loss is
1 for uniform routing, a few steps lower the loss and the result runs as an engine model."""

import pytest
import torch

from hotexperts.errors import HotExpertsError
from hotexperts.experts.reference import DenseExecutor
from hotexperts.trace.train import TrainingExperts, TrainSpec, init_model, model_config, train

SPEC = TrainSpec(num_experts=8, top_k=2, hidden=32, layers=2, heads=2, kv_heads=1, expert_hidden=16,
                 seq_len=32, seqs_per_domain=1, steps=12, lr=1e-2, warmup=2, log_every=1)
TEXT = {"a": (b"the cat sat on the mat. " * 40, b""), "b": (b"def f(x):\n    return x + 1\n" * 40, b"")}


def experts_and_model(capacity_factor=100.0):
    gen = torch.Generator().manual_seed(0)
    cfg = model_config(SPEC)
    model = init_model(cfg, gen)
    gates = {l: model.model.layers[l].mlp.gate for l in cfg.moe_layers}
    return cfg, model, TrainingExperts(cfg, gates, gen, capacity_factor)


def test_training_experts_match_the_oracle_below_capacity():
    cfg, _, ex = experts_and_model()
    x = torch.randn(10, cfg.hidden_size)
    ids = torch.randint(0, cfg.num_experts, (10, cfg.top_k))
    w = torch.rand(10, cfg.top_k)
    store = ex.store()
    ref = DenseExecutor({l: store.layer(l) for l in store.layers})(0, x, ids, w)
    torch.testing.assert_close(ex(0, x, ids, w), ref, rtol=1e-5, atol=1e-5)


def test_selections_past_capacity_are_dropped_in_training_only():
    cfg, _, ex = experts_and_model(capacity_factor=1.0)
    x = torch.randn(8, cfg.hidden_size)
    ids = torch.zeros(8, cfg.top_k, dtype=torch.long)              # all on expert 0: capacity 2 of 16
    out = ex(0, x, ids, torch.ones(8, cfg.top_k))
    assert (out.abs().sum(1) > 0).sum() == 1                        # the two kept cells: token 0's


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_collapsed():
    cfg, _, ex = experts_and_model()
    E = cfg.num_experts
    with torch.no_grad():
        ex.gates[0].weight.zero_()                                   # uniform probabilities
    x = torch.randn(E, cfg.hidden_size)
    spread = torch.arange(E * cfg.top_k).reshape(E, cfg.top_k) % E
    assert float(ex._balance_loss(0, x, spread).detach()) == pytest.approx(1.0)
    with torch.no_grad():
        ex.gates[0].weight[0].fill_(10.0)
    x = torch.ones(E, cfg.hidden_size)
    assert float(ex._balance_loss(0, x, torch.zeros(E, cfg.top_k, dtype=torch.long)).detach()) > 4.0


def test_a_few_steps_lower_the_loss_and_keep_routing_spread():
    trained = train(SPEC, TEXT)
    losses = [lm for _, lm, _ in trained.log]
    assert losses[-1] < losses[0] - 0.5
    assert not any(p.requires_grad for p in trained.model.parameters())
    assert trained.store.layers == list(trained.cfg.moe_layers)
    assert trained.store.layer(0).w13.shape == (8, 32, 32)


def test_bad_spec_is_a_clear_error():
    with pytest.raises(HotExpertsError, match="top_k"):
        model_config(TrainSpec(num_experts=4, top_k=5))
    with pytest.raises(HotExpertsError, match="train bytes"):
        train(SPEC, {"tiny": (b"short", b"")})
