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
def one_thread():
    """Tiny matmuls: one thread avoids oversubscription on shared CI cores (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
