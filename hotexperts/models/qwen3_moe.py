"""Qwen3-MoE (e.g. Qwen3-30B-A3B): per-head q/k RMSNorm, no shared expert, optional dense layers.

config_from_hf(d) -> ModelConfig; rename(hf_name) -> str | ExpertRef | None (see models/naming.py).
"""

from __future__ import annotations

from hotexperts.config import ModelConfig
from hotexperts.errors import ModelLoadError
from hotexperts.models import naming

MODEL_TYPE = "qwen3_moe"
REQUIRED = (*naming.BASE_REQUIRED, "moe_intermediate_size")

rename = naming.make_rename("mlp")


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
