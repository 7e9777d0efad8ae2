"""The T=1 decode stages (engine/runner/stages.py), plain and torch.compile'd, against the model's forward.

- plain stages: bit-identical logits and K/V (the residual add moved into the next stage changes nothing);
- aot_eager (fast): Dynamo traces every architecture in one graph per layer kind (no graph per layer, no
  recompile over positions), same logits and greedy tokens;
- Inductor (slow: C++ codegen on the CPU, ~45 s for the four on 2 cores with a cold cache): logits within
  fp32 tolerance, identical greedy tokens, and the K/V cache written in place;
- the model stays pure: compiling is the runner's (compile_decode(model)), model(...) never runs stages.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import VARIANTS, build_tiny

from hotexperts.engine.runner.compiled import compile_decode, compiled_stages, decode_forward, decode_stages
from hotexperts.engine.runner.stages import DecodeStages
from hotexperts.experts.reference import DenseExecutor

pytestmark = pytest.mark.usefixtures("one_thread")          # tests/conftest.py
PROMPT, DECODE = 5, 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches per function code object and counts recompiles per process: every test from zero."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def kinds(model) -> int:
    return len({layer.is_moe for layer in model.model.layers})


def model_forward(model, *args):
    return model(*args)


@torch.no_grad()
def decode(model, ex, n: int = DECODE, seed: int = 3, step=decode_forward):
    """Prefill of a random prompt, then n greedy T=1 steps through `step`: (logits [n, V], tokens, kv)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model.cfg.vocab_size, (PROMPT,), generator=gen)
    kv = model.new_kv_cache(32)
    logits = model(prompt, torch.arange(PROMPT), kv, ex, last_only=True, kv_len=PROMPT)
    rows, toks = [], []
    for p in range(PROMPT, PROMPT + n):
        tok = int(logits[-1].argmax())
        toks.append(tok)
        logits = step(model, torch.tensor([tok]), torch.tensor([p]), kv, ex)
        rows.append(logits)
    return torch.cat(rows), toks, kv


def build(name):
    model, experts = build_tiny(name)
    return model, DenseExecutor(experts, "cpu", torch.float32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@torch.no_grad()
def test_plain_stages_match_forward_bitwise(name):
    model, ex = build(name)
    ref, toks, kv_ref = decode(model, ex, step=model_forward)
    plain = DecodeStages(False)
    got, toks2, kv = decode(model, ex, step=lambda m, *a: plain.run(m, *a))
    assert torch.equal(got, ref) and toks2 == toks
    assert torch.equal(kv.k, kv_ref.k) and torch.equal(kv.v, kv_ref.v)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_aot_eager_one_graph_per_layer_kind(name):
    model, ex = build(name)
    ref, toks, _ = decode(model, ex)
    stages = compile_decode(model, backend="aot_eager")
    got, toks2, _ = decode(model, ex)
    assert stages.ready and not stages.failed
    assert dict(stages.graphs) == {"prepare": 1, "layer": kinds(model), "head": 1}   # not one per layer
    decode(model, ex, seed=4)                                          # new prompt, new positions
    assert dict(stages.graphs) == {"prepare": 1, "layer": kinds(model), "head": 1}   # no recompile
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert toks2 == toks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral_swa", "olmoe"])
def test_inductor_decode_matches_eager(name):
    model, ex = build(name)
    ref, toks, kv_ref = decode(model, ex, n=10)
    stages = compile_decode(model)
    got, toks2, kv = decode(model, ex, n=10)
    assert not stages.failed and dict(stages.graphs) == {"prepare": 1, "layer": kinds(model), "head": 1}
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert toks2 == toks
    torch.testing.assert_close(kv.k, kv_ref.k, atol=1e-5, rtol=1e-5)       # written in place, every layer
    torch.testing.assert_close(kv.v, kv_ref.v, atol=1e-5, rtol=1e-5)
    assert kv.k[:, :, PROMPT + 9].abs().sum() > 0


def test_the_model_stays_pure_and_only_no_grad_t1_steps_compile():
    model, ex = build("qwen3_moe")
    stages = compile_decode(model, backend="aot_eager")
    assert not hasattr(model, "decode_stages") and not hasattr(model, "compile_decode")
    kv = model.new_kv_cache(32)
    with torch.no_grad():
        model(torch.arange(1, 6), torch.arange(5), kv, ex)                        # prefill T=5
        model(torch.tensor([3]), torch.tensor([5]), kv, ex)                        # the model's own forward
        decode_forward(model, torch.tensor([3, 4]), torch.tensor([6, 7]), kv, ex)  # T=2
    decode_forward(model, torch.tensor([3]), torch.tensor([8]), kv, ex)            # autograd on
    assert not stages.graphs and not stages.ready
    with torch.no_grad():
        decode_forward(model, torch.tensor([3]), torch.tensor([9]), kv, ex)
    assert stages.ready and stages.graphs["layer"] == kinds(model)


def test_compile_decode_is_idempotent_and_switches_off():
    model, _ = build("mixtral")
    a = compile_decode(model, backend="aot_eager")
    assert compile_decode(model, backend="aot_eager") is a and compiled_stages(model) is a
    assert model.model.layers[0].self_attn.qkv_weight is not None                 # fuse_qkv=True
    assert compile_decode(model, backend="aot_eager", options={"x": 1}) is not a
    assert compile_decode(model, False) is None and compiled_stages(model) is None
    assert model.model.layers[0].self_attn.qkv_weight is None
    other, _ = build("mixtral")
    assert compiled_stages(other) is None                                          # per model
    with pytest.raises(ValueError, match="CUDA graphs"):
        compile_decode(model, mode="reduce-overhead")


def test_failed_compile_warns_and_decodes_eagerly():
    model, ex = build("olmoe")
    ref, toks, _ = decode(model, ex)

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    stages = compile_decode(model, backend=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, toks2, _ = decode(model, ex)
    assert stages.failed and any("decoding without it" in str(w.message) for w in caught)
    assert torch.equal(got, ref) and toks2 == toks
    assert decode_stages(model) is not stages and not decode_stages(model).compiled


@torch.no_grad()
def test_an_executor_error_in_the_first_compiled_step_is_not_a_compile_failure():
    """A failing expert step (the CPU worker died) must reach the caller as itself: the stages neither
    swallow it as "compile failed" nor rerun the step eagerly."""
    from hotexperts.errors import ExpertComputeError

    model, ex = build("olmoe")

    def failing(layer, x, ids, w):
        raise ExpertComputeError("the CPU expert worker did not answer")

    stages = compile_decode(model, backend="aot_eager")
    kv = model.new_kv_cache(32)
    model(torch.tensor([1, 2, 3]), torch.arange(3), kv, ex, last_only=True, kv_len=3)
    with pytest.raises(ExpertComputeError, match="did not answer"):
        decode_forward(model, torch.tensor([4]), torch.tensor([3]), kv, failing)
    assert not stages.failed
