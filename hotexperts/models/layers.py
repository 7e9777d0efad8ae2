"""Shared building blocks: RMSNorm, RoPE, attention over a static KV cache, SwiGLU MLP.

Variants a config turns on: RMSNorm(zero_centered=True) scales by (1 + w) in float32 (Qwen3.5 / Qwen3-Next);
Attention(output_gate=True) reads a per-head gate from q_proj (rows per head: hd query, hd gate) and returns
o_proj(attn * sigmoid(gate)); Attention(rotary_dim=r < hd) rotates only the first r dims of each head;
Attention(sinks=True) holds a learned per-head logit `sinks` [H] that joins every softmax as one more
column and is dropped after it (GPT-OSS); RotaryEmbedding(yarn=YarnRope) is YaRN-scaled RoPE.
group_limited_topk / SigmoidGroupRouter: the sigmoid router with a score-correction bias and
group-limited top-k (GLM-4.5, DeepSeek-V3 style).

Batch 1; T tokens per forward (T=1 in decode). Shapes:
    x          [T, D]          hidden states
    input_pos  [T] int64       absolute positions of the T tokens (on the model's device)
    cache k/v  [L, Hkv, S, hd] S = max_seq, preallocated; written with index_copy_ at input_pos
    mask       [T, S] bool     True = attend
The T=1 step has no host syncs and no data-dependent shapes, so it can be captured in a CUDA graph.
Numerics follow transformers: RMSNorm in float32 then cast back; RoPE cos/sin in float32 cast to x dtype,
rotate_half convention; SDPA with scale hd**-0.5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hotexperts.config import YarnRope
from hotexperts.models.qlinear import QuantLinear, fused_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, zero_centered: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))
        self.eps, self.zero_centered = eps, zero_centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_centered:        # HF: (norm(x.float()) * (1 + w.float())).to(x.dtype): one rounding
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float() + 1.0, self.eps).to(x.dtype)
        # one fused kernel (fp32 math inside) instead of ~8 elementwise launches per norm in decode;
        # in bf16 it rounds once where HF rounds twice (weight * h.to(dtype)); fp32 is the same math
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def yarn_inv_freq(dim: int, theta: float, y: YarnRope) -> tuple[torch.Tensor, float]:
    """YaRN's inv_freq [dim/2] and cos/sin scale (transformers' _compute_yarn_parameters, same numerics)."""
    def correction_dim(rotations: float) -> float:
        turns = y.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(theta))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    scale = y.attention_factor
    if scale is None:
        scale = 0.1 * math.log(y.factor) + 1.0 if y.factor > 1 else 1.0
    return inv_freq, float(scale)


class RotaryEmbedding(nn.Module):
    """RoPE, default or YaRN-scaled. inv_freq is a non-persistent buffer, built on the CPU."""

    def __init__(self, head_dim: int, theta: float, yarn: YarnRope | None = None):
        super().__init__()
        self.scale = 1.0
        if yarn is not None:
            inv_freq, self.scale = yarn_inv_freq(head_dim, theta, yarn)
        else:
            exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
            inv_freq = 1.0 / (theta ** exps)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos [T, hd], signed sin [T, hd] = (-sin, +sin) over the two halves (see apply_rope)."""
        freqs = input_pos.float()[:, None] * self.inv_freq[None, :]     # [T, hd/2]
        cos, sin = torch.cat((freqs, freqs), dim=-1).cos(), freqs.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, hd]; cos, signed_sin [T, hd]. HF's x*cos + rotate_half(x)*sin in three launches:
    rotate_half(x) * sin == roll(x, hd/2) * (-sin, +sin)."""
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos[:, None], rolled, signed_sin[:, None])


def write_kv(kc: torch.Tensor, vc: torch.Tensor, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Write k, v [Hkv, T, hd] at input_pos into one layer's cache kc, vc [Hkv, S, hd] (in place)."""
    kc.index_copy_(1, input_pos, k)
    vc.index_copy_(1, input_pos, v)
    return kc, vc


class KVCache(nn.Module):
    """Static per-layer K/V buffers for one sequence (gpt-fast style)."""

    def __init__(self, num_layers: int, max_seq: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (num_layers, num_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("positions", torch.arange(max_seq, device=device), persistent=False)
        self.max_seq = max_seq

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache over existing buffers k, v [L, Hkv, S, hd] (no copy: e.g. one slot of
        models/cache.SlotKVCache, written in place through this view)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.register_buffer("positions", torch.arange(k.shape[2], device=k.device), persistent=False)
        self.max_seq = k.shape[2]
        return self

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v [Hkv, T, hd] -> full cache k, v of this layer [Hkv, S, hd]."""
        return write_kv(self.k[layer], self.v[layer], input_pos, k, v)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cache views k, v [Hkv, S, hd] (no copy)."""
        return self.k[layer], self.v[layer]

    def mask(self, input_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
        """[T, S] bool: causal over absolute positions (and within the sliding window, if any)."""
        kv_pos, q_pos = self.positions[None, :], input_pos[:, None]
        mask = kv_pos <= q_pos
        if sliding_window:
            mask = mask & (kv_pos > q_pos - sliding_window)
        return mask


class Attention(nn.Module):
    """GQA attention. qk_norm: "none" | "head" (RMSNorm over hd per head) | "full" (over the whole q/k).

    fuse_qkv(): q/k/v in one matmul (decode: one GEMV launch instead of three; models/transforms.py
    applies it to a whole model)."""

    qkv_weight: torch.Tensor | None = None      # fuse_qkv(): [(H + 2 Hkv) * hd, D]; q/k/v weights view it
    qkv_bias: torch.Tensor | None = None
    qkv_quant: nn.Module | None = None          # fuse_qkv() over quantized q/k/v (models/qlinear.py)

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
                 o_bias: bool = False, qk_norm: str = "none", eps: float = 1e-6,
                 clip_qkv: float | None = None, output_gate: bool = False, rotary_dim: int | None = None,
                 zero_centered_norm: bool = False, sinks: bool = False):
        super().__init__()
        self.sinks = nn.Parameter(torch.zeros(heads)) if sinks else None
        self.heads, self.kv_heads, self.head_dim, self.clip_qkv = heads, kv_heads, head_dim, clip_qkv
        self.output_gate, self.rotary_dim = output_gate, rotary_dim or head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim * (2 if output_gate else 1), bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            zc = zero_centered_norm
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps, zc), RMSNorm(head_dim, eps, zc)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(heads * head_dim, eps), RMSNorm(kv_heads * head_dim, eps)
        elif qk_norm != "none":
            raise ValueError(f"unknown qk_norm {qk_norm!r}")

    def fuse_qkv(self, enable: bool = True) -> None:
        """Compute q, k, v with one matmul over a concatenated weight (and bias). The three Linear weights
        become views of it: parameter names, state_dict and load_state_dict are unchanged, no memory is
        duplicated, and the fused copy stays in sync with later loads. enable=False: three matmuls again
        (the weights stay views). Idempotent: a fused weight the q/k/v weights still view is kept, a stale
        one (they were replaced, e.g. load_state_dict(assign=True)) is rebuilt from them."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if not enable:
            self.qkv_weight = self.qkv_bias = None
            self.__dict__["qkv_quant"] = None
            return
        if all(isinstance(p, QuantLinear) for p in projs):       # quantized: one GEMV over the rows
            if self.qkv_quant is None or self.qkv_quant.q.device != self.q_proj.q.device:
                self.__dict__["qkv_quant"] = fused_rows(list(projs))   # not a submodule: no state_dict
            return
        if self._fused_is_current():
            return
        with torch.no_grad():
            w = torch.cat([p.weight for p in projs])
            b = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
        sizes = self._qkv_sizes()
        for i, (p, wv) in enumerate(zip(projs, w.split(sizes), strict=True)):
            p.weight = nn.Parameter(wv, requires_grad=p.weight.requires_grad)
            if b is not None:
                p.bias = nn.Parameter(b.split(sizes)[i], requires_grad=p.bias.requires_grad)
        self.qkv_weight, self.qkv_bias = w, b

    def _fused_is_current(self) -> bool:
        """The q/k/v weights are still views of qkv_weight (same device, dtype and memory)."""
        w = self.qkv_weight
        if w is None:
            return False
        views = w.split(self._qkv_sizes())
        projs = (self.q_proj, self.k_proj, self.v_proj)
        return all((p.weight.device, p.weight.dtype, p.weight.data_ptr()) == (v.device, v.dtype, v.data_ptr())
                   for p, v in zip(projs, views, strict=True))

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .half() (nn.Module._apply) convert q/k/v one by one, which copies the views
        apart and would leave the fused weight behind on its old device or dtype: fuse again on the new."""
        super()._apply(fn, recurse)
        if self.qkv_weight is not None or self.qkv_quant is not None:
            self.__dict__["qkv_quant"] = None
            self.fuse_qkv()
        return self

    def _qkv_sizes(self) -> list[int]:
        q = self.heads * self.head_dim * (2 if self.output_gate else 1)
        return [q, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]

    def _qkv(self, x: torch.Tensor):
        """-> q [T, H, hd], k, v [T, Hkv, hd], gate [T, H*hd] (output_gate) or None."""
        T = x.shape[0]
        if self.qkv_quant is not None:                                      # one quantized GEMV / GEMM
            q, k, v = self.qkv_quant(x).split(self._qkv_sizes(), dim=-1)
        elif self.qkv_weight is not None:                                   # one matmul, then split views
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(self._qkv_sizes(), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)        # [T, H*hd], [T, Hkv*hd] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        gate = None
        if self.output_gate:                                                # per head: hd query, hd gate
            q, gate = q.view(T, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(T, self.heads * self.head_dim)
        q = q.reshape(T, self.heads, self.head_dim)                         # [T, H, hd]
        k = k.view(T, self.kv_heads, self.head_dim)                         # [T, Hkv, hd]
        v = v.view(T, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, gate

    def _rope(self, qk: torch.Tensor, rope) -> torch.Tensor:
        """RoPE over the first rotary_dim dims of each head of qk [T, n, hd] (rope: [T, rotary_dim])."""
        if self.rotary_dim == self.head_dim:
            return apply_rope(qk, *rope)
        r = self.rotary_dim
        return torch.cat((apply_rope(qk[..., :r], *rope), qk[..., r:]), dim=-1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layer: int,
                input_pos: torch.Tensor, kv: KVCache, mask: torch.Tensor) -> torch.Tensor:
        return self.attend(x, rope, input_pos, *kv.layer(layer), mask)

    def attend(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], input_pos: torch.Tensor,
               kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """forward with this layer's cache views kc, vc [Hkv, S, hd] (written in place at input_pos).
        Takes no layer index, so one compiled graph serves every layer (engine/runner/stages.py)."""
        T = x.shape[0]
        q, k, v, gate = self._qkv(x)
        qk = self._rope(torch.cat((q, k), dim=1), rope)                     # [T, H + Hkv, hd], one pass
        q, k = qk[:, :self.heads], qk[:, self.heads:]
        kc, vc = write_kv(kc, vc, input_pos, k.transpose(0, 1), v.transpose(0, 1))   # [Hkv, S, hd]
        S = mask.shape[-1]                       # the mask's width bounds the keys read (prefill: start + T)
        kc, vc = kc[:, :S], vc[:, :S]
        if mask.dtype != torch.bool or self.sinks is not None:             # decode / sinks: additive bias
            if mask.dtype == torch.bool:
                mask = decode_bias(mask, self.heads // self.kv_heads, q.dtype)
            o = grouped_attention(q, kc, vc, mask, self.sinks)              # [T, H, hd]
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], kc[None], vc[None], attn_mask=mask,
                enable_gqa=self.heads != self.kv_heads)[0].transpose(0, 1)  # [T, H, hd]
        o = o.reshape(T, self.heads * self.head_dim)
        return self.o_proj(o if gate is None else o * torch.sigmoid(gate))


SMALL_T = 16     # decode-sized batches: grouped_attention over an additive bias; larger: SDPA


def decode_bias(mask: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., T, S] bool mask -> [..., T*G, S] additive bias (0 / -inf), rows in grouped_attention's (token,
    group) order. Built once per forward and shared by every layer (a leading [2]: full and sliding masks)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias.repeat_interleave(group, dim=-2)


def grouped_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                      bias: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """GQA for a few query tokens, reading K/V once per KV head, in ~6 launches.

    q [T, H, hd]; kc, vc [Hkv, S, hd]; bias [T*G, S] (decode_bias) -> [T, H, hd]. SDPA with a mask and
    enable_gqa falls back to its math path (K/V repeated per query head, ~10 launches): far slower in decode.
    sinks [H] (GPT-OSS): one more logit per head in the softmax, dropped after it (also serves prompts:
    scores are [Hkv, T*G, S], fine for the prompt chunks the generator feeds).
    """
    T, H, hd = q.shape
    Hkv = kc.shape[0]
    G = H // Hkv
    qg = q.reshape(T, Hkv, G, hd).transpose(0, 1).reshape(Hkv, T * G, hd)           # [Hkv, T*G, hd]
    scores = torch.baddbmm(bias.expand(Hkv, -1, -1), qg, kc.transpose(1, 2), alpha=hd ** -0.5)
    if sinks is not None:                                            # [Hkv, T*G, 1]: head kv*G + g per row
        sink = sinks.to(scores.dtype).view(Hkv, 1, G, 1).expand(Hkv, T, G, 1).reshape(Hkv, T * G, 1)
        probs = torch.cat((scores, sink), -1).softmax(-1, dtype=torch.float32)[..., :-1].to(q.dtype)
        return torch.bmm(probs, vc).view(Hkv, T, G, hd).transpose(0, 1).reshape(T, H, hd)
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)                      # [Hkv, T*G, S]
    out = torch.bmm(probs, vc)                                                       # [Hkv, T*G, hd]
    return out.view(Hkv, T, G, hd).transpose(0, 1).reshape(T, H, hd)


class SwiGLU(nn.Module):
    """Dense MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def group_limited_topk(choice: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """choice [T, E] float -> ids [T, K]: the K best experts within the topk_group best of n_group equal
    groups, a group scored by the sum of its two best choices (transformers' Glm4MoeTopkRouter)."""
    T, E = choice.shape
    if n_group > 1:
        groups = choice.view(T, n_group, E // n_group)
        group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)                             # [T, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1], True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    return torch.topk(choice, top_k, dim=-1, sorted=False)[1]


class SigmoidGroupRouter(nn.Module):
    """Sigmoid router: scores = sigmoid(W x) in float32, experts chosen on scores + e_score_correction_bias
    with group-limited top-k, weighted by their plain scores (renormalised if norm_topk_prob) times
    routed_scaling_factor. HF names: `gate.weight` [E, D], `gate.e_score_correction_bias` [E]."""

    def __init__(self, dim: int, num_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, dim))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts))
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.scale = norm_topk_prob, routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> ids [T, K] int64, weights [T, K] x.dtype."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()                      # [T, E]
        choice = scores + self.e_score_correction_bias.float()
        ids = group_limited_topk(choice, self.top_k, self.n_group, self.topk_group)      # [T, K]
        w = scores.gather(1, ids)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, (w * self.scale).to(x.dtype)


class HostEmbedding(nn.Module):
    """Token embeddings kept in host memory (pinned when a GPU exists); the rows a forward needs are gathered
    on the CPU and copied to `device` (models/transforms.host_embedding puts it in a model).

        emb(tokens [T]) -> [T, D] on device       prompts: tokens read to the host, rows gathered, copied
        emb.stage(token)                          decode: the runner writes the next token's row to a
                                                  static device row (an async copy from pinned memory,
                                                  stream-ordered before the step)...
        with emb.staged(): model(...)             ...and inside, a T=1 forward returns that row without a
                                                  host read, so the step stays a CUDA graph
    The weight is not moved by .to() / .cuda(): it stays on the CPU by design."""

    def __init__(self, weight: torch.Tensor, device):
        super().__init__()
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.weight = weight.detach().to("cpu")
        if pin:
            self.weight = self.weight.pin_memory()
        D = self.weight.shape[1]
        self.host_row = torch.empty(1, D, dtype=self.weight.dtype, pin_memory=pin)     # [1, D]
        self.dev_row = torch.empty(1, D, dtype=self.weight.dtype, device=self.device)  # [1, D]
        self._copied = torch.cuda.Event() if pin else None     # the last host_row -> dev_row copy
        self._staged = False

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def _apply(self, fn, recurse=True):
        return self                               # host memory by design (see the class doc)

    def stage(self, token: int) -> None:
        """Write token's row to dev_row, stream-ordered. The async copy reads host_row when the stream reaches
        it, so the previous copy must have run before host_row is overwritten: back-to-back steps without a
        host read between them (a caller feeding known tokens) would otherwise embed the later token twice."""
        if self._copied is not None:
            self._copied.synchronize()
        self.host_row.copy_(self.weight[int(token)])
        self.dev_row.copy_(self.host_row, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def staged(self):
        return _Staged(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._staged and tokens.shape[0] == 1:
            return self.dev_row
        rows = self.weight[tokens.to("cpu")]                                           # [T, D]
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)


class _Staged:
    def __init__(self, emb: HostEmbedding):
        self.emb = emb

    def __enter__(self):
        self.emb._staged = True
        return self.emb

    def __exit__(self, *exc):
        self.emb._staged = False
