"""Tiny random transformers models of every supported architecture (fp32, eval) for parity tests."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hotexperts.models import get_arch, split_state_dict
from hotexperts.models.transformer import MoETransformer

COMMON = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=0,
              tie_word_embeddings=False)

# name -> (config class, model class, kwargs)
TINY = {
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
        num_hidden_layers=3, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        intermediate_size=48, shared_expert_intermediate_size=40, mlp_only_layers=[0])),
    "qwen2_moe_sparse_step": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        intermediate_size=48, shared_expert_intermediate_size=40, decoder_sparse_step=2,
        norm_topk_prob=True)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(
        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)),
    "mixtral_swa": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
        sliding_window=5)),
    "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=3, intermediate_size=32, clip_qkv=0.8)),
    # hybrid Gated DeltaNet + gated attention: 3 DeltaNet layers then attention; Hv = 2 Hk (grouped V heads)
    "qwen3_5_moe": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM, dict(
        num_hidden_layers=4, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=40, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)),
    "qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM, dict(
        num_hidden_layers=4, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=40, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, intermediate_size=48,
        mlp_only_layers=[1], norm_topk_prob=True)),
    # sinks, sliding window 5 on even layers, YaRN, biases, clamped SwiGLU experts (2I != D: unambiguous)
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM, dict(
        num_hidden_layers=3, head_dim=16, num_local_experts=8, num_experts_per_tok=2, intermediate_size=48,
        sliding_window=5, rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0,
                                           "beta_slow": 1.0, "truncate": False,
                                           "original_max_position_embeddings": 32, "rope_theta": 150000.0})),
    # sigmoid group router (4 groups, 2 kept), plain shared expert, 1 dense layer, partial rope, q/k norm
    "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, dict(
        num_hidden_layers=3, head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        intermediate_size=48, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        use_qk_norm=True, attention_bias=True)),
}


def _spread_init(model: torch.nn.Module, seed: int) -> None:
    """Larger random weights than HF's std 0.02 so routing and argmax are far from ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                std = 1.0 if "embed" in name else 0.5 / p.shape[-1] ** 0.5 * 2
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):                 # GLM's router bias: not zero
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def build_hf(name: str, seed: int = 0) -> torch.nn.Module:
    cfg_cls, model_cls, kw = TINY[name]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**COMMON, **kw)).eval()
    _spread_init(model, seed)
    return model


def ours_from_hf(hf: torch.nn.Module):
    """transformers model -> (our MoETransformer with its dense weights, {layer: LayerExperts})."""
    d = hf.config.to_dict()
    arch = get_arch(d["model_type"])
    cfg = arch.config_from_hf(d)
    dense, experts = split_state_dict(arch, cfg, hf.state_dict())
    model = MoETransformer(cfg).eval()
    model.load_state_dict(dense, strict=True)
    return model, experts


@pytest.fixture(scope="module")
def hf_models():
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = build_hf(name)
        return cache[name]

    return get


@pytest.fixture(autouse=True, scope="module")
def _every_module_one_thread(one_thread):
    """Every module here runs on one torch thread (tests/conftest.py one_thread: tiny matmuls)."""
