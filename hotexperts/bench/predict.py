"""Predicted speeds on a named hardware profile, for machines where a "GPU" side would be fake.

On a CPU-only machine the bench cannot measure GPU speed, but it can run the real cache (policies, slots,
hits and misses, swaps) on a model with the real routing topology at tiny widths (e.g.
preset:qwen3-30b-a3b-mini) under replayed routing, with the slot counts the REAL model would get at a VRAM
budget on that hardware. The cost model (trace/costmodel.py) then turns the measured per-layer hit rates and
swap rates into predicted tokens/s for the real shape. Every number it prints is labelled a prediction.

    plan = real_plan(shape, budget_gib)            -> {"n_cpu_moe": N, "hot_k": K, "cache_slots": S}
                                                      (trace/real_shape.py: the engine's own solver)
    placements_for(plan, names)                    -> explicit placement strings for the mini model
    predictions(report, shape, hw, plan)           -> rows {label, placement, decode_tps, prompt_tps, ...}
"""

from __future__ import annotations

from hotexperts.trace.costmodel import ModelShape, predict
from hotexperts.trace.real_shape import real_plan, shape_for

__all__ = ["placements_for", "predictions", "real_plan", "shape_for", "table"]

def placements_for(plan: dict, names: list[str]) -> list[str]:
    table = {"cpu-moe": "cpu", "n-cpu-moe": f"layers:{plan['n_cpu_moe']}", "hot": f"hot:{plan['hot_k']}",
             "cache": f"cache:{plan['cache_slots']}slots", "gpu": "gpu"}
    return [table.get(n, n) for n in names]


def _cost_placement(placement: str, plan: dict) -> str:
    kind, _, arg = placement.partition(":")
    return {"gpu": "gpu", "cpu": "cpu-moe", "layers": f"n-cpu-moe:{arg}", "hot": f"hot:{arg}",
            "cache": f"cache:{plan['cache_slots']}"}[kind]


def predictions(report: dict, shape: ModelShape, hw, plan: dict) -> list[dict]:
    rows = []
    for r in report["results"]:
        if r["error"]:
            continue
        cost = _cost_placement(r["placement"], plan)
        kw = {}
        if cost.startswith(("hot", "cache")):
            kw = {"layer_hit": r["layer_hit"], "swaps_per_token": r["swaps"] / max(r["decode_tokens"], 1)}
        p = predict(shape, hw, cost, **kw)
        rows.append({"label": r["label"], "placement": cost, "decode_tps": p.decode_tps,
                     "prompt_tps": p.prompt_tps, "vram_gb": p.vram_gb, "hit_rate": r["hit_rate"],
                     "terms_ms": p.decode_ms})
    return rows


def table(rows: list[dict], shape: ModelShape, hw, plan: dict) -> str:
    base = {r["label"]: r["decode_tps"] for r in rows}
    head = (f"PREDICTED (not measured) for {shape.name} on '{hw.name}' ({hw.label}: {hw.notes}), "
            f"VRAM budget {plan['budget_gib']:g} GiB -> {plan['slots']} expert slots; hit rates measured "
            f"by the live cache on the mini model under the replayed routing")
    lines = ["| placement | hit rate | predicted tg tok/s | predicted pp512 tok/s | VRAM GB | vs n-cpu-moe |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r["decode_tps"] / base["n-cpu-moe"] if base.get("n-cpu-moe") else float("nan")
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        lines.append(f"| {r['label']} ({r['placement']}) | {hit} | {r['decode_tps']:.1f} | "
                     f"{r['prompt_tps']:.0f} | {r['vram_gb']:.1f} | {ratio:.2f}x |")
    caveat = ("caveat: the cost model describes the engine's graphed decode (one CUDA graph per step, CPU "
              "experts via the native worker); on the H200 machine it is within 15% for the qwen3-30b-a3b "
              "placements it was fitted on (docs/simulator.md); other machines' profiles are estimates, and "
              "hot/cache rows assume swaps never stall the host (fixed after the last H200 run, unmeasured)")
    return head + "\n\n" + "\n".join(lines) + "\n\n" + caveat
