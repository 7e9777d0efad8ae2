"""GatedDeltaNet: the linear-attention token mixer of Qwen3.5-MoE and Qwen3-Next (HF's `linear_attn`).

    mixer(x [T, D], input_pos [T], conv_state [C, Kc-1], state [Hv, dk, dv] float32) -> [T, D]
        both states are this layer's views of the per-layer-kind cache (models/cache.py), updated in place;
        a forward whose first position is 0 starts from zero states (a new sequence), decided on the device
        (no host sync), so a T=1 decode step stays one CUDA graph and a prompt may come in chunks

Shapes: LinearAttentionShape (config.py): Hk key heads of dk, Hv value heads of dv, r = Hv / Hk, C = 2 Hk dk +
Hv dv conv channels, Kc conv taps. Parameters, HF's names and layouts; `layout` picks the projections:
    "split" (Qwen3.5)        in_proj_qkv [C, D] (q all heads | k | v), in_proj_z [Hv dv, D],
                             in_proj_b, in_proj_a [Hv, D]
    "fused" (Qwen3-Next)     in_proj_qkvz [2 Hk dk + 2 Hv dv, D], per key head: q dk | k dk | v r dv | z r dv;
                             in_proj_ba [2 Hv, D], per key head: b r | a r
    "qkv_z_ba"               in_proj_qkv, in_proj_z as "split", in_proj_ba as "fused" (what llama.cpp's
                             current converter writes for qwen3next: attn_qkv, attn_gate, ssm_ba)
    conv1d.weight [C, 1, Kc], dt_bias [Hv], A_log [Hv], norm.weight [dv] (plain, not zero-centred),
    out_proj [D, Hv dv]
Per token: q, k, v = silu(conv(qkv)); beta = sigmoid(b); g = -exp(A_log) softplus(a + dt_bias);
o = gated_delta(q, k, v, g, beta) (kernels/deltanet.py); out_proj(rmsnorm(o) * w * silu(z)) per value head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hotexperts.config import LinearAttentionShape
from hotexperts.kernels.deltanet import causal_conv, gated_delta


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) * w * silu(gate) over the last dim, float32 inside, as HF's RMSNormGated."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.weight
        return (h.float() * F.silu(gate.float())).to(x.dtype)


LAYOUTS = ("split", "fused", "qkv_z_ba")


class GatedDeltaNet(nn.Module):
    backend = "auto"            # kernels/deltanet.gated_delta's backend (the engine may set "torch")

    def __init__(self, dim: int, shape: LinearAttentionShape, eps: float, layout: str = "split"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown GatedDeltaNet layout {layout!r}")
        self.s, self.fused_qkvz, self.fused_ba = shape, layout == "fused", layout != "split"
        Hk, Hv, dk, dv = shape.num_key_heads, shape.num_value_heads, shape.key_head_dim, shape.value_head_dim
        C = shape.conv_dim
        if self.fused_qkvz:
            self.in_proj_qkvz = nn.Linear(dim, 2 * Hk * dk + 2 * Hv * dv, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(dim, C, bias=False)
            self.in_proj_z = nn.Linear(dim, Hv * dv, bias=False)
        if self.fused_ba:
            self.in_proj_ba = nn.Linear(dim, 2 * Hv, bias=False)
        else:
            self.in_proj_b = nn.Linear(dim, Hv, bias=False)
            self.in_proj_a = nn.Linear(dim, Hv, bias=False)
        self.conv1d = nn.Conv1d(C, C, shape.conv_kernel, groups=C, bias=False)   # holds weight [C, 1, Kc]
        self.dt_bias = nn.Parameter(torch.ones(Hv))
        self.A_log = nn.Parameter(torch.zeros(Hv))
        self.norm = GatedRMSNorm(dv, eps)
        self.out_proj = nn.Linear(Hv * dv, dim, bias=False)

    def _project(self, x: torch.Tensor):
        """x [T, D] -> qkv [T, C] (q | k | v, heads in order), z [T, Hv, dv], b, a [T, Hv]."""
        T, s = x.shape[0], self.s
        Hk, dk, dv = s.num_key_heads, s.key_head_dim, s.value_head_dim
        r = s.num_value_heads // Hk
        if self.fused_qkvz:
            qkvz = self.in_proj_qkvz(x).view(T, Hk, 2 * dk + 2 * r * dv)
            q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)              # per key head
            qkv = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=-1)
        else:
            qkv, z = self.in_proj_qkv(x), self.in_proj_z(x)
        if self.fused_ba:
            b, a = self.in_proj_ba(x).view(T, Hk, 2 * r).split([r, r], dim=-1)     # per key head
        else:
            b, a = self.in_proj_b(x), self.in_proj_a(x)
        return qkv, z.reshape(T, -1, dv), b.reshape(T, -1), a.reshape(T, -1)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, conv_state: torch.Tensor,
                state: torch.Tensor) -> torch.Tensor:
        T, s = x.shape[0], self.s
        fresh = input_pos[:1] == 0                                                 # [1] bool, on the device
        conv_state.masked_fill_(fresh.view(1, 1), 0)
        state.masked_fill_(fresh.view(1, 1, 1), 0)
        qkv, z, b, a = self._project(x)
        qkv = causal_conv(qkv, self.conv1d.weight[:, 0], conv_state)               # [T, C]
        kd = s.num_key_heads * s.key_head_dim
        q, k, v = qkv.split([kd, kd, s.num_value_heads * s.value_head_dim], dim=-1)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())   # [T, Hv]
        o = gated_delta(q.view(T, s.num_key_heads, -1), k.view(T, s.num_key_heads, -1),
                        v.view(T, s.num_value_heads, -1), g, b.sigmoid(), state, self.backend)
        o = self.norm(o, z)                                                        # [T, Hv, dv]
        return self.out_proj(o.reshape(T, -1))
