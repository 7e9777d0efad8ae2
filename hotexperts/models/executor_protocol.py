"""The one seam between models and expert placement: the ExpertExecutor protocol.

A model computes attention, the router and shared experts itself, then hands the routed-expert work
to an executor it was given. It never knows where experts live (GPU slots, CPU, both).

Shapes:  T tokens in this forward (T=1 in decode), K = top_k, D = hidden size.
    x        [T, D]   hidden states after the post-attention norm, model dtype, model device
    ids      [T, K]   int64 routed expert ids
    weights  [T, K]   routing weights, already normalised as the architecture wants, in x.dtype
    returns  [T, D]   sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), x.dtype, x.device
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

RouteCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, ids [T,K], weights [T,K])


@runtime_checkable
class ExpertExecutor(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Compute the routed experts of decoder layer `layer` for these tokens."""
        ...

    def end_step(self) -> None:
        """Called by the engine once after every forward pass (a prompt chunk or one decode token)."""
        ...
