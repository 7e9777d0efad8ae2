"""The real model behind a mini preset, and the plan it gets at a VRAM budget, for predictions on machines
without a GPU (bench/predict.py) and for fitting the cost model to GPU runs (trace/fit.py, calibrate.py).

    shape = shape_for("preset:qwen3-30b-a3b-mini", quant="int4")   # costmodel.ModelShape | None
    plan = real_plan(shape, budget_gib)   # {"budget_gib", "slots", "n_cpu_moe", "hot_k", "cache_slots"}

real_plan solves layers:auto, hot:auto and cache:auto with the engine's own solver (experts/solve.py) on
the real shape's sizes: dense weights, a 4096-token KV cache and the workspace reserved, no prompt staging.
"""

from __future__ import annotations

from dataclasses import replace

from hotexperts.experts.budget import Budget
from hotexperts.experts.placement import Placement
from hotexperts.experts.solve import ModelSizes, solve
from hotexperts.formats import BYTES_PER_WEIGHT, EXPERT_QUANT
from hotexperts.trace.costmodel import SHAPES, ModelShape

GIB = 2**30
WORKSPACE_GIB = 0.5
KV_GIB = 0.4                      # a 4096-token bf16 KV cache of the 30B-class shapes, rounded up
FLOAT_BYTES = 2.0                 # --expert-quant none: the real models' bf16
# bytes per expert weight of each --expert-quant name (formats.py's vocabulary)
FORMAT_BYTES = {name: BYTES_PER_WEIGHT.get(fmt, FLOAT_BYTES) for name, fmt in EXPERT_QUANT.items()}
# the CPU rate the cost model has for each store format (int8g32, q4_k: the nearest measured one)
CPU_RATE = {None: "bf16", "int8": "int8", "int4g32": "int4", "int8g32": "int8", "q4_k": "int4"}


def shape_for(preset: str, quant: str) -> ModelShape | None:
    """The real shape behind a preset name ('qwen3-30b-a3b-mini' -> qwen3-30b-a3b), in the expert format."""
    name = preset.removeprefix("preset:").removesuffix("-mini")
    if name not in SHAPES:
        return None
    return replace(SHAPES[name], gpu_bytes_per_param=FORMAT_BYTES[quant],
                   cpu_format=CPU_RATE[EXPERT_QUANT[quant]])


def real_plan(shape: ModelShape, budget_gib: float) -> dict:
    sb, Lm, E = shape.expert_bytes_gpu, shape.num_moe_layers, shape.num_experts
    sizes = ModelSizes(tuple(range(Lm)), E, sb)
    reserved = int(shape.dense_bytes + (KV_GIB + WORKSPACE_GIB) * GIB)
    budget = Budget(int(budget_gib * GIB), reserved, sb)
    layers = solve(Placement.parse("layers:auto"), sizes, budget)
    hot = solve(Placement.parse("hot:auto"), sizes, budget)
    cache = solve(Placement.parse("cache:auto"), sizes, budget)
    slots = max(0, budget.free_for_experts // sb)
    return {"budget_gib": budget_gib, "slots": slots, "n_cpu_moe": len(layers.layers("cpu")),
            "hot_k": next(iter(hot.where.values())), "cache_slots": cache.shared_slots}
