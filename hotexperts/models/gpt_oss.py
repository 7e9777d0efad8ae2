"""GPT-OSS (openai/gpt-oss-120b, gpt-oss-20b): attention sinks, sliding window on alternate layers, YaRN RoPE,
biases everywhere, experts with biases and a clamped SwiGLU, a biased top-k-then-softmax router.

HF model_type "gpt_oss" (GptOssForCausalLM), GGUF architecture "gpt-oss"; MoE block `mlp`. Facts from
transformers 5.24 (models/gpt_oss) and llama.cpp's converter (conversion GptOssModel, gguf 0.19 constants):
    attention   q/k/v/o biases (attention_bias), `self_attn.sinks` [H]: one learned logit per head in the
                softmax, dropped after it; layer_types "sliding_attention" (window `sliding_window`, 128) /
                "full_attention", default alternating from a sliding layer 0; RoPE YaRN (factor 32,
                original 4096, beta 32 / 1, truncate false, theta 150000), cos/sin scaled by 0.1 ln(32) + 1
    router      `mlp.router` Linear with bias [E, D] + [E] (ours: `mlp.gate`); top-k of the logits, softmax
                over the k selected (= our norm_topk_prob path)
    experts     `mlp.experts.gate_up_proj` [E, D, 2I], gate/up INTERLEAVED along 2I (gate = [..., ::2],
                up = [..., 1::2]), `gate_up_proj_bias` [E, 2I] likewise; `down_proj` [E, I, D] (x @ W),
                `down_proj_bias` [E, D]; h = (clamp(u, -7, 7) + 1) * g' sigmoid(1.702 g'), g' = min(g, 7)
                (weights.ExpertAct "swiglu_oai"). Ours: w13 [E, 2I, D] gate rows then up rows, b13 [E, 2I]
                likewise (LayerExperts), the down bias as the MoE block's `down_bias` [E, D]
    GGUF        gate/up split (`ffn_gate_exps` / `ffn_up_exps` .weight and .bias), `ffn_down_exps.bias`,
                `attn_sinks.weight`, the post-attention norm as `post_attention_norm`, keys
                `attention.sliding_window`, `expert_feed_forward_length`, rope.scaling.{type yarn, factor,
                original_context_length}; llama.cpp fixes alpha / limit and the alternating window pattern
The published HF checkpoints keep experts in MXFP4 (`*_blocks`, `*_scales`): not read from HF directories yet
(the LUT4 expert format holds MXFP4 for GGUF files, loading/gguf_quants.py, but the HF names are not
mapped); a dequantized (bf16) checkpoint or a GGUF loads.
"""

from __future__ import annotations

import torch

from hotexperts.config import ModelConfig, YarnRope
from hotexperts.errors import ModelLoadError
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config
from hotexperts.models.gguf_config import GGUFConfig
from hotexperts.models.naming import ExpertRef, WeightRef

MODEL_TYPE = "gpt_oss"
REQUIRED = (*naming.BASE_REQUIRED, "intermediate_size")
GGUF_NAMES = {"attn_sinks.weight": "self_attn.sinks",
              "post_attention_norm.weight": "post_attention_layernorm.weight",
              "ffn_down_exps.bias": "mlp.down_bias"}
_rename = naming.make_rename("mlp")


def layer_types(d: dict) -> tuple[str, ...]:
    """HF's layer_types, or its default: sliding on even layers, full on odd ones."""
    n = int(d["num_hidden_layers"])
    alternating = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    types = d.get("layer_types") or alternating
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ModelLoadError(f"gpt_oss layer_types must be {n} of sliding_attention / full_attention")
    return tuple(types)


def rope(d: dict) -> tuple[float, YarnRope | None]:
    """(theta, YaRN) from v5 `rope_parameters` or v4 `rope_scaling` + `rope_theta`."""
    p = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    theta = float(p.get("rope_theta") or d.get("rope_theta") or 150000.0)
    kind = p.get("rope_type") or p.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ModelLoadError(f"gpt_oss rope type {kind!r} is not supported (yarn or default)")
    return theta, YarnRope(float(p["factor"]), int(p.get("original_max_position_embeddings") or 4096),
                           float(p.get("beta_fast") or 32.0), float(p.get("beta_slow") or 1.0),
                           bool(p.get("truncate", True)), p.get("attention_factor"))


def config_from_hf(d: dict) -> ModelConfig:
    naming.require(d, *REQUIRED, model_type=MODEL_TYPE)
    bias = bool(d.get("attention_bias", True))
    theta, yarn = rope(d)
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d),
        num_experts=naming.num_experts(d), moe_intermediate_size=int(d["intermediate_size"]),
        moe_layers=tuple(range(int(d["num_hidden_layers"]))), norm_topk_prob=True,
        attention_bias=bias, rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=theta,
        rope_yarn=yarn, sliding_window=int(d.get("sliding_window") or 128), layer_types=layer_types(d),
        attention_sinks=True, router_bias=True, expert_bias=True, expert_act="swiglu_oai",
        swiglu_alpha=float(d.get("swiglu_alpha", 1.702)), swiglu_limit=float(d.get("swiglu_limit", 7.0)),
        extra={"o_proj_bias": bias})


def rename(hf_name: str) -> WeightRef:
    """router -> gate; stacked experts and their biases; MXFP4 checkpoints refused with the reason."""
    if hf_name.endswith(("_blocks", "_scales")):
        raise ModelLoadError(f"{hf_name}: MXFP4 expert checkpoints are not supported yet; use a GGUF or a "
                             "bf16 (dequantized) checkpoint")
    head, _, tail = hf_name.partition(".mlp.")
    if tail.startswith("router."):
        return f"{head}.mlp.gate.{tail[len('router.'):]}"
    if tail == "experts.down_proj_bias":
        return f"{head}.mlp.down_bias"
    if tail == "experts.gate_up_proj_bias":
        return ExpertRef(int(head.rsplit(".", 1)[1]), None, "gate_up_bias")
    return _rename(hf_name)


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Interleaved gate/up along `dim` (gate at even, up at odd indices) -> gate block then up block."""
    n = t.shape[dim]
    return t.index_select(dim, torch.cat((torch.arange(0, n, 2), torch.arange(1, n, 2))).to(t.device))


def from_hf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """HF expert layouts -> ours: gate_up [E, D, 2I] -> [E, 2I, D] de-interleaved, its bias [E, 2I]
    de-interleaved, down [E, I, D] -> [E, D, I]."""
    if name.endswith("experts.gate_up_proj"):
        return _deinterleave(t.transpose(1, 2), 1)
    if name.endswith("experts.gate_up_proj_bias"):
        return _deinterleave(t, 1)
    if name.endswith("experts.down_proj"):
        return t.transpose(1, 2)
    return t


def hf_from_gguf(g: GGUFConfig) -> dict:
    factor = g.key("rope.scaling.factor")
    scaling = {} if factor is None else {"rope_scaling": {
        "rope_type": "yarn", "factor": float(factor), "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": int(g.key("rope.scaling.original_context_length") or 4096)}}
    d = {k: v for k, v in g.common().items() if k != "rope_scaling"}
    return {"model_type": MODEL_TYPE, **d, **scaling, "num_local_experts": g.num_experts,
            "intermediate_size": g.expert_width, "attention_bias": g.has("blk.0.attn_q.bias"),
            "sliding_window": int(g.key("attention.sliding_window") or 128)}


def gguf_metadata(cfg: ModelConfig) -> dict:
    y = cfg.rope_yarn
    meta = {"attention.sliding_window": cfg.sliding_window,
            "expert_feed_forward_length": cfg.moe_intermediate_size}
    if y is not None:
        meta |= {"rope.scaling.type": "yarn", "rope.scaling.factor": y.factor,
                 "rope.scaling.original_context_length": y.original_max_position_embeddings}
    return meta


TINY = tiny_hf_config(MODEL_TYPE, "GptOssForCausalLM", num_local_experts=16, num_experts_per_tok=4,
                      intermediate_size=96, head_dim=32, attention_bias=True, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention"] * 2, swiglu_alpha=1.702,
                      swiglu_limit=7.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                      router_aux_loss_coef=0.001, output_router_logits=False,
                      rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                       "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                       "original_max_position_embeddings": 64})
TINY.pop("rope_theta")

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="gpt-oss", config_from_hf=config_from_hf,
                    hf_from_gguf=hf_from_gguf, rename=rename, from_hf=from_hf, gguf_metadata=gguf_metadata,
                    gguf_names=GGUF_NAMES, tiny=TINY)
