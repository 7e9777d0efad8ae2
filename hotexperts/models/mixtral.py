"""Mixtral (8x7B, 8x22B): every layer MoE, top-k renormalised, experts w1 (gate) / w3 (up) / w2 (down).

Our MoE block is `block_sparse_moe` (the on-disk spelling); transformers>=5 modules call it `mlp`, and
rename() maps both. config_from_hf(d) -> ModelConfig; rename(hf_name) -> str | ExpertRef | None.
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.models import naming

MODEL_TYPE = "mixtral"
REQUIRED = (*naming.BASE_REQUIRED, "intermediate_size")

rename = naming.make_rename("block_sparse_moe", naming.MIXTRAL_WHICH)


def config_from_hf(d: dict) -> ModelConfig:
    naming.require(d, *REQUIRED, model_type=MODEL_TYPE)
    naming.check_activation(d)
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d),
        num_experts=naming.num_experts(d),
        moe_intermediate_size=int(d["intermediate_size"]),
        moe_layers=tuple(range(int(d["num_hidden_layers"]))),
        norm_topk_prob=True,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=naming.rope_theta(d, 1e6),
        sliding_window=d.get("sliding_window") or None,
    )
