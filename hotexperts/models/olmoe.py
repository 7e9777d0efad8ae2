"""OLMoE (allenai/OLMoE-1B-7B): q/k RMSNorm over the whole projection, optional clip_qkv, every layer MoE.

HF model_type "olmoe", GGUF architecture "olmoe" (clip_qkv: `olmoe.attention.clamp_kqv`); MoE block `mlp`.
ARCH is its Architecture (models/architecture.py).
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config
from hotexperts.models.gguf_config import GGUFConfig

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


def hf_from_gguf(g: GGUFConfig) -> dict:
    clip = g.key("attention.clamp_kqv")
    return {"model_type": MODEL_TYPE, **g.common(), "num_experts": g.num_experts,
            "intermediate_size": g.expert_width,
            "norm_topk_prob": bool(g.key("expert_weights_norm", False)),        # llama.cpp's olmoe default
            "attention_bias": g.has("blk.0.attn_q.bias"), "clip_qkv": None if clip is None else float(clip)}


def gguf_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    return {} if cfg.clip_qkv is None else {"attention.clamp_kqv": cfg.clip_qkv}


TINY = tiny_hf_config(MODEL_TYPE, "OlmoeForCausalLM", num_experts=16, num_experts_per_tok=4,
                      intermediate_size=64, num_key_value_heads=4, norm_topk_prob=False, clip_qkv=None,
                      attention_bias=False, rms_norm_eps=1e-5, eos_token_id=0, pad_token_id=1,
                      router_aux_loss_coef=0.01, output_router_logits=False)
TINY.pop("head_dim")                  # OLMoE configs have none: hidden_size // heads

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="olmoe", config_from_hf=config_from_hf,
                    hf_from_gguf=hf_from_gguf, gguf_metadata=gguf_metadata, tiny=TINY)
