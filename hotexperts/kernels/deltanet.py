"""Gated DeltaNet compute (Qwen3.5-MoE / Qwen3-Next linear attention): the causal conv1d and the gated delta
rule, chunked for prompts and recurrent for decode, with the caller's state buffers updated in place.

Batch 1. T tokens; Hk query/key heads of dk, Hv value heads of dv (r = Hv / Hk); C conv channels, Kc taps:
    chunk_workspace_bytes(T, Hv, dk, dv) -> bytes of the chunked form's temporaries (the VRAM budget)
    causal_conv(x [T, C], weight [C, Kc], state [C, Kc-1]) -> silu(conv(state ++ x)) [T, C]
        state <- the last Kc-1 inputs (in place)
    gated_delta(q, k [T, Hk, dk], v [T, Hv, dv], g [T, Hv], beta [T, Hv], state [Hv, dk, dv] float32,
                backend="auto") -> o [T, Hv, dv] in v's dtype; state <- the state after the T tokens
        g: log decay (<= 0): the state is multiplied by exp(g_t) before token t's update
        q, k are L2-normalised here and q scaled by dk^-0.5 (transformers' use_qk_l2norm_in_kernel=True);
        value head h reads key head h // r (transformers' grouped order, repeat_interleave)
T <= RECURRENT_MAX_T takes the recurrent steps (fixed shapes, no host sync: the decode step stays one CUDA
graph; a T-token verify step, engine/runner/verify.py, computes exactly the T single steps); longer inputs the
chunked form (CHUNK tokens per block: a unit-triangular solve for the in-chunk delta-rule updates, then a
scan over chunks), starting from `state`. Everything runs in float32.
backend: "torch" (runs everywhere; the test oracle), "fla" (flash-linear-attention's Triton kernels from
PyPI: CUDA only, optional, imported on first use), "auto" (fla for CUDA tensors when importable, else torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64
RECURRENT_MAX_T = 16        # decode and verify sizes: token by token, the numerics of T single decode steps
BACKENDS = ("auto", "torch", "fla")


def causal_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv over the previous Kc-1 inputs (`state`) and x, then SiLU; state updated."""
    C, taps = weight.shape
    xs = torch.cat((state.t().to(weight.dtype), x.to(weight.dtype)), dim=0)       # [T + Kc - 1, C]
    out = F.conv1d(xs.t()[None], weight[:, None], groups=C)[0].t()                 # [T, C]
    state.copy_(xs[xs.shape[0] - (taps - 1):].t())
    return F.silu(out).to(x.dtype)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _heads_first(q, k, v, g, beta):
    """-> q, k [Hv, T, dk] (normalised, q scaled), v [Hv, T, dv], g, beta [Hv, T]; all float32."""
    r = v.shape[1] // q.shape[1]
    q = _l2norm(q.float()).repeat_interleave(r, dim=1) * q.shape[-1] ** -0.5
    k = _l2norm(k.float()).repeat_interleave(r, dim=1)
    return (q.transpose(0, 1), k.transpose(0, 1), v.float().transpose(0, 1), g.float().t(),
            beta.float().t())


def recurrent(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """Token by token (float32, [Hv, T, d] inputs from _heads_first); state [Hv, dk, dv] updated in place."""
    s = state
    outs = []
    for t in range(q.shape[1]):
        s = s * g[:, t].exp()[:, None, None]                                       # decay
        pred = torch.einsum("hk,hkv->hv", k[:, t], s)                              # what s recalls for k_t
        delta = (v[:, t] - pred) * beta[:, t, None]
        s = s + k[:, t, :, None] * delta[:, None, :]                               # delta-rule write
        outs.append(torch.einsum("hk,hkv->hv", q[:, t], s))
    state.copy_(s)
    return torch.stack(outs, dim=1)                                                # [Hv, T, dv]


def chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The same result as `recurrent`, CHUNK tokens at a time (prompts)."""
    H, T, dk = q.shape
    pad = -T % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)).view(H, -1, chunk, t.shape[-1]) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)).view(H, -1, chunk) for t in (g, beta))          # [H, N, c]
    gc = g.cumsum(-1)                                                              # log decay from start
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(upper, float("-inf")).exp()   # [H, N, c, c]
    kb = k * beta[..., None]
    # in-chunk delta rule as one unit lower-triangular system (I + tril(kb k^T * decay, -1)) X = rhs
    system = ((kb @ k.transpose(-1, -2)) * decay).tril(-1) + torch.eye(chunk, device=q.device)
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * gc.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay                                       # causal, decayed
    q_in = q * gc.exp()[..., None]                                                 # reads the incoming state
    k_out = k * (gc[..., -1:] - gc).exp()[..., None]                               # writes the outgoing one
    last = gc[..., -1].exp()                                                       # [H, N]
    s, out = state, torch.empty_like(v)
    for n in range(q.shape[1]):
        v_new = u[:, n] - w[:, n] @ s                                              # [H, c, dv]
        out[:, n] = q_in[:, n] @ s + attn[:, n] @ v_new
        s = s * last[:, n, None, None] + k_out[:, n].transpose(-1, -2) @ v_new
    state.copy_(s)
    return out.view(H, -1, v.shape[-1])[:, :T]                                     # [H, T, dv]


def chunk_workspace_bytes(T: int, Hv: int, dk: int, dv: int, chunk: int = CHUNK) -> int:
    """Peak float32 temporaries of `chunked` for T tokens: ~10 [Hv, T, d] tensors and 3 [Hv, T, chunk]."""
    return 4 * Hv * T * (10 * max(dk, dv) + 3 * chunk)


# [] until first asked, then [None] or [(chunk, fused_recurrent)]: a plain list, not an lru_cache, so a
# torch.compile'd decode stage reads it without tracing an import
_FLA: list = []


def _fla():
    """flash-linear-attention's (chunk, fused_recurrent) gated delta rule, or None when not importable."""
    if not _FLA:
        try:  # optional dependency (GPU only): pip install flash-linear-attention
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
            _FLA.append((chunk_gated_delta_rule, fused_recurrent_gated_delta_rule))
        except Exception:  # noqa: BLE001 - any import failure means "no fla here"
            _FLA.append(None)
    return _FLA[0]


def use_fla(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"deltanet backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch" or x.device.type != "cuda":
        return False
    if _fla() is None:
        if backend == "fla":
            raise RuntimeError("deltanet backend 'fla' needs flash-linear-attention (pip install "
                               "flash-linear-attention)")
        return False
    return True


def _gated_delta_fla(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    chunk_fn, recurrent_fn = _fla()
    r = v.shape[1] // q.shape[1]
    q, k = (t.repeat_interleave(r, dim=1) for t in (q, k))                         # [T, Hv, dk]
    fn = recurrent_fn if q.shape[0] <= RECURRENT_MAX_T else chunk_fn
    # by keyword: fla's two functions order their parameters differently (fused_recurrent's 5th is `gk`,
    # a per-key decay, in fla 0.6: beta passed 5th there silently computed another recurrence)
    o, final = fn(q[None], k[None], v[None], g=g.float()[None], beta=beta.to(v.dtype)[None],
                  initial_state=state[None], output_final_state=True, use_qk_l2norm_in_kernel=True)
    state.copy_(final[0])
    return o[0].to(v.dtype)


def gated_delta(q, k, v, g, beta, state: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    if use_fla(q, backend):
        return _gated_delta_fla(q, k, v, g, beta, state)
    hq, hk, hv, hg, hb = _heads_first(q, k, v, g, beta)
    fn = recurrent if q.shape[0] <= RECURRENT_MAX_T else chunked
    return fn(hq, hk, hv, hg, hb, state).transpose(0, 1).to(v.dtype)              # [T, Hv, dv]
