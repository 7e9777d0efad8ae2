"""Every expert placement on GPT-OSS (clamped SwiGLU experts with gate/up biases, sinks, mixed windows) and
GLM-4.5 (sigmoid group router, plain shared expert, a dense layer) tiny presets, fp32: the engine's greedy
tokens equal the DenseExecutor reference's, prompt logits close, prompts in chunks, a second request on the
same cache."""

import pytest

from tests.experts.placement_parity import assert_placement_matches, preset_fixtures

PRESETS = ("tiny-gpt-oss", "tiny-glm4-moe")
PLACEMENTS = ["gpu", "cpu", "layers:2", "hot:5", "cache:20slots:lru", "cache:24slots:auto",
              "0-1=cpu,2-3=slots4@lru", "0-1=gpu,2-3=cpu", "0=gpu,1-3=slots4", "0=gpu,1=cpu,2-3=shared"]


loaded, reference = preset_fixtures(PRESETS)


@pytest.mark.filterwarnings("ignore:cpu_moe")
@pytest.mark.parametrize("text", PLACEMENTS)
def test_every_placement_matches_the_reference(loaded, reference, text):
    assert_placement_matches(loaded, reference, text)



def test_the_variant_is_not_silently_plain(loaded):
    le = loaded.store.layer(loaded.store.layers[0])
    if loaded.cfg.model_type == "gpt_oss":
        assert le.act.kind == "swiglu_oai" and le.b13 is not None and not le.plain
    else:
        assert le.plain and loaded.cfg.moe_layers[0] == 1
