"""The Qwen helpers in models/qwen3_moe.py that qwen2_moe and qwen3_next share: config_from_hf's checks
(required keys, activation, no sliding window) and routed-expert fields (which layers are MoE, each family's
norm_topk_prob default)."""

from __future__ import annotations

import pytest

from hotexperts.errors import ModelLoadError
from hotexperts.models import qwen2_moe, qwen3_moe, qwen3_next

QWEN = {"qwen3_moe": (qwen3_moe, False), "qwen2_moe": (qwen2_moe, False), "qwen3_next": (qwen3_next, True)}


@pytest.mark.parametrize("model_type", sorted(QWEN))
def test_routed_expert_fields_and_the_family_norm_topk_default(model_type):
    module, norm_default = QWEN[model_type]
    d = {k: v for k, v in module.ARCH.tiny.items() if k != "norm_topk_prob"}
    n = d["num_hidden_layers"]
    d |= {"mlp_only_layers": [0], "decoder_sparse_step": 1, "intermediate_size": 24}
    cfg = module.config_from_hf(d)
    assert cfg.norm_topk_prob is norm_default
    assert cfg.moe_layers == tuple(range(1, n)) and cfg.intermediate_size == 24
    assert cfg.num_experts == d["num_experts"] and cfg.moe_intermediate_size == d["moe_intermediate_size"]
    assert module.config_from_hf(d | {"norm_topk_prob": not norm_default}).norm_topk_prob is not norm_default


@pytest.mark.parametrize("model_type", sorted(QWEN))
def test_every_qwen_family_refuses_a_sliding_window_and_names_a_missing_key(model_type):
    module, _ = QWEN[model_type]
    with pytest.raises(ModelLoadError, match="use_sliding_window"):
        module.config_from_hf(module.ARCH.tiny | {"use_sliding_window": True})
    d = {k: v for k, v in module.ARCH.tiny.items() if k != "moe_intermediate_size"}
    with pytest.raises(ModelLoadError, match="moe_intermediate_size"):
        module.config_from_hf(d)
