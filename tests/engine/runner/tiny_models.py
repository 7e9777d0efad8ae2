"""Test helpers: tiny random models of every architecture and layer layout the runner must handle.

    from tiny_models import VARIANTS, build_tiny
    build_tiny(name, seed=0) -> (MoETransformer fp32 eval, {layer: LayerExperts})
names: qwen3_moe (a dense layer), qwen2_moe (shared expert, a dense layer), qwen2_moe_sparse_step (every
other layer dense), mixtral, mixtral_swa (sliding window), olmoe (clip_qkv). Built from each architecture's
tiny config, no transformers. No conftest.py here on purpose: tests/models imports names `from conftest`,
and a second conftest module could shadow it.
"""

from __future__ import annotations

import torch

from hotexperts.engine.presets import random_dense, random_layer
from hotexperts.models import get_arch
from hotexperts.models.transformer import MoETransformer

SMALL = dict(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
             max_position_embeddings=256, bos_token_id=None, eos_token_id=None)
VARIANTS = {   # name -> (model_type, overrides of the architecture's tiny config)
    "qwen3_moe": ("qwen3_moe", dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, intermediate_size=48, mlp_only_layers=[1])),
    "qwen2_moe": ("qwen2_moe", dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=3,
                                    moe_intermediate_size=32, intermediate_size=48,
                                    shared_expert_intermediate_size=40, mlp_only_layers=[0])),
    "qwen2_moe_sparse_step": ("qwen2_moe", dict(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                                                moe_intermediate_size=32, intermediate_size=48,
                                                shared_expert_intermediate_size=40, decoder_sparse_step=2,
                                                norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                intermediate_size=32)),
    "mixtral_swa": ("mixtral", dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                    intermediate_size=32, sliding_window=5)),
    "olmoe": ("olmoe", dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=3, intermediate_size=32,
                            clip_qkv=0.8)),
}


def build_tiny(name: str, seed: int = 0):
    model_type, overrides = VARIANTS[name]
    arch = get_arch(model_type)
    cfg = arch.config_from_hf({**arch.tiny, **SMALL, **overrides})
    gen = torch.Generator().manual_seed(seed)
    model = MoETransformer(cfg)
    model.load_state_dict(random_dense(model, gen, torch.float32, torch.device("cpu")))
    experts = {l: random_layer(cfg, gen, torch.float32) for l in cfg.moe_layers}
    return model.eval(), experts


def decode_steps(step, ex, first: int, n: int):
    """n greedy decode steps through `step` from token `first` at positions 3..: (tokens, logits rows)."""
    tok, toks, rows = first, [], []
    for i in range(n):
        logits = step(tok, 3 + i)
        ex.end_step()
        rows.append(logits.float().clone())
        tok = int(logits.argmax())
        toks.append(tok)
    return toks, rows
