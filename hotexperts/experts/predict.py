"""Next-layer expert prediction: during MoE layer L, guess layer L+1's experts by running L+1's router on
L's state (the residual stream changes little from one layer to the next).

    p = NextLayerPredictor.from_model(model, extra=0)        the model's own norm and router modules
    p.next_layer(L)          -> L+1's MoE layer index, or None (L is the last MoE layer)
    p.predict(L, h [T,D])    -> ids [T, k+m] int64: router(L+1)(post_attention_layernorm(L+1)(h)) top k+m
                                h: layer L's residual after attention (and after its shared expert)
    p.predict_from_input(L, xn [T,D]) -> the same from the executor's input xn = norm_L(h): RMSNorm is
                                scale-invariant per row, so norm_{L+1}(xn / w_L) = norm_{L+1}(h) up to eps
                                (w_L: L's norm weight, 1 + w for zero-centred norms; |w| clamped at 1e-6)
    p.misses(L, ids [T,k+m], slot_row [E] int) -> [P] unique predicted experts of L+1 with no slot
    recall(predicted [N,P], actual [N,K], counted [N,K] bool) -> share of counted cells covered

The predictor holds references to the model's modules (no copies; `models/` is not imported: a model is
anything with `.model.layers[i]`, each with `.is_moe`, `.ffn_name`, `.post_attention_layernorm`, whose MoE
block has `.gate`). A linear router ranks by its logits (top k + extra); any other router (sigmoid group)
gives its own top-k choice and ignores `extra`. A guess only asks the planner for fills (NextLayerPrefetch
below); outputs depend on which experts are hits only as any cache's do (the order of an exact float sum).
"""

from __future__ import annotations

import torch
from torch import nn

from hotexperts.errors import HotExpertsError


class NextLayerPredictor:
    def __init__(self, layers: list, top_k: int, extra: int = 0):
        if extra < 0:
            raise HotExpertsError(f"next-layer prediction: extra guesses must be >= 0, got {extra}")
        moe = [ly for ly in layers if getattr(ly, "is_moe", False)]
        if not moe:
            raise HotExpertsError("next-layer prediction needs a model with MoE layers")
        self.top_k, self.extra = int(top_k), int(extra)
        self._next = {a.layer: b.layer for a, b in zip(moe, moe[1:], strict=False)}
        self._norm = {ly.layer: ly.post_attention_layernorm for ly in moe}
        self._gate = {ly.layer: getattr(ly, ly.ffn_name).gate for ly in moe}

    @classmethod
    def from_model(cls, model, extra: int = 0) -> NextLayerPredictor:
        return cls(list(model.model.layers), model.cfg.top_k, extra)

    @property
    def guesses(self) -> int:
        return self.top_k + self.extra

    def next_layer(self, layer: int) -> int | None:
        return self._next.get(int(layer))

    @torch.no_grad()
    def predict(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """[T, k+m] predicted expert ids of the next MoE layer from layer `layer`'s residual h [T, D]."""
        nxt = self.next_layer(layer)
        if nxt is None:
            return None
        gate = self._gate[nxt]
        xn = self._norm[nxt](h.to(self._norm[nxt].weight.dtype))
        if isinstance(gate, nn.Linear):
            n = min(self.guesses, gate.out_features)
            return torch.topk(gate(xn), n, dim=-1).indices
        return gate(xn)[0]

    @torch.no_grad()
    def predict_from_input(self, layer: int, xn: torch.Tensor) -> torch.Tensor | None:
        """predict() from the executor's input xn = post_attention_layernorm_L(h) (module doc)."""
        if self.next_layer(layer) is None:
            return None
        norm = self._norm[int(layer)]
        w = norm.weight.float() + 1.0 if getattr(norm, "zero_centered", False) else norm.weight.float()
        w = torch.where(w.abs() < 1e-6, torch.full_like(w, 1e-6), w)
        return self.predict(layer, xn.float() / w)

    def misses(self, layer: int, ids: torch.Tensor, slot_row: torch.Tensor) -> list[int]:
        """Unique predicted experts of the next layer (ids from predict) that have no slot (slot_row[e] < 0:
        the next layer's host mirror), in ascending id order."""
        e = torch.unique(ids.flatten().to(torch.long))
        e = e[(e >= 0) & (e < slot_row.numel())]
        return e[slot_row[e] < 0].tolist()


def recall(predicted: torch.Tensor, actual: torch.Tensor, counted: torch.Tensor | None = None) -> float:
    """Share of counted cells of actual [N, K] whose expert is among predicted [N, P] of the same row
    (counted: [N, K] bool, e.g. the misses; default every cell >= 0). NaN when nothing is counted."""
    if predicted.shape[0] != actual.shape[0]:
        raise HotExpertsError(f"recall: {predicted.shape[0]} predicted rows for {actual.shape[0]} actual "
                              "rows")
    covered = (actual[:, :, None] == predicted[:, None, :]).any(-1)                     # [N, K]
    counted = (actual >= 0) if counted is None else counted & (actual >= 0)
    n = int(counted.sum())
    return float("nan") if n == 0 else float((covered & counted).sum()) / n


class NextLayerPrefetch:
    """The hybrid executor's use of a NextLayerPredictor (HybridExecutor.enable_prediction), decode (T = 1)
    steps of the synchronous path only. It decides no swap: a guess is a request to the cache's planner,
    the one swap decider (CachePlanner.request_prefetch: its rules), whose loads the slot cache issues.

        before_layer(layer)            publish fills that completed (slots.poll: never blocks), so a prefetch
                                       issued during the previous layer can serve this one
        after_route(step, layer, x)    guess the next layer's experts from x [T, D] (this layer's input,
                                       predict_from_input) and hand them to planner.request_prefetch
        stats() -> dict                the planner's PrefetchStats (requests, predictions, busy, issued,
                                       useful, late, wasted, recall, miss_recall)

    A wrong guess costs link time only: hits and misses are split per layer from the slot table as always.
    """

    def __init__(self, predictor: NextLayerPredictor, planner, slots, cold_steps: int = 8,
                 max_fills: int = 2):
        if max_fills < 0 or cold_steps < 0:
            raise HotExpertsError(f"next-layer prefetch: max_fills and cold_steps must be >= 0, got "
                                  f"{max_fills} and {cold_steps}")
        self.predictor, self.planner, self.slots = predictor, planner, slots
        self.cold_steps, self.max_fills = int(cold_steps), int(max_fills)
        self.managed = set(planner.layers)

    def before_layer(self, layer: int) -> None:
        if self.slots.fills:
            self.slots.poll()

    def after_route(self, step: int, layer: int, x: torch.Tensor) -> None:
        nxt = self.predictor.next_layer(layer)
        if nxt is None or nxt not in self.managed:
            return
        guess = self.predictor.predict_from_input(layer, x).cpu()                # [T, k+m], best first
        swaps = self.planner.request_prefetch(step, nxt, guess.T.flatten().numpy(), self.slots.residency,
                                              max_fills=self.max_fills, cold_steps=self.cold_steps)
        if swaps:
            self.slots.issue(swaps)

    def stats(self) -> dict:
        return self.planner.prefetch.stats.to_dict()
