"""Which models decode through torch.compile'd stages, applied from outside the model (gpt-fast style).

    compile_decode(model, enable=True, *, backend="inductor", mode=None, options=None, fuse_qkv=True)
        -> DecodeStages | None    opt in (lazy: compiles on the first decode step); enable=False: off again
    compiled_stages(model)  -> the DecodeStages compile_decode gave this model, or None
    decode_stages(model)    -> the stages a piecewise step runs: the compiled ones unless off or failed
    decode_forward(model, tokens[1], input_pos[1], kv, executor) -> logits [1, V] float32
        one decode step: the compiled stages when they apply (T=1, no autograd), else model(...)

The model itself stays pure: the runner remembers, weakly keyed by the model object, the stages it was
given, so a new Generator over the same model reuses them instead of compiling again (Dynamo caches per
function code object and counts recompiles per process: a fresh backend per Generator would recompile every
time and hit the limit after 8). Idempotent: the same settings keep the compiled stages. fuse_qkv also
applies models/transforms.fuse_qkv (one q/k/v matmul; prefill uses it too); enable=False unfuses.
mode: None or "max-autotune-no-cudagraphs"; options: Inductor config (e.g. {"coordinate_descent_tuning":
True}). Prefill and T > 1 stay eager.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from hotexperts.engine.runner.stages import DecodeStages
from hotexperts.models import transforms

_COMPILED: weakref.WeakKeyDictionary[nn.Module, DecodeStages] = weakref.WeakKeyDictionary()


def compile_decode(model: nn.Module, enable: bool = True, *, backend="inductor", mode: str | None = None,
                   options: dict | None = None, fuse_qkv: bool = True) -> DecodeStages | None:
    transforms.fuse_qkv(model, enable and fuse_qkv)
    if not enable:
        _COMPILED.pop(model, None)
        return None
    stages = DecodeStages(True, backend=backend, mode=mode, options=options)
    current = _COMPILED.get(model)
    if current is None or current.settings != stages.settings:
        _COMPILED[model] = current = stages
    return current


def compiled_stages(model: nn.Module) -> DecodeStages | None:
    return _COMPILED.get(model)


def decode_stages(model: nn.Module) -> DecodeStages:
    stages = _COMPILED.get(model)
    return stages if stages is not None and not stages.failed else DecodeStages(False)


def decode_forward(model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor, kv,
                   executor) -> torch.Tensor:
    stages = _COMPILED.get(model)
    if stages is not None and stages.applies(tokens):
        logits = stages.run(model, tokens, input_pos, kv, executor)
        if logits is not None:                           # None: compiling failed (warned): eager
            return logits
    return model(tokens, input_pos, kv, executor)
