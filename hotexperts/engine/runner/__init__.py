"""The engine's runner: how one decode step runs over a pure model (models/ knows none of this).

    make_decode_step(model, kv, executor, device, *, use_graph=True, piecewise=False) -> step
        step(token, pos) -> logits [V]; step.graphed
    compile_decode(model, ...), compiled_stages(model)     opt in to torch.compile'd stages (compiled.py)

    stages.py      DecodeStages: the step as prepare -> per layer pre_experts -> executor -> head, plain or
                   torch.compile'd (one graph per layer kind)
    compiled.py    which models run compiled stages; decode_forward (one step, compiled or not)
    cuda_graph.py  EagerDecodeStep; GraphDecodeStep (the whole step as one CUDA graph, graph-safe executors)
    piecewise.py   PiecewiseDecodeStep: CUDA graphs around an executor that needs the host between layers
    verify.py      make_verify_step: the T-token (2..16) decode step of speculative decoding, a CUDA graph
                   per T bucket for executors whose T > 1 calls are sync-free

The runner reads the executor's hooks, declared with defaults on ExpertExecutor (hotexperts/executor.py):
`graph_safe` (default False), `on_route` (set: run eagerly, a replay runs no Python) and `before_step()`
(right before a step launches).
"""

from __future__ import annotations

import torch

from hotexperts.engine.runner.compiled import compile_decode, compiled_stages
from hotexperts.engine.runner.cuda_graph import EagerDecodeStep, GraphDecodeStep
from hotexperts.engine.runner.piecewise import PiecewiseDecodeStep
from hotexperts.engine.runner.verify import make_verify_step

__all__ = ["EagerDecodeStep", "GraphDecodeStep", "PiecewiseDecodeStep", "compile_decode", "compiled_stages",
           "make_decode_step", "make_verify_step"]


def make_decode_step(model, kv, executor, device: torch.device | str, *, use_graph: bool = True,
                     piecewise: bool = False):
    """GraphDecodeStep on CUDA with a graph-safe executor (and use_graph); else, with `piecewise`, a
    PiecewiseDecodeStep (graphs around the executor's per-layer host work); else EagerDecodeStep."""
    device = torch.device(device)
    capturable = use_graph and device.type == "cuda" and executor.graph_safe is True
    if capturable:
        return GraphDecodeStep(model, kv, executor, device)
    if use_graph and piecewise and device.type == "cuda":
        return PiecewiseDecodeStep(model, kv, executor, device)
    return EagerDecodeStep(model, kv, executor, device)
