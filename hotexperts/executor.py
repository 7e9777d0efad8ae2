"""ExpertExecutor: the one seam between a model and where its routed experts live, as a base class.

A model computes attention, the router and any shared expert itself, then hands the routed-expert work of
each MoE layer to the executor it was given; it never knows where experts live (GPU slots, CPU, both).

    y = executor(layer, x, ids, weights)
        x        [T, D]   hidden states after the post-attention norm, model dtype, model device
        ids      [T, K]   int64 routed expert ids (-1 = no expert: contributes 0)
        weights  [T, K]   routing weights, already normalised as the architecture wants, in x.dtype
        y        [T, D]   sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), x.dtype, x.device

Everything else is a hook with a no-op default here, so callers (the decode runner, the generator, the CLI,
the bench) call it directly and never probe for attributes:
    end_step()          after every forward pass (a prompt chunk or one decode token)
    before_step()       right before a decode forward is launched (T=1, or a T-token verify step: then a
                        T > 1 call is a decode step over the union of the tokens' experts, not a prompt)
    flush()             finish deferred bookkeeping now (stats, profiles and prompts need it current)
    check_errors()      raise now if a step run so far failed (cheap; after the host synchronised)
    close()             stop background threads; the executor cannot run afterwards
    stats()             engine.stats()["cache"]: per-layer cache statistics, or None
    cache_stats         the CacheStats object behind stats() (table, heatmap), or None
    export_profile(p)   write the hot set as a routing profile (HotExpertsError without a cache)
    wait_for_fills()    block until issued expert copies landed (benchmark warm-up)
    set_gpu_timing(on)  per-layer GPU time with CUDA events (`--stats`)
    graph_safe          True: a T=1 forward has no host synchronisation: capture it as one CUDA graph
    verify_graph_safe   True: a T-token decode (verify) forward has none either (engine/runner/verify.py)
    on_route            None, or a callable(layer, ids, weights) called first in every __call__ (tracing)
    plan                the placement plan it executes (experts/placement.py), or None; given to the
                        constructor (experts/build.py), never set afterwards
    slots               the SlotCache of GPU-resident experts (experts/slots.py), or None: none
    planner             the CachePlanner choosing swaps (experts/planner.py), or None: no managed cache
    prefetch            the next-layer prefetch (experts/predict.py, after enable_prediction), or None
These attributes are read directly (`executor.plan`); no caller probes with getattr / hasattr
(tests/test_executor.py scans the package, the scripts and the bench for it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hotexperts.errors import HotExpertsError

RouteCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, ids [T,K], weights [T,K])


class ExpertExecutor:
    graph_safe: bool = False
    verify_graph_safe: bool = False
    on_route: RouteCallback | None = None
    cache_stats = None
    plan = None
    slots = None
    planner = None
    prefetch = None

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def end_step(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def check_errors(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict | None:
        return None

    def export_profile(self, path: str) -> str:
        raise HotExpertsError("writing a routing profile needs an expert cache (--n-cpu-moe, --moe-hot-k or "
                              "--moe-cache)")

    def wait_for_fills(self) -> None:
        pass

    def set_gpu_timing(self, on: bool) -> None:
        pass
