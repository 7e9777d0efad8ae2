"""Mixtral (8x7B, 8x22B): every layer MoE, top-k renormalised, experts w1 (gate) / w3 (up) / w2 (down).

HF model_type "mixtral"; GGUF architecture "llama" (with experts), whose Q/K rows llama.cpp's convert
permutes for its rope (interleaved pairs; HF: halves): from_gguf undoes it, to_gguf applies it. Our MoE
block is `block_sparse_moe` (the on-disk spelling); transformers>=5 modules call it `mlp`, and rename()
maps both. ARCH is its Architecture (models/architecture.py).
"""

from __future__ import annotations

import torch

from hotexperts.config import ModelConfig
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config
from hotexperts.models.gguf_config import GGUFConfig

MODEL_TYPE = "mixtral"
MOE_BLOCK = "block_sparse_moe"
REQUIRED = (*naming.BASE_REQUIRED, "intermediate_size")


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


def hf_from_gguf(g: GGUFConfig) -> dict:
    return {"model_type": MODEL_TYPE, **g.common(), "num_local_experts": g.num_experts,
            "intermediate_size": g.expert_width, "sliding_window": g.key("attention.sliding_window")}


def gguf_metadata(cfg: ModelConfig) -> dict[str, int]:
    """The sliding window, when the config has one (Mistral-style; llama.cpp reads the same key)."""
    return {"attention.sliding_window": cfg.sliding_window} if cfg.sliding_window else {}


def _qk_heads(cfg: ModelConfig, name: str) -> int | None:
    """Heads of a Q or K projection (our name), None for every other tensor."""
    if ".self_attn.q_proj." in name:
        return cfg.num_heads
    return cfg.num_kv_heads if ".self_attn.k_proj." in name else None


def from_gguf(cfg: ModelConfig, name: str, w: torch.Tensor) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: per head, interleaved rope pairs -> HF's two halves."""
    if (heads := _qk_heads(cfg, name)) is None:
        return w
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """llama.cpp's convert permutation of Q/K rows: HF's rope halves -> interleaved pairs, per head."""
    if (heads := _qk_heads(cfg, name)) is None:
        return t
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


TINY = tiny_hf_config(MODEL_TYPE, "MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2,
                      rms_norm_eps=1e-5, sliding_window=None, bos_token_id=1, eos_token_id=2,
                      router_aux_loss_coef=0.02, output_router_logits=False)

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="llama", config_from_hf=config_from_hf,
                    hf_from_gguf=hf_from_gguf, moe_block=MOE_BLOCK, hf_expert_names=("w1", "w3", "w2"),
                    from_gguf=from_gguf,
                    to_gguf=to_gguf, gguf_metadata=gguf_metadata, tiny=TINY)
