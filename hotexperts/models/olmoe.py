"""OLMoE (allenai/OLMoE-1B-7B): q/k RMSNorm over the whole projection, optional clip_qkv, every layer MoE.

HF model_type "olmoe"; MoE block `mlp`. ARCH is its Architecture (models/architecture.py).
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config

MODEL_TYPE = "olmoe"
REQUIRED = (*naming.BASE_REQUIRED, "intermediate_size")


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


TINY = tiny_hf_config(MODEL_TYPE, "OlmoeForCausalLM", num_experts=16, num_experts_per_tok=4,
                      intermediate_size=64, num_key_value_heads=4, norm_topk_prob=False, clip_qkv=None,
                      attention_bias=False, rms_norm_eps=1e-5, eos_token_id=0, pad_token_id=1,
                      router_aux_loss_coef=0.01, output_router_logits=False)
TINY.pop("head_dim")                  # OLMoE configs have none: hidden_size // heads

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="olmoe", config_from_hf=config_from_hf,
                    rename=naming.make_rename("mlp"), tiny=TINY)
