"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): qkv bias, sigmoid-gated shared expert, optional dense layers.

HF model_type "qwen2_moe", GGUF architecture "qwen2moe"; MoE block `mlp` (with `shared_expert`,
`shared_expert_gate`). ARCH is its Architecture (models/architecture.py).
"""

from __future__ import annotations

import torch

from hotexperts.config import ModelConfig
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config
from hotexperts.models.gguf_config import GGUFConfig
from hotexperts.models.qwen3_moe import (
    check_qwen_config,
    qwen_gguf_fields,
    qwen_gguf_metadata,
    qwen_moe_fields,
)

MODEL_TYPE = "qwen2_moe"
REQUIRED = (*naming.BASE_REQUIRED, "moe_intermediate_size")


def config_from_hf(d: dict) -> ModelConfig:
    check_qwen_config(d, REQUIRED, MODEL_TYPE)
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d), **qwen_moe_fields(d, norm_topk_default=False),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
        attention_bias=bool(d.get("qkv_bias", True)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=naming.rope_theta(d, 10000.0),
        extra={"o_proj_bias": False},
    )


def hf_from_gguf(g: GGUFConfig) -> dict:
    shexp = f"blk.{g.moe_layers[0]}.ffn_gate_shexp.weight"
    return {"model_type": MODEL_TYPE, **g.common(), **qwen_gguf_fields(g), "num_experts": g.num_experts,
            "norm_topk_prob": bool(g.key("expert_weights_norm", False)),     # llama.cpp's qwen2moe default
            "qkv_bias": g.has("blk.0.attn_q.bias"),
            "shared_expert_intermediate_size": g.rows(shexp) if g.has(shexp) else 0}


def gguf_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    shared = cfg.shared_expert_intermediate_size
    return {**qwen_gguf_metadata(cfg), **({"expert_shared_feed_forward_length": shared} if shared else {})}


def to_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """llama.cpp stores the shared-expert gate [1, D] as [D] (transformers' GGUF reader expects that)."""
    return t.reshape(-1) if name.endswith("shared_expert_gate.weight") else t


TINY = tiny_hf_config(MODEL_TYPE, "Qwen2MoeForCausalLM", num_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=64, shared_expert_intermediate_size=256, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[], sliding_window=None,
                      use_sliding_window=False, max_window_layers=4, bos_token_id=0, eos_token_id=2,
                      router_aux_loss_coef=0.001, output_router_logits=False)

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="qwen2moe", config_from_hf=config_from_hf,
                    hf_from_gguf=hf_from_gguf, gguf_metadata=gguf_metadata, to_gguf=to_gguf, tiny=TINY)
