"""MoETransformer: one decoder for every supported architecture, blind to where experts live.

    forward(tokens [T] int64, input_pos [T] int64, kv: KVCache, executor, last_only=False)
        -> logits [T, V] float32   (last_only: [1, V] of the last token; prefill without a [T, V] buffer)

Parameter names are Hugging Face's dense names (`model.layers.{i}.self_attn.q_proj.weight`, ...); the MoE
block is the architecture's `moe_block` (`mlp`; Mixtral: `block_sparse_moe`) holding the router `gate`
and, for qwen2_moe, `shared_expert` and `shared_expert_gate`. Routed experts are not parameters here: the
MoE block hands `executor(layer, x [T,D], ids [T,K], weights [T,K])` the work (models/executor_protocol.py).
Layers whose index is not in cfg.moe_layers get a dense SwiGLU `mlp` of cfg.intermediate_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hotexperts.config import ModelConfig
from hotexperts.models import get_arch
from hotexperts.models.compiled import DecodeStages
from hotexperts.models.executor_protocol import ExpertExecutor
from hotexperts.models.layers import (
    SMALL_T,
    Attention,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    decode_bias,
)


class MoEBlock(nn.Module):
    """Router (softmax in float32 -> top-k -> optional renorm) + executor + optional gated shared expert."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.norm_topk_prob = layer, cfg.top_k, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> ids [T, K] int64, weights [T, K] x.dtype.

        With norm_topk_prob, softmax over the K largest logits equals the renormalised top-K of the full
        softmax (same ids, same weights) in three launches instead of six."""
        logits = self.gate(x)                                              # [T, E]
        if self.norm_topk_prob:
            top, ids = torch.topk(logits, self.top_k, dim=-1)              # [T, K]
            return ids, F.softmax(top, dim=-1, dtype=torch.float32).to(x.dtype)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)             # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)               # [T, K]
        return ids, weights.to(x.dtype)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The gated shared expert's output [T, D] (qwen2_moe), or None."""
        if self.shared_expert is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        eps = cfg.rms_norm_eps
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qkv_bias=cfg.attention_bias,
            o_bias=bool(cfg.extra.get("o_proj_bias", False)), qk_norm=cfg.qk_norm, eps=eps,
            clip_qkv=cfg.clip_qkv)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.is_moe = layer in cfg.moe_layers
        self.ffn_name = get_arch(cfg.model_type).moe_block if self.is_moe else "mlp"
        ffn = MoEBlock(cfg, layer) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.add_module(self.ffn_name, ffn)

    def pre_experts(self, x, rope, input_pos, kv, mask):
        """Everything of the layer but the routed experts (a fixed-shape, host-free piece: a CUDA graph in
        piecewise decode). -> (h, xn, ids, weights): the layer's output is h + executor(layer, xn, ids,
        weights); h already holds the residual and any shared expert. Dense layers: (out, None, None, None).
        """
        return self.pre_experts_kv(x, rope, input_pos, *kv.layer(self.layer), mask)

    def pre_experts_kv(self, x, rope, input_pos, kc, vc, mask):
        """pre_experts with this layer's cache views kc, vc [Hkv, S, hd] instead of (kv, self.layer)."""
        h, a, ids, weights = self.split_kv(x, rope, input_pos, kc, vc, mask)
        return (h + a, None, None, None) if ids is None else (h, a, ids, weights)

    def split_kv(self, x, rope, input_pos, kc, vc, mask):
        """-> (h, a, ids, weights). MoE layers: as pre_experts (a = xn, the executor's input). Dense layers:
        (h, mlp(xn), None, None), the layer's output being h + a, so decode adds it at the start of the next
        layer's compiled graph. Reads no layer index: every layer of one kind shares one compiled graph
        (models/compiled.py)."""
        h = x + self.self_attn.attend(self.input_layernorm(x), rope, input_pos, kc, vc, mask)
        xn = self.post_attention_layernorm(h)
        ffn = getattr(self, self.ffn_name)
        if not self.is_moe:
            return h, ffn(xn), None, None
        ids, weights = ffn.route(xn)
        shared = ffn.shared(xn)
        return (h if shared is None else h + shared), xn, ids, weights

    def forward(self, x, rope, input_pos, kv, mask, executor) -> torch.Tensor:
        h, xn, ids, weights = self.pre_experts(x, rope, input_pos, kv, mask)
        return h if ids is None else h + executor(self.layer, xn, ids, weights)


class DecoderStack(nn.Module):
    """HF's `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decode_stages: DecodeStages | None = None      # compile_decode(): the T=1 step compiled

    def fuse_qkv(self, enable: bool = True) -> MoETransformer:
        """Every layer's q/k/v projections as one matmul (Attention.fuse_qkv; enable=False: three again)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_qkv(enable)
        return self

    def compile_decode(self, enable: bool = True, *, backend="inductor", mode: str | None = None,
                       options: dict | None = None, fuse_qkv: bool = True) -> DecodeStages | None:
        """Opt in to a torch.compile'd T=1 decode step (models/compiled.py; enable=False: off again, and
        q/k/v unfused). fuse_qkv: also one q/k/v matmul per layer (fuse_qkv(); prefill uses it too).

        Lazy: the first T=1 forward under no_grad compiles (~10 s to minutes; decode steps do it before
        their CUDA-graph warm-up). Idempotent: the same settings keep the compiled stages (no recompile for a
        new Generator over this model). mode: None or "max-autotune-no-cudagraphs"; options: Inductor
        config (e.g. {"coordinate_descent_tuning": True}). Prefill and T > 1 stay eager."""
        self.fuse_qkv(enable and fuse_qkv)
        if not enable:
            self.decode_stages = None
            return None
        stages = DecodeStages(True, backend=backend, mode=mode, options=options)
        if self.decode_stages is None or self.decode_stages.settings != stages.settings:
            self.decode_stages = stages
        return self.decode_stages

    def stages(self) -> DecodeStages:
        """The decode stages the piecewise step runs: the compiled ones if compile_decode() is on."""
        st = self.decode_stages
        return st if st is not None and not st.failed else DecodeStages(False)

    def new_kv_cache(self, max_seq: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """A KVCache shaped for this model (dtype/device default to the embedding's)."""
        w = self.model.embed_tokens.weight
        return KVCache(self.cfg.num_layers, max_seq, self.cfg.num_kv_heads, self.cfg.head_dim,
                       dtype or w.dtype, device or w.device)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv: KVCache,
                executor: ExpertExecutor, last_only: bool = False, kv_len: int | None = None) -> torch.Tensor:
        """tokens, input_pos [T] -> logits [T, V] float32 ([1, V] for the last token if last_only).

        With compile_decode() on, a T=1 forward over the whole cache (kv_len None) without autograd runs
        the compiled decode stages (same logits within float tolerance); everything else runs here."""
        stages = self.decode_stages
        if stages is not None and stages.applies(tokens, kv_len):
            logits = stages.run(self, tokens, input_pos, kv, executor)
            if logits is not None:                           # None: compiling failed (warned): eager
                return logits
        x, rope, mask = self.prepare(tokens, input_pos, kv, kv_len)
        for layer in self.model.layers:
            x = layer(x, rope, input_pos, kv, mask, executor)
        return self.head(x[-1:] if last_only else x)

    def prepare(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv: KVCache, kv_len: int | None = None):
        """-> x [T, D], rope (cos, signed sin) [T, hd], mask [T, S] bool or decode bias [T*G, S].

        kv_len (a host int, e.g. start + T in prefill): attend to the first kv_len cache entries only
        (S = kv_len); None = the whole static cache (fixed shapes, as CUDA graphs need)."""
        x = self.model.embed_tokens(tokens)                                 # [T, D]
        rope = self.rotary(input_pos, x.dtype)
        mask = kv.mask(input_pos, self.cfg.sliding_window)                  # [T, S] bool
        if kv_len is not None:
            mask = mask[:, :kv_len]
        if tokens.shape[0] <= SMALL_T:                                      # decode: one additive bias
            mask = decode_bias(mask, self.cfg.num_heads // self.cfg.num_kv_heads, x.dtype)   # [T*G, S]
        return x, rope, mask

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: x [T, D] -> logits [T, V] float32."""
        w = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(self.model.norm(x), w).float()
