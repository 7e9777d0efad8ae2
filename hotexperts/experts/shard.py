"""ShardExecutor: one card's part of a MultiPlan (experts/multi_placement.py), summed over the cards by one
all-reduce per MoE layer. One process per card runs the same model and calls its own ShardExecutor.

    ex = ShardExecutor(plan, card, store, device, all_reduce=torch.distributed.all_reduce)
    y = ex(layer, x [T,D], ids [T,K], weights [T,K]) -> [T, D]       # identical on every card

Per MoE layer this card holds, in slots, its experts' rows [lo, hi) of the intermediate dim I:
    w13 [S, 2r, D]  gate rows lo..hi-1 then up rows I+lo..I+hi-1       (r = hi - lo; pools: r = I)
    w2  [S, D, r]   down columns lo..hi-1
    slot_of [E] int32: expert id -> slot, -1 where this card holds nothing of it
    b13 [E, 2r] the gate/up bias's same rows (GPT-OSS), indexed by expert id
partial = gpu_moe(x, ids, weights, w13, w2, slot_of) in fp32 (one fused kernel: the Triton one on CUDA, the
torch one elsewhere); on the plan's CPU card, + cpu_moe over the experts no card holds (ids of held experts
masked to -1); then all_reduce(partial) (a sum) and the cast to x.dtype. Exact: sum over the cards' row
slices of w2[:, rows] @ act(gate[rows], up[rows]) is the whole expert, the activation being elementwise.

`slice_experts(le, experts, lo, hi)` cuts any expert format exactly (float tensors, int8, int8gG, int4g32,
q4_k: the cut must fall on w2's column group, `column_granularity`); the gate/up rows of a quantized w13 are
whole rows, cut anywhere. The executor has no host synchronisation on the card path but is not
`graph_safe` (the all-reduce and the CPU part run outside a CUDA graph).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from hotexperts.config import DEFAULT_KERNELS, KernelOptions
from hotexperts.errors import PlacementError
from hotexperts.executor import ExpertExecutor
from hotexperts.kernels.cpu_moe import cpu_moe
from hotexperts.kernels.gpu_moe import gpu_moe
from hotexperts.weights import Q4K_BLOCK, Q4K_BYTES, LayerExperts, QuantizedWeight, Weight

AllReduce = Callable[[torch.Tensor], object]          # sums a tensor over the cards, in place


def column_granularity(w: Weight) -> int:
    """The smallest cut of w2's columns (the intermediate dim) that keeps its format exact."""
    if not isinstance(w, QuantizedWeight) or w.fmt == "int8":       # int8: one scale per whole row
        return 1
    return Q4K_BLOCK if w.fmt == "q4_k" else w.group


def _rows(w: Weight, rows: torch.Tensor) -> Weight:
    """w [S, N, Kin] with rows (dim -2) `rows` kept; quantized formats keep each row's scales."""
    if not isinstance(w, QuantizedWeight):
        return w.index_select(-2, rows).contiguous()
    dim = -1 if w.fmt == "int8" else -2                                        # int8 scale: [S, N]

    def take(t, d):
        return None if t is None else t.index_select(d, rows).contiguous()

    return QuantizedWeight(w.fmt, take(w.q, -2), take(w.scale, dim), take(w.zero, dim))


def _columns(w: Weight, lo: int, hi: int) -> Weight:
    """w [S, D, I] with columns lo..hi-1 kept (lo, hi multiples of column_granularity(w))."""
    g = column_granularity(w)
    if lo % g or hi % g:
        raise PlacementError(f"cannot cut the experts' intermediate dim at {lo}..{hi}: the format groups "
                             f"{g} columns")
    if not isinstance(w, QuantizedWeight):
        return w[..., lo:hi].contiguous()
    q_lo, q_hi = {"int4g32": (lo // 2, hi // 2),
                  "q4_k": (lo // Q4K_BLOCK * Q4K_BYTES, hi // Q4K_BLOCK * Q4K_BYTES)}.get(w.fmt, (lo, hi))

    def groups(t):
        if t is None or w.fmt == "int8":
            return None if t is None else t.contiguous()
        return t[..., lo // g:hi // g].contiguous()

    return QuantizedWeight(w.fmt, w.q[..., q_lo:q_hi].contiguous(), groups(w.scale), groups(w.zero))


def slice_experts(le: LayerExperts, experts: Sequence[int], lo: int, hi: int) -> LayerExperts:
    """The experts `experts` of a layer with intermediate rows [lo, hi): w13 [S, 2r, D], w2 [S, D, r];
    b13 [E, 2r] keeps every expert (it is indexed by expert id)."""
    I = le.w2.shape[-1]
    if not 0 <= lo <= hi <= I:
        raise PlacementError(f"intermediate rows {lo}..{hi} are outside the experts' {I}")
    idx = torch.tensor(list(experts), dtype=torch.long)
    rows = torch.cat([torch.arange(lo, hi), torch.arange(I + lo, I + hi)])
    w13, w2 = _rows(le.w13[idx], rows), _columns(le.w2[idx], lo, hi)
    b13 = None if le.b13 is None else le.b13.index_select(-1, rows).contiguous()
    return LayerExperts(w13, w2, b13, le.act)


def _to(le: LayerExperts, device: torch.device) -> LayerExperts:
    return LayerExperts(le.w13.to(device), le.w2.to(device), None if le.b13 is None else le.b13.to(device),
                        le.act)


class ShardExecutor(ExpertExecutor):
    def __init__(self, plan, card: int, store, device, all_reduce: AllReduce, *,
                 options: KernelOptions = DEFAULT_KERNELS, gpu_kernel=None, cpu_kernel=None):
        if not 0 <= card < len(plan.cards):
            raise PlacementError(f"card {card} is not in the plan's {len(plan.cards)} cards")
        self.plan, self.card, self.store = plan, card, store
        self.device, self.all_reduce = torch.device(device), all_reduce
        self.gpu_moe = gpu_kernel or functools.partial(gpu_moe, backend=options.gpu_moe)
        self.cpu_moe = cpu_kernel or functools.partial(cpu_moe, options=options)
        part = plan.cards[card]
        self.held = {l: self._held(l, part) for l in store.layers}                   # l -> (experts, slot_of)
        self.cold = {l: self._cold_mask(l) for l in store.layers} if card == plan.cpu_card else {}

    def _held(self, layer: int, part) -> tuple[LayerExperts, torch.Tensor] | None:
        ids = part.experts.get(layer, ())
        if not ids:
            return None
        slot_of = torch.full((self.store.num_experts,), -1, dtype=torch.int32)
        slot_of[list(ids)] = torch.arange(len(ids), dtype=torch.int32)
        le = _to(slice_experts(self.store.layer(layer), ids, *part.rows), self.device)
        return le, slot_of.to(self.device)

    def _cold_mask(self, layer: int) -> torch.Tensor | None:
        """[E + 1] bool on the host: True for experts no card holds (the last entry stands for id -1)."""
        cold = self.plan.cpu_experts(layer)
        if not cold:
            return None
        mask = torch.zeros(self.store.num_experts + 1, dtype=torch.bool)
        mask[list(cold)] = True
        return mask

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.on_route is not None:
            self.on_route(layer, ids, weights)
        held = self.held[layer]
        if held is None:
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)             # [T, D]
        else:
            le, slot_of = held
            variant = {} if le.plain else {"act": le.act, "b13": le.b13}
            y = self.gpu_moe(x, ids, weights, le.w13, le.w2, slot_of, **variant).float()
        cold = self.cold.get(layer)
        if cold is not None:
            y += self._cpu_part(layer, x, ids, weights, cold).to(y.device, torch.float32)
        self.all_reduce(y)
        return y.to(x.dtype)

    def _cpu_part(self, layer, x, ids, weights, cold: torch.Tensor) -> torch.Tensor:
        """The experts no card holds, on the host: ids of the others (and -1) masked to -1."""
        ids_h = ids.to("cpu", torch.long)
        ids_h = torch.where(cold[ids_h], ids_h, -1)             # id -1 indexes the mask's last entry: False
        return self.cpu_moe(x.cpu(), ids_h, weights.cpu(), self.store.layer(layer))
