"""MoETransformer: one decoder for every supported architecture, blind to where experts live.

    forward(tokens [T] int64, input_pos [T] int64, kv: KVCache, executor, last_only=False, kv_len=None)
        -> logits [T, V] float32   (last_only: [1, V] of the last token; prefill without a [T, V] buffer)
        = prepare -> per layer (h, a, ids, w = layer.pre_experts(...); x = h + executor(l, a, ids, w),
          or h + a for a dense layer) -> head

The model is pure: it holds weights and computes, nothing else. How a decode step is run (compiled stages,
CUDA graphs, piecewise graphs) is the engine's runner (engine/runner/), built on the same three pieces:
prepare, DecoderLayer.pre_experts (everything of a layer but the routed experts) and head. Transformations
such as one q/k/v matmul (models/transforms.py) are applied from outside.

Parameter names are Hugging Face's dense names (`model.layers.{i}.self_attn.q_proj.weight`, ...); the MoE
block is the architecture's `moe_block` (`mlp`; Mixtral: `block_sparse_moe`) holding the router `gate`
and, for qwen2_moe, `shared_expert` and `shared_expert_gate` (GLM-4.5: `shared_expert` ungated; its router
`gate` a SigmoidGroupRouter). Routed experts are not parameters here: the MoE block hands
`executor(layer, x [T,D], ids [T,K], weights [T,K])` the work (hotexperts/executor.py); with expert biases
(GPT-OSS) the block holds the experts' down-projection biases `down_bias` [E, D] and adds
sum_k weights[t, k] * down_bias[ids[t, k]] itself, so no expert path carries them (the gate/up biases live
with the experts, weights.LayerExperts.b13). Mixed windows (GPT-OSS: cfg.layer_types "sliding_attention")
make `prepare` return both masks stacked [2, ...] (full, sliding); each layer takes its own.
Layers whose index is not in cfg.moe_layers get a dense SwiGLU `mlp` of cfg.intermediate_size.
Hybrid models (cfg.layer_types: Qwen3.5-MoE, Qwen3-Next) mix tokens with `linear_attn` (models/deltanet.py)
in "linear_attention" layers and `self_attn` in the others; a layer's cache views kv.layer(l) are K/V or
(conv state, recurrent state) accordingly (models/cache.py), so every caller passes them on the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hotexperts.config import ModelConfig
from hotexperts.executor import ExpertExecutor
from hotexperts.models import get_arch
from hotexperts.models.cache import new_cache
from hotexperts.models.deltanet import GatedDeltaNet
from hotexperts.models.layers import (
    SMALL_T,
    Attention,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    SigmoidGroupRouter,
    SwiGLU,
    decode_bias,
)


class MoEBlock(nn.Module):
    """Router (softmax in float32 -> top-k -> optional renorm, or the sigmoid group router) + executor +
    optional shared expert (sigmoid-gated or plain) + optional expert down biases."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.norm_topk_prob = layer, cfg.top_k, cfg.norm_topk_prob
        if cfg.router == "sigmoid_group":
            self.gate = SigmoidGroupRouter(cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.n_group,
                                           cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        else:
            self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            if cfg.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.down_bias = None                       # expert down biases [E, D] (GPT-OSS)
        if cfg.expert_bias:
            self.down_bias = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> ids [T, K] int64, weights [T, K] x.dtype.

        With norm_topk_prob, softmax over the K largest logits equals the renormalised top-K of the full
        softmax (same ids, same weights) in three launches instead of six."""
        if isinstance(self.gate, SigmoidGroupRouter):
            return self.gate(x)
        logits = self.gate(x)                                              # [T, E]
        if self.norm_topk_prob:
            top, ids = torch.topk(logits, self.top_k, dim=-1)              # [T, K]
            return ids, F.softmax(top, dim=-1, dtype=torch.float32).to(x.dtype)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)             # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)               # [T, K]
        return ids, weights.to(x.dtype)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's output [T, D] (qwen2_moe: sigmoid-gated; GLM: plain), or None."""
        if self.shared_expert is None:
            return None
        if self.shared_expert_gate is None:
            return self.shared_expert(x)
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def bias_term(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """sum_k weights[t, k] * down_bias[ids[t, k]] -> [T, D] (expert down biases), or None."""
        if self.down_bias is None:
            return None
        return (weights.unsqueeze(-1) * self.down_bias[ids]).sum(dim=1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.linear = layer, cfg.is_linear(layer)
        eps, zc = cfg.rms_norm_eps, cfg.zero_centered_norm
        self.mask_index = int(cfg.is_sliding(layer)) if cfg.mixed_windows else None
        if self.linear:
            self.linear_attn = GatedDeltaNet(cfg.hidden_size, cfg.linear, eps,
                                             cfg.extra.get("linear_proj", "split"))
        else:
            self.self_attn = Attention(
                cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qkv_bias=cfg.attention_bias,
                o_bias=bool(cfg.extra.get("o_proj_bias", False)), qk_norm=cfg.qk_norm, eps=eps,
                clip_qkv=cfg.clip_qkv, output_gate=cfg.attn_output_gate, rotary_dim=cfg.rotary_dim,
                zero_centered_norm=zc, sinks=cfg.attention_sinks)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, zc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, zc)
        self.is_moe = layer in cfg.moe_layers
        self.ffn_name = get_arch(cfg.model_type).moe_block if self.is_moe else "mlp"
        ffn = MoEBlock(cfg, layer) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.add_module(self.ffn_name, ffn)

    def pre_experts(self, x, rope, input_pos, kc, vc, mask):
        """Everything of the layer but the routed experts -> (h, a, ids, weights). The layer's output is
        h + executor(layer, a, ids, weights) for an MoE layer (a = xn [T, D], the executor's input; h holds
        the residual and any shared expert) and h + a for a dense one (a = mlp(xn); ids, weights None).

        kc, vc [Hkv, S, hd]: this layer's cache views (written in place at input_pos); for a linear-attention
        layer its conv and recurrent state instead (updated in place; mask unused). No layer index is read,
        no host sync, fixed shapes: one compiled graph or CUDA graph serves every layer of a kind, and
        the runner may defer the add of `a` into the next layer's graph (engine/runner/stages.py)."""
        xn = self.input_layernorm(x)
        if self.mask_index is not None:                                     # [2, ...]: full, sliding
            mask = mask[self.mask_index]
        if self.linear:
            h = x + self.linear_attn(xn, input_pos, kc, vc)                                     # [T, D]
        else:
            h = x + self.self_attn.attend(xn, rope, input_pos, kc, vc, mask)                    # [T, D]
        xn = self.post_attention_layernorm(h)
        ffn = getattr(self, self.ffn_name)
        if not self.is_moe:
            return h, ffn(xn), None, None
        ids, weights = ffn.route(xn)                                                           # [T, K]
        for extra in (ffn.shared(xn), ffn.bias_term(ids, weights)):
            if extra is not None:
                h = h + extra
        return h, xn, ids, weights

    def forward(self, x, rope, input_pos, kv, mask, executor) -> torch.Tensor:
        h, a, ids, weights = self.pre_experts(x, rope, input_pos, *kv.layer(self.layer), mask)
        return h + (a if ids is None else executor(self.layer, a, ids, weights))


class DecoderStack(nn.Module):
    """HF's `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centered_norm)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_yarn)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_kv_cache(self, max_seq: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """A KVCache shaped for this model, per layer kind for hybrid models (models/cache.py); dtype/device
        default to the final norm's (the embedding may live in host memory)."""
        w = self.model.norm.weight
        return new_cache(self.cfg, max_seq, dtype or w.dtype, device or w.device)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv: KVCache,
                executor: ExpertExecutor, last_only: bool = False, kv_len: int | None = None) -> torch.Tensor:
        """tokens, input_pos [T] -> logits [T, V] float32 ([1, V] for the last token if last_only)."""
        x, rope, mask = self.prepare(tokens, input_pos, kv, kv_len)
        for layer in self.model.layers:
            x = layer(x, rope, input_pos, kv, mask, executor)
        return self.head(x[-1:] if last_only else x)

    def prepare(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv: KVCache, kv_len: int | None = None):
        """-> x [T, D], rope (cos, signed sin) [T, hd], mask [T, S] bool or decode bias [T*G, S].

        kv_len (a host int, e.g. start + T in prefill): attend to the first kv_len cache entries only
        (S = kv_len); None = the whole static cache (fixed shapes, as CUDA graphs need)."""
        x = self.model.embed_tokens(tokens)                                 # [T, D]
        rope = self.rotary(input_pos, x.dtype)                              # [T, rotary_dim] each
        if self.cfg.mixed_windows:                                          # [2, T, S]: full, sliding
            mask = torch.stack((kv.mask(input_pos), kv.mask(input_pos, self.cfg.sliding_window)))
        else:
            mask = kv.mask(input_pos, self.cfg.sliding_window)              # [T, S] bool
        if kv_len is not None:
            mask = mask[..., :kv_len]
        if tokens.shape[0] <= SMALL_T:                                      # decode: one additive bias
            mask = decode_bias(mask, self.cfg.num_heads // self.cfg.num_kv_heads, x.dtype)   # [T*G, S]
        return x, rope, mask

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: x [T, D] -> logits [T, V] float32."""
        if self.cfg.tie_word_embeddings:
            return F.linear(self.model.norm(x), self.model.embed_tokens.weight).float()
        return self.lm_head(self.model.norm(x)).float()
