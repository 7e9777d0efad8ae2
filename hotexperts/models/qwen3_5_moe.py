"""Qwen3.5-MoE / Qwen3.6-MoE (Qwen3.5-122B-A10B, Qwen3.5-35B-A3B): Qwen3-Next's hybrid decoder with split
DeltaNet projections, every layer MoE, inside a vision-language checkpoint.

HF model_type "qwen3_5_moe" (Qwen3_5MoeForConditionalGeneration: config.json nests the text model's
`text_config` beside `vision_config`; weights `model.language_model.*`, `model.visual.*`, `lm_head.*`,
`mtp.*`) or "qwen3_5_moe_text" (Qwen3_5MoeForCausalLM: `model.*`). GGUF architecture "qwen35moe". We run the
text model: the vision tower and the MTP layer are skipped (the loader warns once, naming them). The layer
kinds, gated attention, partial RoPE and (1 + w) norms are qwen3_next.py's; the DeltaNet projections are
in_proj_qkv / in_proj_z / in_proj_b / in_proj_a (models/deltanet.py layout "split"); the router always
renormalises its top-k (transformers' Qwen3_5MoeTopKRouter).

GGUF (llama.cpp's converter, conversion/qwen.py: Qwen3_5MoeTextModel on _LinearAttentionVReorderBase on
Qwen3NextModel): qwen3_next.py's transforms plus, when Hk != Hv, DeltaNet value heads reordered from HF's
grouped order (v head k*r + j under key head k) to tiled order (j*Hk + k) in in_proj_qkv's V rows,
in_proj_z rows, in_proj_b / in_proj_a rows, A_log, dt_bias, conv1d's V channels and out_proj's columns;
the MTP block is appended as blk.{L}.* / blk.{L}.nextn.* with block_count L + nextn_predict_layers
(models/gguf_config.py leaves those blocks out).
"""

from __future__ import annotations

import torch

from hotexperts.config import ModelConfig
from hotexperts.models import naming, qwen3_next
from hotexperts.models.architecture import Architecture, tiny_hf_config
from hotexperts.models.gguf_config import GGUFConfig
from hotexperts.models.naming import WeightRef

MODEL_TYPE = "qwen3_5_moe"
TEXT_TYPE = "qwen3_5_moe_text"
REQUIRED = qwen3_next.REQUIRED
SKIPPED = ("model.visual.", "mtp.", "model.mtp.")          # vision tower, multi-token-prediction layer
_rename = naming.make_rename("mlp")


def text_config(d: dict) -> dict:
    """The text model's config: `text_config` of the VLM wrapper (top-level keys it lacks added), or d."""
    if "text_config" not in d:
        return d
    outer = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
    return {**outer, **d["text_config"]}


def config_from_hf(d: dict) -> ModelConfig:
    d = text_config(d)
    naming.require(d, *REQUIRED, model_type=MODEL_TYPE)
    naming.check_activation(d)
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d), **qwen3_next.hybrid_fields(d),
        num_experts=naming.num_experts(d), moe_intermediate_size=int(d["moe_intermediate_size"]),
        moe_layers=tuple(range(int(d["num_hidden_layers"]))), norm_topk_prob=True,
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
        attention_bias=bias, rope_theta=naming.rope_theta(d, 10000.0),
        extra={"o_proj_bias": bias, "linear_proj": "split"})


def rename(hf_name: str) -> WeightRef:
    """The VLM's `model.language_model.` prefix -> `model.`; vision and MTP tensors -> None (skipped)."""
    if hf_name.startswith(SKIPPED):
        return None
    if hf_name.startswith("model.language_model."):
        hf_name = "model." + hf_name[len("model.language_model."):]
    return _rename(hf_name)


def hf_from_gguf(g: GGUFConfig) -> dict:
    return {"model_type": MODEL_TYPE, **qwen3_next.hybrid_hf_from_gguf(g)}


def gguf_metadata(cfg: ModelConfig) -> dict:
    return {**qwen3_next.gguf_metadata(cfg), "rope.dimension_sections": [11, 11, 10, 0]}  # llama.cpp needs it


# ---- value-head order: HF grouped (by key head) <-> llama.cpp tiled ----

def _swap_heads(t: torch.Tensor, dim: int, first: int, second: int) -> torch.Tensor:
    """View `dim` as [first, second, rest] head blocks and swap the two head axes."""
    return t.unflatten(dim, (first, second, -1)).transpose(dim, dim + 1).flatten(dim, dim + 2)


def _v_reorder(cfg: ModelConfig, name: str, t: torch.Tensor, to_tiled: bool) -> torch.Tensor:
    s = cfg.linear
    Hk, r = s.num_key_heads, s.num_value_heads // s.num_key_heads
    if r == 1 or ".linear_attn." not in name:
        return t
    order = (Hk, r) if to_tiled else (r, Hk)
    swap = lambda x, dim=0: _swap_heads(x, dim, *order)  # noqa: E731
    qk = 2 * Hk * s.key_head_dim
    if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):             # only the V rows / channels
        return torch.cat((t[:qk], swap(t[qk:])))
    if name.endswith(("in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight", ".A_log", ".dt_bias")):
        return swap(t)
    if name.endswith("out_proj.weight"):
        return swap(t, 1)
    return t


def to_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return qwen3_next.to_gguf(cfg, name, _v_reorder(cfg, name, t, to_tiled=True))


def from_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    return _v_reorder(cfg, name, qwen3_next.from_gguf(cfg, name, t), to_tiled=False)


TINY = tiny_hf_config(TEXT_TYPE, "Qwen3_5MoeForCausalLM", **qwen3_next.TINY_HYBRID, attention_bias=False)

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="qwen35moe", config_from_hf=config_from_hf,
                    hf_from_gguf=hf_from_gguf, rename=rename, gguf_metadata=gguf_metadata,
                    from_gguf=from_gguf, to_gguf=to_gguf, gguf_names=qwen3_next.GGUF_NAMES,
                    aliases=(TEXT_TYPE,), tiny=TINY)
