"""The placement-parity check the per-family tests share: a placement's engine, with prompts in chunks of 4
tokens and a second request on the same cache, gives the DenseExecutor reference's greedy tokens and close
prompt logits (fp32, CPU).

    loaded, reference = preset_fixtures(PRESETS)   # in a test module: the module-scoped fixtures `loaded`
                                                   # (each preset built in memory) and `reference` (its run)
"""

import pytest
import torch

from hotexperts.engine.engine import Engine
from hotexperts.engine.presets import build_in_memory
from hotexperts.engine.sampling import SamplingParams
from hotexperts.experts.placement import Placement
from hotexperts.experts.reference import DenseExecutor

PROMPTS = ([5, 17, 300, 2, 77, 900, 41, 8, 123, 64, 3, 1000, 9, 9, 31], [44, 12, 600, 7])
N = 8
CPU = torch.device("cpu")


def generate(engine, chunk=None):
    if chunk is not None:
        engine.generator.prefill_chunk = chunk
    out = []
    for prompt in PROMPTS:                                          # the second request reuses the cache
        logits = engine.prefill(prompt)
        out.append((logits, list(engine.generate(prompt, SamplingParams(max_tokens=N)))))
    return out


def preset_fixtures(presets: tuple[str, ...]):
    """The fixtures a per-family module binds as `loaded, reference`: each preset (fp32, CPU) and the
    DenseExecutor reference's run of it, once per module and preset."""

    @pytest.fixture(scope="module", params=presets)
    def loaded(request):
        return build_in_memory(request.param, dtype="float32", device="cpu")

    @pytest.fixture(scope="module")
    def reference(loaded):
        return reference_run(loaded)

    return loaded, reference


def reference_run(loaded):
    ex = DenseExecutor({l: loaded.store.layer(l) for l in loaded.store.layers}, "cpu", torch.float32)
    return generate(Engine.from_loaded(loaded, CPU, executor=ex, max_context=64))


def assert_placement_matches(loaded, reference, text: str) -> None:
    engine = Engine.from_loaded(loaded, CPU, Placement.parse(text), max_context=64)
    try:
        got = generate(engine, chunk=4)                              # prompts in chunks of 4 tokens
    finally:
        engine.close()
    for (logits, toks), (ref_logits, ref_toks) in zip(got, reference, strict=True):
        assert toks == ref_toks
        torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert len(set(reference[0][1])) >= 3, "degenerate generation: the test would not discriminate"
