"""Qwen3-MoE (e.g. Qwen3-30B-A3B): per-head q/k RMSNorm, no shared expert, optional dense layers.

HF model_type "qwen3_moe"; MoE block `mlp`. ARCH is its Architecture (models/architecture.py); the
Qwen helpers here (which layers are MoE, no sliding window) serve qwen2_moe too.
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.errors import ModelLoadError
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config

MODEL_TYPE = "qwen3_moe"
REQUIRED = (*naming.BASE_REQUIRED, "moe_intermediate_size")


def qwen_moe_layers(d: dict) -> tuple[int, ...]:
    """Layers with a sparse MoE block: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    dense = set(d.get("mlp_only_layers") or [])
    step = int(d.get("decoder_sparse_step") or 1)
    n = naming.num_experts(d)
    layers = range(int(d["num_hidden_layers"]))
    return tuple(i for i in layers if i not in dense and n > 0 and (i + 1) % step == 0)


def check_no_sliding(d: dict) -> None:
    if d.get("use_sliding_window"):
        raise ModelLoadError("use_sliding_window=true is not supported for Qwen MoE models")


def config_from_hf(d: dict) -> ModelConfig:
    naming.require(d, *REQUIRED, model_type=MODEL_TYPE)
    naming.check_activation(d)
    check_no_sliding(d)
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d),
        num_experts=naming.num_experts(d),
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        moe_layers=qwen_moe_layers(d),
        intermediate_size=int(d.get("intermediate_size") or 0),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        qk_norm="head", attention_bias=bias,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=naming.rope_theta(d, 10000.0),
        extra={"o_proj_bias": bias},
    )


TINY = tiny_hf_config(MODEL_TYPE, "Qwen3MoeForCausalLM", num_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[], attention_bias=False, sliding_window=None, use_sliding_window=False,
                      max_window_layers=4, bos_token_id=0, eos_token_id=2, router_aux_loss_coef=0.001,
                      output_router_logits=False)

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="qwen3moe", config_from_hf=config_from_hf,
                    rename=naming.make_rename("mlp"), tiny=TINY)
