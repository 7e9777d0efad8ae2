"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): qkv bias, sigmoid-gated shared expert, optional dense layers.

config_from_hf(d) -> ModelConfig; rename(hf_name) -> str | ExpertRef | None (see models/naming.py).
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.models import naming
from hotexperts.models.qwen3_moe import check_no_sliding, qwen_moe_layers

MODEL_TYPE = "qwen2_moe"
REQUIRED = (*naming.BASE_REQUIRED, "moe_intermediate_size")

rename = naming.make_rename("mlp")


def config_from_hf(d: dict) -> ModelConfig:
    naming.require(d, *REQUIRED, model_type=MODEL_TYPE)
    naming.check_activation(d)
    check_no_sliding(d)
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d),
        num_experts=naming.num_experts(d),
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        moe_layers=qwen_moe_layers(d),
        intermediate_size=int(d.get("intermediate_size") or 0),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
        attention_bias=bool(d.get("qkv_bias", True)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=naming.rope_theta(d, 10000.0),
        extra={"o_proj_bias": False},
    )
