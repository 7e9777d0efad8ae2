"""Every expert placement on the hybrid families (tiny Qwen3.5-MoE and Qwen3-Next presets, fp32): the engine's
greedy tokens equal the DenseExecutor reference's, prompt logits close, with the per-layer-kind cache, prompt
chunks (state carried) and a second request on the same cache (state reset)."""

import pytest
import torch

from tests.experts.placement_parity import assert_placement_matches, preset_fixtures

PRESETS = ("tiny-qwen3.5-moe", "tiny-qwen3-next")
PLACEMENTS = ["gpu", "cpu", "layers:2", "hot:0", "hot:5", "cache:0slots", "cache:20slots:lru",
              "cache:24slots:auto", "0=cpu,1-3=slots4@lru", "0-1=gpu,2-3=cpu"]


loaded, reference = preset_fixtures(PRESETS)


@pytest.mark.parametrize("text", PLACEMENTS)
def test_every_placement_matches_the_reference(loaded, reference, text):
    assert_placement_matches(loaded, reference, text)



def test_vram_accounting_counts_the_per_layer_kind_cache(loaded):
    from hotexperts.engine.engine import vram_reserved
    from hotexperts.models.cache import cache_bytes

    parts = vram_reserved(loaded, 64, torch.float32, torch.device("cpu"))
    assert parts["kv"] == cache_bytes(loaded.cfg, 64, torch.float32)
    kv = loaded.model.new_kv_cache(64)
    assert parts["kv"] == sum(b.numel() * b.element_size() for n, b in kv.named_buffers() if n != "positions")
