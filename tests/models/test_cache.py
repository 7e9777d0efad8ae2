"""models/cache.py SlotKVCache: slot views alias the flat buffers, per-row masks open only the row's own
slot (causal, sliding window), flat write indices, sizes and bad slots."""

import pytest
import torch

from hotexperts.config import ModelConfig
from hotexperts.errors import HotExpertsError
from hotexperts.models import get_arch
from hotexperts.models.cache import LayerKindCache, SlotKVCache, cache_bytes, new_cache

CFG = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, num_experts=4, top_k=2, moe_intermediate_size=16,
                  moe_layers=(0, 1), qk_norm="head", eos_token_ids=())


def test_slot_view_writes_land_in_its_span_of_the_flat_axis():
    cache = SlotKVCache(CFG, num_slots=3, max_seq=5, dtype=torch.float32)
    view = cache.slot(1)
    k = torch.ones(2, 2, 8)                                    # [Hkv, T=2, hd]
    view.update(0, torch.tensor([0, 3]), k, 2 * k)
    kc, vc = cache.layer(0)                                    # [Hkv, N*S, hd]
    written = kc[0, :, 0].nonzero().flatten().tolist()
    assert written == [5 + 0, 5 + 3] and vc[0, 8, 0] == 2
    assert cache.index(torch.tensor([1, 2]), torch.tensor([3, 0])).tolist() == [8, 10]


def test_mask_is_causal_within_each_rows_own_slot():
    cache = SlotKVCache(CFG, num_slots=2, max_seq=4, dtype=torch.float32)
    m = cache.mask(torch.tensor([1, 0]), torch.tensor([2, 0]))
    assert m.tolist() == [[False] * 4 + [True, True, True, False], [True] + [False] * 7]
    w = cache.mask(torch.tensor([0]), torch.tensor([3]), sliding_window=2)
    assert w.tolist() == [[False, False, True, True] + [False] * 4]


def test_hybrid_slots_hold_their_own_linear_states():
    arch = get_arch("qwen3_5_moe")
    cfg = arch.config_from_hf(arch.tiny)
    cache = SlotKVCache(cfg, num_slots=2, max_seq=8, dtype=torch.float32)
    view = cache.slot(1)
    assert isinstance(view, LayerKindCache)
    lin = cfg.linear_layers[0]
    conv, state = view.layer(lin)
    state.fill_(3.0)
    assert cache.state[0, 1].eq(3).all() and cache.state[0, 0].eq(0).all()
    assert cache_bytes(cfg, 8, torch.float32, 2) == 2 * cache_bytes(cfg, 8, torch.float32)


def test_one_slot_has_the_one_sequence_layout_and_size():
    cache = SlotKVCache(CFG, num_slots=1, max_seq=6, dtype=torch.float32)
    single = new_cache(CFG, 6, torch.float32)
    assert cache.slot(0).k.shape == single.k.shape
    nbytes = sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
    assert nbytes == cache_bytes(CFG, 6, torch.float32)


@pytest.mark.parametrize("slots", [0, 17])
def test_bad_slot_counts_and_slots_are_refused(slots):
    with pytest.raises(HotExpertsError, match="1..16"):
        SlotKVCache(CFG, num_slots=slots, max_seq=4, dtype=torch.float32)
    with pytest.raises(HotExpertsError, match="not one of"):
        SlotKVCache(CFG, num_slots=2, max_seq=4, dtype=torch.float32).slot(2)
