"""Every expert placement on GPT-OSS (clamped SwiGLU experts with gate/up biases, sinks, mixed windows) and
GLM-4.5 (sigmoid group router, plain shared expert, a dense layer) tiny presets, fp32: the engine's greedy
tokens equal the DenseExecutor reference's, prompt logits close, prompts in chunks, a second request on the
same cache."""

import pytest
import torch

from hotexperts.engine.engine import Engine
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.sampling import SamplingParams
from hotexperts.experts.placement import Placement
from hotexperts.experts.reference import DenseExecutor

PRESETS = ("tiny-gpt-oss", "tiny-glm4-moe")
PLACEMENTS = ["gpu", "cpu", "layers:2", "hot:5", "cache:20slots:lru", "cache:24slots:auto",
              "0-1=cpu,2-3=slots4@lru", "0-1=gpu,2-3=cpu"]
PROMPTS = ([5, 17, 300, 2, 77, 900, 41, 8, 123, 64, 3, 1000, 9, 9, 31], [44, 12, 600, 7])
N = 8


@pytest.fixture(scope="module", params=PRESETS)
def loaded(request):
    return build_in_memory(request.param, dtype="float32", device="cpu")


def generate(engine, chunk=None):
    if chunk is not None:
        engine.generator.prefill_chunk = chunk
    out = []
    for prompt in PROMPTS:
        logits = engine.prefill(prompt)
        out.append((logits, list(engine.generate(prompt, SamplingParams(max_tokens=N)))))
    return out


@pytest.fixture(scope="module")
def reference(loaded):
    ex = DenseExecutor({l: loaded.store.layer(l) for l in loaded.store.layers}, "cpu", torch.float32)
    return generate(Engine.from_loaded(loaded, torch.device("cpu"), executor=ex, max_context=64))


@pytest.mark.filterwarnings("ignore:cpu_moe")
@pytest.mark.parametrize("text", PLACEMENTS)
def test_every_placement_matches_the_reference(loaded, reference, text):
    engine = Engine.from_loaded(loaded, torch.device("cpu"), Placement.parse(text), max_context=64)
    try:
        got = generate(engine, chunk=4)
    finally:
        engine.close()
    for (logits, toks), (ref_logits, ref_toks) in zip(got, reference, strict=True):
        assert toks == ref_toks
        torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert len(set(reference[0][1])) >= 3, "degenerate generation: the test would not discriminate"


def test_the_variant_is_not_silently_plain(loaded):
    le = loaded.store.layer(loaded.store.layers[0])
    if loaded.cfg.model_type == "gpt_oss":
        assert le.act.kind == "swiglu_oai" and le.b13 is not None and not le.plain
    else:
        assert le.plain and loaded.cfg.moe_layers[0] == 1
