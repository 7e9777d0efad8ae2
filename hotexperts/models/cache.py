"""The per-layer-kind cache of a hybrid model: K/V for attention layers, conv + recurrent state for Gated
DeltaNet layers (Qwen3.5-MoE, Qwen3-Next), behind KVCache's interface.

    cache = LayerKindCache(cfg, max_seq, dtype, device)
    cache.layer(l) -> (kc, vc) [Hkv, S, hd] for an attention layer, (conv [C, Kc-1], state [Hv, dk, dv]
                      float32) for a linear one: this layer's views, written in place by the layer
    cache.mask(input_pos), cache.positions, cache.max_seq      as KVCache (attention layers only read them)
    cache_bytes(cfg, max_seq, dtype) -> bytes of the cache new_cache(cfg, ...) allocates (the VRAM budget)
    new_cache(cfg, max_seq, dtype, device) -> KVCache for attention-only models, else LayerKindCache

The recurrent state is float32 whatever the model dtype (the delta rule accumulates in it; transformers'
kernels return it in float32); the conv state keeps the model dtype. Buffers are allocated once: a new
sequence (first position 0) zeroes a linear layer's state on the device (models/deltanet.py).
"""

from __future__ import annotations

import torch

from hotexperts.config import ModelConfig
from hotexperts.models.layers import KVCache


class LayerKindCache(KVCache):
    def __init__(self, cfg: ModelConfig, max_seq: int, dtype: torch.dtype, device=None):
        attn, lin, s = cfg.attention_layers, cfg.linear_layers, cfg.linear
        super().__init__(len(attn), max_seq, cfg.num_kv_heads, cfg.head_dim, dtype, device)
        self.index = {l: i for i, l in enumerate(attn)} | {l: i for i, l in enumerate(lin)}
        self.linear = frozenset(lin)
        conv = (len(lin), s.conv_dim, s.conv_kernel - 1)
        rec = (len(lin), s.num_value_heads, s.key_head_dim, s.value_head_dim)
        self.register_buffer("conv", torch.zeros(conv, dtype=dtype, device=device), persistent=False)
        self.register_buffer("state", torch.zeros(rec, dtype=torch.float32, device=device), persistent=False)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.index[layer]
        if layer in self.linear:
            return self.conv[i], self.state[i]
        return self.k[i], self.v[i]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return super().update(self.index[layer], input_pos, k, v)


def cache_bytes(cfg: ModelConfig, max_seq: int, dtype: torch.dtype) -> int:
    kv = 2 * len(cfg.attention_layers) * cfg.num_kv_heads * max_seq * cfg.head_dim * dtype.itemsize
    if not cfg.linear_layers:
        return kv
    s, n = cfg.linear, len(cfg.linear_layers)
    conv = n * s.conv_dim * (s.conv_kernel - 1) * dtype.itemsize
    return kv + conv + n * s.num_value_heads * s.key_head_dim * s.value_head_dim * 4


def new_cache(cfg: ModelConfig, max_seq: int, dtype: torch.dtype, device=None) -> KVCache:
    if not cfg.linear_layers:
        return KVCache(cfg.num_layers, max_seq, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    return LayerKindCache(cfg, max_seq, dtype, device)
