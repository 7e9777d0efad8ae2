"""The VRAM plan of a model from its config alone (no weights loaded): the plan the engine would solve on a
GPU (experts/solve.py, the same solver), computed on any machine, e.g. for the real Qwen3-30B-A3B behind
the mini presets.

    plan = shape_plan("qwen3-30b-a3b", "cpu", budget=2.2 * GiB, context=0.5 * GiB, max_context=640,
                      parallel=1, verify_tokens=0, graphs=True, cublas_workspace=True)
    plan.vram      -> {"total", "context", "dense", "kv", "workspace", ["graphs", "verify", "batch",]
                       "staging", "slots"} bytes
    plan.prefill_chunk   the prompt chunk it was made for (engine.pick_prefill_chunk, as the engine picks)
    plan.notes     why that chunk, where it is not the default
    dense_gpu_bytes(cfg, dtype, dense_format="int8g32", host_embedding=True) -> bytes

dense = the model built on the meta device (no memory), the parameters and buffers it keeps on the GPU:
quantizable projections (models/qlinear.quantizable_linears: never a router) in `dense_format` (int8g32 =
GGUF Q8_0's layout, 34 bytes per 32 weights; "none" = the dtype), the rest in the dtype, the token
embedding in host memory when untied (load_source's default on CUDA). kv = models/cache.cache_bytes;
workspace = engine.workspace_bytes at the prompt chunk the generator uses; graphs / verify / batch =
engine/memcheck.feature_bytes for the features on (graphs: CUDA-graph decode, as the engine on CUDA;
parallel: sequence slots, their KV too; verify_tokens: the longest verify step), each stream's cuBLAS
workspace counted unless cublas_workspace is False (CUBLAS_WORKSPACE_CONFIG=:0:0, which the engine sets
under a tight budget: then pass a context measured with it too); the expert sizes are
experts/build.expert_sizes on CUDA in `expert_format` (engine/memcheck.FORMAT_BYTES); context = the CUDA
context measured on the GPU machine (given: it cannot be known without one).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from hotexperts.engine.engine import kv_bytes, pick_prefill_chunk, workspace_bytes
from hotexperts.engine.generate import Generator
from hotexperts.engine.memcheck import CUBLAS_STREAM_BYTES, FORMAT_BYTES, feature_bytes
from hotexperts.engine.presets import preset_config
from hotexperts.errors import HotExpertsError
from hotexperts.experts.budget import Budget
from hotexperts.experts.build import expert_sizes
from hotexperts.experts.placement import Placement, PlacementPlan
from hotexperts.experts.solve import solve
from hotexperts.models import get_arch
from hotexperts.models.qlinear import quantizable_linears
from hotexperts.models.transformer import MoETransformer

DENSE_FORMAT_BYTES = {"none": None, "int8g32": 34 / 32, "int8g16": 18 / 16}


def shape_plan(preset: str, placement: str | Placement, *, budget: int | None, context: int,
               max_context: int, expert_format: str = "q4_k", dense_format: str = "int8g32",
               dtype: torch.dtype = torch.bfloat16, parallel: int = 1, verify_tokens: int = 0,
               graphs: bool = True, cublas_workspace: bool = True) -> PlacementPlan:
    """The plan (module doc) of preset `preset`'s config at `budget` bytes (None = unlimited)."""
    if expert_format not in FORMAT_BYTES:
        raise HotExpertsError(f"expert format must be one of {', '.join(FORMAT_BYTES)}, "
                              f"got {expert_format!r}")
    hf = preset_config(preset.removeprefix("preset:"))
    cfg = get_arch(hf["model_type"]).config_from_hf(hf)
    fixed = {"context": context, "dense": dense_gpu_bytes(cfg, dtype, dense_format),
             "kv": kv_bytes(cfg, max_context, dtype, parallel)}
    stream = CUBLAS_STREAM_BYTES if cublas_workspace else 0
    slot = math.ceil(cfg.expert_params * FORMAT_BYTES[expert_format])
    sizes = expert_sizes(tuple(cfg.moe_layers), cfg.num_experts, slot, cfg.expert_params, cuda=True,
                         quantized=True, dtype_bytes=dtype.itemsize)
    p = Placement.parse(placement) if isinstance(placement, str) else placement

    def plan_at(chunk: int):
        parts = {**fixed, "workspace": workspace_bytes(cfg, dtype, chunk, max_context)}
        parts |= feature_bytes(cfg, dtype, max_context, parallel=parallel, verify_tokens=verify_tokens,
                               graphs=graphs, quantized_cuda=True, prompt_chunk=chunk, cublas_stream=stream)
        return solve(p, sizes, Budget(budget, sum(parts.values()), slot, parts)), parts

    chunk, (plan, _) = pick_prefill_chunk(min(Generator.prefill_chunk, max_context), plan_at, cfg.num_experts)
    return replace(plan, prefill_chunk=chunk)


def dense_gpu_bytes(cfg, dtype: torch.dtype = torch.bfloat16, dense_format: str = "int8g32",
                    host_embedding: bool = True) -> int:
    """Bytes of the dense weights on the GPU (module doc)."""
    if dense_format not in DENSE_FORMAT_BYTES:
        raise HotExpertsError(f"dense format must be one of {', '.join(DENSE_FORMAT_BYTES)}, "
                              f"got {dense_format!r}")
    with torch.device("meta"):
        model = MoETransformer(cfg)
    per = DENSE_FORMAT_BYTES[dense_format]
    quantized = {f"{n}.weight" for n in quantizable_linears(model)} if per else set()
    if host_embedding and not cfg.tie_word_embeddings:
        skip = {"model.embed_tokens.weight"}
    else:
        skip = set()
    total = 0.0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if name not in skip:
            total += t.numel() * (per if name in quantized else dtype.itemsize)
    return int(total)
