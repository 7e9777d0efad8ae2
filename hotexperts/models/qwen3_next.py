"""Qwen3-Next (Qwen3-Next-80B-A3B): hybrid Gated DeltaNet + gated attention, qwen2_moe's routed experts plus a
sigmoid-gated shared expert.

HF model_type "qwen3_next" (Qwen3NextForCausalLM), GGUF architecture "qwen3next"; MoE block `mlp`. Three of
four layers are `linear_attn` (layer_types, or full_attention_interval: 4), the rest `self_attn` whose q_proj
also yields a sigmoid output gate; RoPE on partial_rotary_factor (0.25) of each head; every RMSNorm but the
DeltaNet's gated one scales by (1 + w). The DeltaNet projections are HF's fused in_proj_qkvz / in_proj_ba
(models/deltanet.py layout "fused"). MTP weights (`mtp.*`) are not used (the loader skips them, warning once).

The hybrid helpers here (layer types, the DeltaNet shape, partial RoPE, llama.cpp's GGUF transforms) serve
qwen3_5_moe.py too. llama.cpp's converter (convert_hf_to_gguf / conversion/qwen.py, Qwen3NextModel) writes
every `*norm.weight` but linear_attn.norm as w + 1, A_log as ssm_a = -exp(A_log), dt_bias as ssm_dt.bias,
conv1d [C, 1, Kc] squeezed to [C, Kc], post_attention_layernorm as post_attention_norm; in_proj_qkvz split
into attn_qkv (q | k | v, heads in order) + attn_gate (current converter) or kept as ssm_in (legacy; llama.cpp
loads both), in_proj_ba as ssm_ba unchanged. Our writer keeps the legacy ssm_in (exactly HF's rows); the
loader reads either (attn_qkv + attn_gate -> layout "qkv_z_ba").
"""

from __future__ import annotations

import torch

from hotexperts.config import LinearAttentionShape, ModelConfig
from hotexperts.errors import ModelLoadError
from hotexperts.models import naming
from hotexperts.models.architecture import Architecture, tiny_hf_config
from hotexperts.models.gguf_config import GGUFConfig
from hotexperts.models.qwen3_moe import check_qwen_config, qwen_gguf_fields, qwen_moe_fields

MODEL_TYPE = "qwen3_next"
LAYER_KINDS = ("linear_attention", "full_attention")
REQUIRED = (*naming.BASE_REQUIRED, "moe_intermediate_size", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim")


# ---- config.json ----

def layer_types(d: dict) -> tuple[str, ...]:
    """HF layer_types, else every full_attention_interval-th layer is attention (transformers' default 4)."""
    n = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if types is None:
        every = int(d.get("full_attention_interval") or 4)
        types = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ModelLoadError(f"layer_types has {len(types)} entries for {n} layers")
    for i, t in enumerate(types):
        if t not in LAYER_KINDS:
            raise ModelLoadError(f"layer_types[{i}] = {t!r} is not supported; supported: "
                                 f"{', '.join(LAYER_KINDS)}")
    return tuple(types)


def partial_rotary(d: dict) -> float:
    params = d.get("rope_parameters") or {}
    return float(d.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 0.25)


def hybrid_fields(d: dict) -> dict:
    """The ModelConfig fields of the hybrid families (layer kinds, DeltaNet shape, gated attention, norms)."""
    if d.get("attn_output_gate") is False:
        raise ModelLoadError("attn_output_gate=false is not supported (transformers always gates)")
    shape = LinearAttentionShape(int(d["linear_num_key_heads"]), int(d["linear_num_value_heads"]),
                                 int(d["linear_key_head_dim"]), int(d["linear_value_head_dim"]),
                                 int(d["linear_conv_kernel_dim"]))
    if shape.num_value_heads % shape.num_key_heads:
        raise ModelLoadError(f"linear_num_value_heads {shape.num_value_heads} is not a multiple of "
                             f"linear_num_key_heads {shape.num_key_heads}")
    return dict(layer_types=layer_types(d), linear=shape, partial_rotary_factor=partial_rotary(d),
                attn_output_gate=True, zero_centered_norm=True, qk_norm="head",
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)))


def config_from_hf(d: dict) -> ModelConfig:
    check_qwen_config(d, REQUIRED, MODEL_TYPE)
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=MODEL_TYPE, **naming.common_fields(d), **hybrid_fields(d),
        **qwen_moe_fields(d, norm_topk_default=True),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
        attention_bias=bias, rope_theta=naming.rope_theta(d, 10000.0),
        extra={"o_proj_bias": bias, "linear_proj": d.get("_linear_proj", "fused")})


# ---- GGUF ----

GGUF_NAMES = {   # GGUF "part.kind" in a block -> ours (llama.cpp's names for these architectures)
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight", "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_in.weight": "linear_attn.in_proj_qkvz.weight", "ssm_ba.weight": "linear_attn.in_proj_ba.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight", "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight", "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_a": "linear_attn.A_log", "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight"}


SSM_KEYS = ("ssm.time_step_rank", "ssm.inner_size", "ssm.group_count", "ssm.state_size", "ssm.conv_kernel")


def hybrid_hf_from_gguf(g: GGUFConfig) -> dict:
    """HF keys of the hybrid families from llama.cpp's metadata; layer kinds from the tensors present."""
    need = [k for k in SSM_KEYS if g.key(k) is None]
    if need:
        keys = ", ".join(f"{g.arch}.{k}" for k in need)
        raise ModelLoadError(f"{g.f.path.name} lacks GGUF metadata: {keys}")
    Hv, inner = int(g.key("ssm.time_step_rank")), int(g.key("ssm.inner_size"))
    types = ["full_attention" if g.has(f"blk.{i}.attn_q.weight") else "linear_attention"
             for i in range(g.layers)]
    shexp = f"blk.{g.moe_layers[0]}.ffn_gate_shexp.weight"
    d = {**g.common(partial_rope=True), **qwen_gguf_fields(g), "num_experts": g.num_experts,
         "linear_num_key_heads": int(g.key("ssm.group_count")), "linear_num_value_heads": Hv,
         "linear_key_head_dim": int(g.key("ssm.state_size")), "linear_value_head_dim": inner // Hv,
         "linear_conv_kernel_dim": int(g.key("ssm.conv_kernel")), "layer_types": types,
         "norm_topk_prob": bool(g.key("expert_weights_norm", True)),
         "shared_expert_intermediate_size": g.rows(shexp) if g.has(shexp) else 0,
         "attention_bias": g.has(f"blk.{types.index('full_attention')}.attn_q.bias")
         if "full_attention" in types else False}
    return d


def hf_from_gguf(g: GGUFConfig) -> dict:
    lin = next((i for i in range(g.layers) if not g.has(f"blk.{i}.attn_q.weight")), None)
    split = lin is not None and g.has(f"blk.{lin}.attn_qkv.weight")
    return {"model_type": MODEL_TYPE, **hybrid_hf_from_gguf(g),
            "_linear_proj": "qkv_z_ba" if split else "fused"}


def full_attention_interval(cfg: ModelConfig) -> int:
    """The interval llama.cpp's metadata can express; other layer patterns cannot be written."""
    attn = cfg.attention_layers
    every = attn[0] + 1 if attn else cfg.num_layers + 1
    if cfg.layer_types != tuple("linear_attention" if (i + 1) % every else "full_attention"
                                for i in range(cfg.num_layers)):
        raise ModelLoadError("GGUF stores layer kinds as a full_attention_interval; this pattern has none")
    return every


def gguf_metadata(cfg: ModelConfig) -> dict[str, int | float]:
    s = cfg.linear
    return {"expert_feed_forward_length": cfg.moe_intermediate_size,
            "expert_shared_feed_forward_length": cfg.shared_expert_intermediate_size,
            "ssm.conv_kernel": s.conv_kernel, "ssm.state_size": s.key_head_dim,
            "ssm.group_count": s.num_key_heads, "ssm.time_step_rank": s.num_value_heads,
            "ssm.inner_size": s.value_head_dim * s.num_value_heads,
            "full_attention_interval": full_attention_interval(cfg)}   # rope.dimension_count: the writer's


def _shifted_norm(name: str) -> bool:
    """llama.cpp stores 1 + w for every zero-centred norm: all `*norm.weight` but the DeltaNet's gated one."""
    return name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight")


def to_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Ours -> llama.cpp's (Qwen3NextModel.modify_tensors): norm w+1, A = -exp(A_log), conv1d squeezed."""
    if _shifted_norm(name):
        return t.float() + 1
    if name.endswith(".A_log"):
        return -t.float().exp()
    if name.endswith("conv1d.weight"):
        return t.reshape(t.shape[0], -1)
    if name.endswith("shared_expert_gate.weight"):
        return t.reshape(-1)                             # llama.cpp's ffn_gate_inp_shexp is [D]
    return t


def from_gguf(cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """llama.cpp's -> ours: the inverse of to_gguf (load_gguf reshapes conv1d / the shared gate back)."""
    if _shifted_norm(name):
        return t.float() - 1
    if name.endswith(".A_log"):
        return (-t.float()).log()
    return t


TINY_HYBRID = dict(   # the tiny presets' hybrid shape: 4 layers (3 DeltaNet + 1 attention), Hv = 2 Hk
    head_dim=32, full_attention_interval=4, partial_rotary_factor=0.25, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
    num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
    bos_token_id=0, eos_token_id=2, router_aux_loss_coef=0.001, output_router_logits=False)
TINY = tiny_hf_config(MODEL_TYPE, "Qwen3NextForCausalLM", **TINY_HYBRID, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False)

ARCH = Architecture(model_type=MODEL_TYPE, gguf_arch="qwen3next", config_from_hf=config_from_hf,
                    hf_from_gguf=hf_from_gguf, rename=naming.make_rename("mlp"), gguf_metadata=gguf_metadata,
                    from_gguf=from_gguf, to_gguf=to_gguf, gguf_names=GGUF_NAMES, tiny=TINY)
