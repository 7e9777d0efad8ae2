"""The T=1 decode stages (models/compiled.py), plain and torch.compile'd, against the eager forward.

- plain stages: bit-identical logits and K/V (the residual add moved into the next stage changes nothing);
- aot_eager (fast): Dynamo traces every architecture in one graph per layer kind (no graph per layer, no
  recompile over positions), same logits and greedy tokens;
- Inductor (slow: C++ codegen on the CPU, ~45 s for the four on 2 cores with a cold cache): logits within
  fp32 tolerance, identical greedy tokens, and the K/V cache written in place.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TINY, ours_from_hf

from hotexperts.experts.reference import DenseExecutor
from hotexperts.models.compiled import DecodeStages

PROMPT, DECODE = 5, 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches per function code object and counts recompiles per process: every test from zero."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def kinds(model) -> int:
    return len({layer.is_moe for layer in model.model.layers})


@torch.no_grad()
def decode(model, ex, n: int = DECODE, seed: int = 3):
    """Eager prefill of a random prompt, then n greedy T=1 steps: (logits [n, V], tokens, kv)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model.cfg.vocab_size, (PROMPT,), generator=gen)
    kv = model.new_kv_cache(32)
    logits = model(prompt, torch.arange(PROMPT), kv, ex, last_only=True, kv_len=PROMPT)
    rows, toks = [], []
    for p in range(PROMPT, PROMPT + n):
        tok = int(logits[-1].argmax())
        toks.append(tok)
        logits = model(torch.tensor([tok]), torch.tensor([p]), kv, ex)
        rows.append(logits)
    return torch.cat(rows), toks, kv


def build(hf_models, name):
    model, experts = ours_from_hf(hf_models(name))
    return model, DenseExecutor(experts, "cpu", torch.float32)


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_plain_stages_match_forward_bitwise(hf_models, name):
    model, ex = build(hf_models, name)
    ref, toks, kv_ref = decode(model, ex)
    model.decode_stages = DecodeStages(False)
    got, toks2, kv = decode(model, ex)
    assert torch.equal(got, ref) and toks2 == toks
    assert torch.equal(kv.k, kv_ref.k) and torch.equal(kv.v, kv_ref.v)


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_fused_qkv_matches_hf_and_keeps_the_weights(hf_models, name):
    hf = hf_models(name)
    model, ex = build(hf_models, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_qkv()
    attn = model.model.layers[0].self_attn
    assert attn.qkv_weight is not None
    assert attn.k_proj.weight.data_ptr() == attn.qkv_weight[attn.heads * attn.head_dim:].data_ptr()
    sd = model.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], v) for k, v in before.items())
    seq = torch.randint(1, hf.config.vocab_size, (PROMPT + 3,), generator=torch.Generator().manual_seed(5))
    ref = hf(seq[None]).logits[0].float()
    kv = model.new_kv_cache(32)
    got = [model(seq[:PROMPT], torch.arange(PROMPT), kv, ex)]                 # prefill uses it too
    got += [model(seq[p:p + 1], torch.tensor([p]), kv, ex) for p in range(PROMPT, PROMPT + 3)]
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=1e-4)
    scaled = {k: 2 * v if "k_proj.weight" in k else v for k, v in before.items()}
    model.load_state_dict(scaled)                                             # a later load lands in it
    assert torch.equal(attn.qkv_weight[attn.heads * attn.head_dim:][:attn.k_proj.out_features],
                       2 * before["model.layers.0.self_attn.k_proj.weight"])
    model.fuse_qkv(False)
    assert attn.qkv_weight is None


@pytest.mark.parametrize("name", sorted(TINY))
def test_aot_eager_one_graph_per_layer_kind(hf_models, name):
    model, ex = build(hf_models, name)
    ref, toks, _ = decode(model, ex)
    stages = model.compile_decode(backend="aot_eager")
    got, toks2, _ = decode(model, ex)
    assert stages.ready and not stages.failed
    assert dict(stages.graphs) == {"prepare": 1, "layer": kinds(model), "head": 1}   # not one per layer
    decode(model, ex, seed=4)                                          # new prompt, new positions
    assert dict(stages.graphs) == {"prepare": 1, "layer": kinds(model), "head": 1}   # no recompile
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert toks2 == toks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral_swa", "olmoe"])
def test_inductor_decode_matches_eager(hf_models, name):
    model, ex = build(hf_models, name)
    ref, toks, kv_ref = decode(model, ex, n=10)
    stages = model.compile_decode()
    got, toks2, kv = decode(model, ex, n=10)
    assert not stages.failed and dict(stages.graphs) == {"prepare": 1, "layer": kinds(model), "head": 1}
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert toks2 == toks
    torch.testing.assert_close(kv.k, kv_ref.k, atol=1e-5, rtol=1e-5)       # written in place, every layer
    torch.testing.assert_close(kv.v, kv_ref.v, atol=1e-5, rtol=1e-5)
    assert kv.k[:, :, PROMPT + 9].abs().sum() > 0


def test_prefill_grad_and_short_batches_stay_eager(hf_models):
    model, ex = build(hf_models, "qwen3_moe")
    stages = model.compile_decode(backend="aot_eager")
    kv = model.new_kv_cache(32)
    with torch.no_grad():
        model(torch.arange(1, 6), torch.arange(5), kv, ex)                        # prefill T=5
        model(torch.tensor([3]), torch.tensor([5]), kv, ex, kv_len=6)              # a T=1 prompt chunk
        model(torch.tensor([3, 4]), torch.tensor([6, 7]), kv, ex)                  # T=2
    model(torch.tensor([3]), torch.tensor([8]), kv, ex)                            # autograd on
    assert not stages.graphs and not stages.ready
    with torch.no_grad():
        model(torch.tensor([3]), torch.tensor([9]), kv, ex)
    assert stages.ready and stages.graphs["layer"] == kinds(model)


def test_compile_decode_is_idempotent_and_switches_off(hf_models):
    model, _ = build(hf_models, "mixtral")
    a = model.compile_decode(backend="aot_eager")
    assert model.compile_decode(backend="aot_eager") is a
    assert model.compile_decode(backend="aot_eager", options={"x": 1}) is not a
    assert model.compile_decode(False) is None and model.decode_stages is None
    with pytest.raises(ValueError, match="CUDA graphs"):
        model.compile_decode(mode="reduce-overhead")


def test_failed_compile_warns_and_decodes_eagerly(hf_models):
    model, ex = build(hf_models, "olmoe")
    ref, toks, _ = decode(model, ex)

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    stages = model.compile_decode(backend=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, toks2, _ = decode(model, ex)
    assert stages.failed and any("decoding without it" in str(w.message) for w in caught)
    assert torch.equal(got, ref) and toks2 == toks
    assert model.stages() is not stages and not model.stages().compiled


@torch.no_grad()
def test_an_executor_error_in_the_first_compiled_step_is_not_a_compile_failure(hf_models):
    """A failing expert step (the CPU worker died) must reach the caller as itself: the stages neither
    swallow it as "compile failed" nor rerun the step eagerly."""
    from hotexperts.errors import ExpertComputeError

    model, ex = build(hf_models, "olmoe")

    def failing(layer, x, ids, w):
        raise ExpertComputeError("the CPU expert worker did not answer")

    stages = model.compile_decode(backend="aot_eager")
    kv = model.new_kv_cache(32)
    model(torch.tensor([1, 2, 3]), torch.arange(3), kv, ex, last_only=True, kv_len=3)
    with pytest.raises(ExpertComputeError, match="did not answer"):
        model(torch.tensor([4]), torch.tensor([3]), kv, failing)
    assert not stages.failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral_swa", "olmoe"])
@torch.no_grad()
def test_compiled_step_in_one_cuda_graph(hf_models, name):
    """engine/cuda_graph.GraphDecodeStep over the compiled stages: compiles before the warm-up, captures,
    replays; logits as the eager (ungraphed, uncompiled) step's, fed the same tokens."""
    from test_models_cuda_graph import GatherExecutor

    from hotexperts.engine.cuda_graph import EagerDecodeStep, GraphDecodeStep

    dev = torch.device("cuda")
    model, experts = ours_from_hf(hf_models(name))
    model = model.to(dev)
    ex = GatherExecutor(experts, dev, torch.float32)
    ex.graph_safe = True
    prompt = torch.arange(1, PROMPT + 1, device=dev)
    kv_ref, kv = model.new_kv_cache(32), model.new_kv_cache(32)
    for cache in (kv_ref, kv):
        model(prompt, torch.arange(PROMPT, device=dev), cache, ex, kv_len=PROMPT)
    eager = EagerDecodeStep(model, kv_ref, ex, dev)
    toks, ref = [7], []
    for p in range(PROMPT, PROMPT + DECODE):
        ref.append(eager(toks[-1], p).clone())
        toks.append(int(ref[-1].argmax()))
    stages = model.compile_decode()
    step = GraphDecodeStep(model, kv, ex, dev)
    for i, p in enumerate(range(PROMPT, PROMPT + DECODE)):
        torch.testing.assert_close(step(toks[i], p), ref[i], atol=1e-4, rtol=1e-4)
    assert step.graphed and not step.failed and stages.ready
    assert dict(stages.graphs) == {"prepare": 1, "layer": kinds(model), "head": 1}
