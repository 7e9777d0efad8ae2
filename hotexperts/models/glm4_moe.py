"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (zai-org): sigmoid group router with a score-correction bias, a plain
(ungated) shared expert, leading dense layers, partial RoPE, q/k/v bias, optional q/k norm.

HF model_type "glm4_moe" (Glm4MoeForCausalLM), GGUF architecture "glm4moe"; MoE block `mlp`. Facts from
transformers 5.24 (models/glm4_moe) and gguf 0.19's constants / llama.cpp's converter:
    router      `mlp.gate.weight` [E, D] (float32 math), `mlp.gate.e_score_correction_bias` [E]: scores =
                sigmoid(logits); experts chosen on scores + bias, top-k within the `topk_group` best of
                `n_group` groups (a group scored by its two best); weights = the chosen plain scores,
                renormalised if norm_topk_prob (+1e-20), times routed_scaling_factor
                (layers.SigmoidGroupRouter)
    shared      `mlp.shared_experts` (ours: `mlp.shared_expert`): a SwiGLU of moe_intermediate_size *
                n_shared_experts, added without a gate (transformers' Glm4MoeMLP)
    layers      the first `first_k_dense_replace` layers are a dense SwiGLU `mlp` of intermediate_size; the
                MTP layer (`model.layers.{L}`, num_nextn_predict_layers) is skipped with one warning
    attention   q/k/v bias = attention_bias, o_proj without; q/k RMSNorm per head if use_qk_norm (before
                RoPE); RoPE on the first partial_rotary_factor (default 0.5) of each head, rotate_half
    GGUF        `exp_probs_b.bias` (the correction bias), `post_attention_norm`, shared `ffn_*_shexp`; keys
                leading_dense_block_count, expert_feed_forward_length, expert_shared_count,
                expert_weights_scale, expert_weights_norm, expert_group_count / expert_group_used_count,
                rope.dimension_count (= partial rotary dims), nextn_predict_layers
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config
from hotexperts.models.gguf_config import GGUFConfig
from hotexperts.models.naming import WeightRef

MODEL_TYPE = "glm4_moe"
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "n_routed_experts|num_local_experts|num_experts", "num_experts_per_tok", "moe_intermediate_size")
GGUF_NAMES = {"exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
              "post_attention_norm.weight": "post_attention_layernorm.weight"}
_rename = naming.make_rename("mlp")


def num_experts(d: dict) -> int:
    return int(naming.get_any(d, "n_routed_experts", "num_local_experts", "num_experts"))


def partial_rotary(d: dict) -> float:
    params = d.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 0.5)


def config_from_hf(d: dict) -> ModelConfig:
    naming.require(d, *REQUIRED, model_type=MODEL_TYPE)
    naming.check_activation(d)
    L, dense = int(d["num_hidden_layers"]), int(d.get("first_k_dense_replace", 1))
    I = int(d["moe_intermediate_size"])
    return ModelConfig(
        model_type=MODEL_TYPE, **{**naming.common_fields(d), "top_k": int(d["num_experts_per_tok"])},
        num_experts=num_experts(d), moe_intermediate_size=I, moe_layers=tuple(range(dense, L)),
        intermediate_size=int(d.get("intermediate_size") or 0),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        shared_expert_intermediate_size=I * int(d.get("n_shared_experts", 1) or 0), shared_expert_gated=False,
        router="sigmoid_group", n_group=int(d.get("n_group") or 1), topk_group=int(d.get("topk_group") or 1),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        qk_norm="head" if d.get("use_qk_norm") else "none",
        attention_bias=bool(d.get("attention_bias", False)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=naming.rope_theta(d, 10000.0),
        partial_rotary_factor=partial_rotary(d), extra={"o_proj_bias": False})


def rename(hf_name: str) -> WeightRef:
    """`mlp.shared_experts.` -> `mlp.shared_expert.`; the rest as every family (MTP layers: the loader skips
    layers past the decoder's)."""
    return _rename(hf_name.replace(".mlp.shared_experts.", ".mlp.shared_expert."))


def hf_from_gguf(g: GGUFConfig) -> dict:
    shexp = f"blk.{g.moe_layers[0]}.ffn_gate_shexp.weight"
    shared = g.rows(shexp) if g.has(shexp) else 0
    return {"model_type": MODEL_TYPE, **g.common(partial_rope=True), "n_routed_experts": g.num_experts,
            "moe_intermediate_size": g.expert_width, "first_k_dense_replace": g.moe_layers[0],
            "intermediate_size": int(g.key("feed_forward_length") or 0),
            "n_shared_experts": shared // g.expert_width if shared else 0,
            "norm_topk_prob": bool(g.key("expert_weights_norm", True)),
            "routed_scaling_factor": float(g.key("expert_weights_scale", 1.0)),
            "n_group": int(g.key("expert_group_count") or 1),
            "topk_group": int(g.key("expert_group_used_count") or 1),
            "attention_bias": g.has("blk.0.attn_q.bias"), "use_qk_norm": g.has("blk.0.attn_q_norm.weight")}


def gguf_metadata(cfg: ModelConfig) -> dict:
    return {"expert_feed_forward_length": cfg.moe_intermediate_size,
            "leading_dense_block_count": cfg.moe_layers[0],
            "expert_shared_count": cfg.shared_expert_intermediate_size // cfg.moe_intermediate_size,
            "expert_weights_scale": cfg.routed_scaling_factor, "expert_weights_norm": cfg.norm_topk_prob,
            "expert_gating_func": 2, "expert_group_count": cfg.n_group,
            "expert_group_used_count": cfg.topk_group}


TINY = tiny_hf_config(MODEL_TYPE, "Glm4MoeForCausalLM", n_routed_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
                      topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True,
                      attention_bias=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                      num_nextn_predict_layers=0, output_router_logits=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                       "partial_rotary_factor": 0.5})
TINY.pop("rope_theta")

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="glm4moe", config_from_hf=config_from_hf,
                    hf_from_gguf=hf_from_gguf, rename=rename, gguf_metadata=gguf_metadata,
                    gguf_names=GGUF_NAMES, tiny=TINY)
