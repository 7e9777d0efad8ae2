"""The per-layer-kind cache of a hybrid model: K/V for attention layers, conv + recurrent state for Gated
DeltaNet layers (Qwen3.5-MoE, Qwen3-Next), behind KVCache's interface.

    cache = LayerKindCache(cfg, max_seq, dtype, device)
    cache.layer(l) -> (kc, vc) [Hkv, S, hd] for an attention layer, (conv [C, Kc-1], state [Hv, dk, dv]
                      float32) for a linear one: this layer's views, written in place by the layer
    cache.mask(input_pos), cache.positions, cache.max_seq      as KVCache (attention layers only read them)
    cache_bytes(cfg, max_seq, dtype) -> bytes of the cache new_cache(cfg, ...) allocates (the VRAM budget)
    new_cache(cfg, max_seq, dtype, device) -> KVCache for attention-only models, else LayerKindCache
    recurrent_buffers(kv) -> the buffers a forward advances rather than overwrites ([conv, state] of a hybrid
                      model's cache, [] for K/V only): what a CUDA-graph warm-up or a rejected draft must
                      put back (snapshot_recurrent / restore_recurrent)

N sequence slots for batched decoding (engine/batch.py), one flat key axis of N*S positions per layer:
    cache = SlotKVCache(cfg, num_slots=N, max_seq=S, dtype, device)
    cache.slot(s) -> KVCache / LayerKindCache viewing slot s only (no copy): prefill of one sequence, and
                     the batch-1 decode path, write it as they write a one-sequence cache
    cache.layer(l) -> attention layer: kc, vc [Hkv, N*S, hd] (slot s holds flat positions s*S .. s*S+S-1);
                      linear layer: conv [N, C, Kc-1], state [N, Hv, dk, dv] (indexed by slot)
    cache.index(slots [B], positions [B]) -> [B] flat write positions slots*S + positions
    cache.mask(slots [B], positions [B], sliding_window=None) -> [B, N*S] bool: row b attends to its own
                      slot's positions <= positions[b] (and within the window), nothing of other slots
With N = 1 the buffers are laid out exactly as KVCache's / LayerKindCache's.

The recurrent state is float32 whatever the model dtype (the delta rule accumulates in it; transformers'
kernels return it in float32); the conv state keeps the model dtype. Buffers are allocated once: a new
sequence (first position 0) zeroes a linear layer's state on the device (models/deltanet.py).
"""

from __future__ import annotations

import torch
from torch import nn

from hotexperts.config import ModelConfig
from hotexperts.errors import HotExpertsError
from hotexperts.models.layers import KVCache


class LayerKindCache(KVCache):
    @classmethod
    def over_buffers(cls, cfg: ModelConfig, k: torch.Tensor, v: torch.Tensor, conv: torch.Tensor,
                     state: torch.Tensor) -> LayerKindCache:
        """A cache over existing buffers (views of one slot of a SlotKVCache; no copy)."""
        self = cls.over(k, v)
        attn, lin = cfg.attention_layers, cfg.linear_layers
        self.index = {l: i for i, l in enumerate(attn)} | {l: i for i, l in enumerate(lin)}
        self.linear = frozenset(lin)
        self.register_buffer("conv", conv, persistent=False)
        self.register_buffer("state", state, persistent=False)
        return self

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


def cache_bytes(cfg: ModelConfig, max_seq: int, dtype: torch.dtype, num_slots: int = 1) -> int:
    """Bytes of new_cache(cfg, max_seq, ...) times num_slots (a SlotKVCache of that many sequences)."""
    return num_slots * _one_sequence_bytes(cfg, max_seq, dtype)


def _one_sequence_bytes(cfg: ModelConfig, max_seq: int, dtype: torch.dtype) -> int:
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


MAX_SLOTS = 16      # decode-sized batches (models.layers.SMALL_T): the batched step's grouped attention


class SlotKVCache(nn.Module):
    """N sequence slots of `max_seq` positions each for batched decoding (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_seq: int, dtype: torch.dtype, device=None):
        super().__init__()
        if not 1 <= num_slots <= MAX_SLOTS:
            raise HotExpertsError(f"a slot cache holds 1..{MAX_SLOTS} sequences, got {num_slots}")
        self.cfg, self.num_slots, self.max_seq = cfg, num_slots, max_seq
        attn, lin = cfg.attention_layers, cfg.linear_layers
        self.index_of = {l: i for i, l in enumerate(attn)} | {l: i for i, l in enumerate(lin)}
        self.linear = frozenset(lin)
        kv = (len(attn), cfg.num_kv_heads, num_slots, max_seq, cfg.head_dim)
        self.register_buffer("k", torch.zeros(kv, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(kv, dtype=dtype, device=device), persistent=False)
        self.conv: torch.Tensor | None = None               # [Nlin, N, C, Kc-1] (linear layers)
        self.state: torch.Tensor | None = None              # [Nlin, N, Hv, dk, dv] float32
        if lin:
            s = cfg.linear
            conv = (len(lin), num_slots, s.conv_dim, s.conv_kernel - 1)
            rec = (len(lin), num_slots, s.num_value_heads, s.key_head_dim, s.value_head_dim)
            self.conv = torch.zeros(conv, dtype=dtype, device=device)
            self.state = torch.zeros(rec, dtype=torch.float32, device=device)
        cols = torch.arange(num_slots * max_seq, device=device)                    # [N*S]
        self.register_buffer("col_slot", cols // max_seq, persistent=False)
        self.register_buffer("col_pos", cols % max_seq, persistent=False)

    def slot(self, s: int) -> KVCache:
        """Slot s as a one-sequence cache (views, written in place)."""
        if not 0 <= s < self.num_slots:
            raise HotExpertsError(f"slot {s} is not one of the cache's {self.num_slots} slots")
        k, v = self.k[:, :, s], self.v[:, :, s]                                    # [L, Hkv, S, hd]
        if not self.linear:
            return KVCache.over(k, v)
        return LayerKindCache.over_buffers(self.cfg, k, v, self.conv[:, s], self.state[:, s])

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.index_of[layer]
        if layer in self.linear:
            return self.conv[i], self.state[i]                                     # [N, ...] per slot
        L, Hkv, N, S, hd = self.k.shape
        return self.k[i].view(Hkv, N * S, hd), self.v[i].view(Hkv, N * S, hd)

    def index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B] flat write positions of (slot, position) pairs."""
        return slots * self.max_seq + positions

    def mask(self, slots: torch.Tensor, positions: torch.Tensor,
             sliding_window: int | None = None) -> torch.Tensor:
        """[B, N*S] bool: causal within each row's own slot (and within the sliding window, if any)."""
        q_pos = positions[:, None]
        mask = (self.col_slot[None, :] == slots[:, None]) & (self.col_pos[None, :] <= q_pos)
        if sliding_window:
            mask = mask & (self.col_pos[None, :] > q_pos - sliding_window)
        return mask


def recurrent_buffers(kv) -> list[torch.Tensor]:
    """The cache buffers a forward advances rather than overwrites: a linear-attention layer's conv and
    recurrent state (LayerKindCache), [] for a K/V-only cache. K/V entries are rewritten by a repeat of the
    same step; these are not, so a warm-up forward or a rejected draft leaves them one step ahead."""
    return [kv.conv, kv.state] if isinstance(kv, LayerKindCache) and kv.linear else []


def snapshot_recurrent(kv) -> list[torch.Tensor]:
    """Copies of recurrent_buffers(kv) (stream-ordered on the current stream)."""
    return [b.clone() for b in recurrent_buffers(kv)]


def restore_recurrent(kv, saved: list[torch.Tensor]) -> None:
    """Put a snapshot_recurrent(kv) back into the cache's buffers, in place (their addresses, which CUDA
    graphs captured, stay)."""
    for buf, copy in zip(recurrent_buffers(kv), saved, strict=True):
        buf.copy_(copy)

