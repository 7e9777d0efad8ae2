"""Every expert placement on the hybrid families (tiny Qwen3.5-MoE and Qwen3-Next presets, fp32): the engine's
greedy tokens equal the DenseExecutor reference's, prompt logits close, with the per-layer-kind cache, prompt
chunks (state carried) and a second request on the same cache (state reset)."""

import pytest
import torch

from hotexperts.engine.engine import Engine
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.sampling import SamplingParams
from hotexperts.experts.placement import Placement
from hotexperts.experts.reference import DenseExecutor

PRESETS = ("tiny-qwen3.5-moe", "tiny-qwen3-next")
PLACEMENTS = ["gpu", "cpu", "layers:2", "hot:0", "hot:5", "cache:0slots", "cache:20slots:lru",
              "cache:24slots:auto", "0=cpu,1-3=slots4@lru", "0-1=gpu,2-3=cpu"]
PROMPTS = ([5, 17, 300, 2, 77, 900, 41, 8, 123, 64, 3, 1000, 9, 9, 31], [44, 12, 600, 7])
N = 8


@pytest.fixture(scope="module", params=PRESETS)
def loaded(request):
    return build_in_memory(request.param, dtype="float32", device="cpu")


def generate(engine, chunk=None):
    if chunk is not None:
        engine.generator.prefill_chunk = chunk
    out = []
    for prompt in PROMPTS:                                          # the second request reuses the cache
        logits = engine.prefill(prompt)
        out.append((logits, list(engine.generate(prompt, SamplingParams(max_tokens=N)))))
    return out


@pytest.fixture(scope="module")
def reference(loaded):
    ex = DenseExecutor({l: loaded.store.layer(l) for l in loaded.store.layers}, "cpu", torch.float32)
    return generate(Engine.from_loaded(loaded, torch.device("cpu"), executor=ex, max_context=64))


@pytest.mark.parametrize("text", PLACEMENTS)
def test_every_placement_matches_the_reference(loaded, reference, text):
    engine = Engine.from_loaded(loaded, torch.device("cpu"), Placement.parse(text), max_context=64)
    try:
        got = generate(engine, chunk=4)                              # prompts in chunks of 4 tokens
    finally:
        engine.close()
    for (logits, toks), (ref_logits, ref_toks) in zip(got, reference, strict=True):
        assert toks == ref_toks
        torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert len(set(reference[0][1])) >= 3, "degenerate generation: the test would not discriminate"


def test_vram_accounting_counts_the_per_layer_kind_cache(loaded):
    from hotexperts.engine.engine import vram_reserved
    from hotexperts.models.cache import cache_bytes

    parts = vram_reserved(loaded, 64, torch.float32, torch.device("cpu"))
    assert parts["kv"] == cache_bytes(loaded.cfg, 64, torch.float32)
    kv = loaded.model.new_kv_cache(64)
    assert parts["kv"] == sum(b.numel() * b.element_size() for n, b in kv.named_buffers() if n != "positions")
