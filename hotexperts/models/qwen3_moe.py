"""Qwen3-MoE (e.g. Qwen3-30B-A3B): per-head q/k RMSNorm, no shared expert, optional dense layers.

HF model_type "qwen3_moe", GGUF architecture "qwen3moe"; MoE block `mlp`. ARCH is its Architecture
(models/architecture.py); the Qwen helpers here (config_from_hf's checks and routed-expert fields, which
layers are MoE, no sliding window, the GGUF fields the Qwen MoE families share) serve qwen2_moe and
qwen3_next too.
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.errors import ModelLoadError
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config
from hotexperts.models.gguf_config import GGUFConfig

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


def check_qwen_config(d: dict, required: tuple[str, ...], model_type: str) -> None:
    """What every Qwen MoE family checks first: its required keys, the activation, no sliding window."""
    naming.require(d, *required, model_type=model_type)
    naming.check_activation(d)
    check_no_sliding(d)


def qwen_moe_fields(d: dict, norm_topk_default: bool) -> dict:
    """The routed-expert ModelConfig fields every Qwen MoE family reads the same way (experts, expert width,
    which layers are MoE, the dense-MLP width); norm_topk_default: the family's norm_topk_prob when unset."""
    return dict(num_experts=naming.num_experts(d), moe_intermediate_size=int(d["moe_intermediate_size"]),
                moe_layers=qwen_moe_layers(d), intermediate_size=int(d.get("intermediate_size") or 0),
                norm_topk_prob=bool(d.get("norm_topk_prob", norm_topk_default)))


def config_from_hf(d: dict) -> ModelConfig:
    check_qwen_config(d, REQUIRED, MODEL_TYPE)
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d), **qwen_moe_fields(d, norm_topk_default=False),
        qk_norm="head", attention_bias=bias,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=naming.rope_theta(d, 10000.0),
        extra={"o_proj_bias": bias},
    )


def qwen_gguf_fields(g: GGUFConfig) -> dict:
    """HF keys both Qwen MoE families read from a GGUF: expert width, dense layers, dense-MLP width."""
    return {"moe_intermediate_size": g.expert_width, "decoder_sparse_step": 1, "use_sliding_window": False,
            "mlp_only_layers": [i for i in range(g.layers) if i not in g.moe_layers],
            "intermediate_size": int(g.key("feed_forward_length") or 0)}


def qwen_gguf_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    return {"expert_feed_forward_length": cfg.moe_intermediate_size}


def hf_from_gguf(g: GGUFConfig) -> dict:
    return {"model_type": MODEL_TYPE, **g.common(), **qwen_gguf_fields(g), "num_experts": g.num_experts,
            "norm_topk_prob": bool(g.key("expert_weights_norm", True)),       # llama.cpp's qwen3moe default
            "attention_bias": g.has("blk.0.attn_q.bias")}


TINY = tiny_hf_config(MODEL_TYPE, "Qwen3MoeForCausalLM", num_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[], attention_bias=False, sliding_window=None, use_sliding_window=False,
                      max_window_layers=4, bos_token_id=0, eos_token_id=2, router_aux_loss_coef=0.001,
                      output_router_logits=False)

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="qwen3moe", config_from_hf=config_from_hf,
                    hf_from_gguf=hf_from_gguf, gguf_metadata=qwen_gguf_metadata, tiny=TINY)
