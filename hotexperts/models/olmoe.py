"""OLMoE (allenai/OLMoE-1B-7B): q/k RMSNorm over the whole projection, optional clip_qkv, every layer MoE.

config_from_hf(d) -> ModelConfig; rename(hf_name) -> str | ExpertRef | None (see models/naming.py).
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.models import naming

MODEL_TYPE = "olmoe"
REQUIRED = (*naming.BASE_REQUIRED, "intermediate_size")

rename = naming.make_rename("mlp")


def config_from_hf(d: dict) -> ModelConfig:
    naming.require(d, *REQUIRED, model_type=MODEL_TYPE)
    naming.check_activation(d)
    bias = bool(d.get("attention_bias", False))
    clip = d.get("clip_qkv")
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d),
        num_experts=naming.num_experts(d),
        moe_intermediate_size=int(d["intermediate_size"]),
        moe_layers=tuple(range(int(d["num_hidden_layers"]))),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        qk_norm="full", attention_bias=bias, clip_qkv=None if clip is None else float(clip),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=naming.rope_theta(d, 10000.0),
        extra={"o_proj_bias": bias},
    )
