"""Predicted speeds on a named hardware profile, for machines where a "GPU" side would be fake.

On a CPU-only machine the bench cannot measure GPU speed, but it can run the real cache (policies, slots,
hits and misses, swaps) on a model with the real routing topology at tiny widths (e.g.
preset:qwen3-30b-a3b-mini) under replayed routing, with the slot counts the REAL model would get at a VRAM
budget on that hardware. The cost model (trace/costmodel.py) then turns the measured per-layer hit rates and
swap rates into predicted tokens/s for the real shape. Every number it prints is labelled a prediction.

    plan = real_plan(shape, budget_gib)            -> {"n_cpu_moe": N, "hot_k": K, "cache_slots": S}
                                                      (trace/real_shape.py: the engine's own solver)
    placements_for(plan, names)                    -> explicit placement strings for the mini model
    predictions(report, shape, hw, plan, prompt_tokens=512) -> rows {label, placement, decode_tps, ...}
    checked(rows, hw) -> (rows to print, notes)    the all-GPU and layer-offload rows only where a published
                                                   stock llama.cpp figure for the card (trace/profiles.py
                                                   PUBLISHED, cited) is within CHECK_TOLERANCE of them
    table(rows, shape, hw, plan, tests, notes)     the columns name the tests asked for (pp128, tg64, ...)

Why the check: the cost model describes this engine's decode (fitted on an H200), not stock llama.cpp,
and on other cards its constants are estimates; e.g. it predicts 56 tok/s all-GPU for Qwen3-30B-A3B with
int4 experts on an RTX 4090 where stock llama.cpp measures 194-206 t/s (ggml-org/llama.cpp PR #15631).
A row that disagrees with a published figure that much is not printed; the published figure is shown.
"""

from __future__ import annotations

from hotexperts.trace.costmodel import ModelShape, predict
from hotexperts.trace.profiles import CHECK_TOLERANCE, published
from hotexperts.trace.real_shape import real_plan, shape_for

__all__ = ["checked", "placements_for", "predictions", "real_plan", "shape_for", "table"]
CHECKED_KINDS = {"gpu": "all-GPU", "n-cpu-moe": "layer offload"}


def placements_for(plan: dict, names: list[str]) -> list[str]:
    table = {"cpu-moe": "cpu", "n-cpu-moe": f"layers:{plan['n_cpu_moe']}", "hot": f"hot:{plan['hot_k']}",
             "cache": f"cache:{plan['cache_slots']}slots", "gpu": "gpu"}
    return [table.get(n, n) for n in names]


def _cost_placement(placement: str, plan: dict) -> str:
    kind, _, arg = placement.partition(":")
    return {"gpu": "gpu", "cpu": "cpu-moe", "layers": f"n-cpu-moe:{arg}", "hot": f"hot:{arg}",
            "cache": f"cache:{plan['cache_slots']}"}[kind]


def predictions(report: dict, shape: ModelShape, hw, plan: dict, prompt_tokens: int = 512) -> list[dict]:
    rows = []
    for r in report["results"]:
        if r["error"]:
            continue
        cost = _cost_placement(r["placement"], plan)
        kw = {}
        if cost.startswith(("hot", "cache")):
            kw = {"layer_hit": r["layer_hit"], "swaps_per_token": r["swaps"] / max(r["decode_tokens"], 1)}
        p = predict(shape, hw, cost, prompt_tokens=prompt_tokens, **kw)
        rows.append({"label": r["label"], "placement": cost, "decode_tps": p.decode_tps,
                     "prompt_tps": p.prompt_tps, "vram_gb": p.vram_gb, "hit_rate": r["hit_rate"],
                     "terms_ms": p.decode_ms})
    return rows


def checked(rows: list[dict], hw) -> tuple[list[dict], list[str]]:
    """Drop the all-GPU / layer-offload rows that no published stock figure confirms; say why."""
    keep, notes = [], []
    for r in rows:
        kind = r["placement"].split(":")[0]
        if kind not in CHECKED_KINDS:
            keep.append(r)
            continue
        ref, what = published(hw.name, kind), CHECKED_KINDS[kind]
        if ref is None:
            notes.append(f"{what} row not printed: no published stock llama.cpp figure for '{hw.name}' to "
                         f"check the cost model against")
        elif 1 / CHECK_TOLERANCE <= r["decode_tps"] / ref["tg_tps"] <= CHECK_TOLERANCE:
            keep.append(r | {"published": ref})
            notes.append(f"{what} row checked: {ref['what']} ({ref['url']})")
        else:
            notes.append(f"{what} row not printed: the cost model says {r['decode_tps']:.0f} tok/s, "
                         f"published {ref['what']} ({ref['url']}); the model does not describe this card")
    return keep, notes


def table(rows: list[dict], shape: ModelShape, hw, plan: dict, tests=None, notes=()) -> str:
    tg = next((t.name for t in tests or () if t.kind == "tg"), "tg")
    pp = next((t.name for t in tests or () if t.kind == "pp"), "pp512")
    base = {r["label"]: r["decode_tps"] for r in rows}
    head = (f"PREDICTED (not measured) for {shape.name} on '{hw.name}' ({hw.label}: {hw.notes}), "
            f"VRAM budget {plan['budget_gib']:g} GiB -> {plan['slots']} expert slots; hit rates measured "
            f"by the live cache on the mini model under the replayed routing")
    lines = [f"| placement | hit rate | predicted {tg} tok/s | predicted {pp} tok/s | VRAM GiB "
             f"| vs cpu-moe |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r["decode_tps"] / base["cpu-moe"] if base.get("cpu-moe") else float("nan")
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        lines.append(f"| {r['label']} ({r['placement']}) | {hit} | {r['decode_tps']:.1f} | "
                     f"{r['prompt_tps']:.0f} | {r['vram_gb']:.1f} | {ratio:.2f}x |")
    lines += [f"- {n}" for n in notes]
    caveat = ("read: the ratios between rows (same model, same terms), not the absolute tok/s; "
              "caveat: the cost model describes the engine's graphed decode (one CUDA graph per step, CPU "
              "experts via the native worker); on the H200 machine it is within 15% for the qwen3-30b-a3b "
              "placements it was fitted on (docs/simulator.md); other machines' profiles are estimates, and "
              "hot/cache rows assume swaps never stall the host (fixed after the last H200 run, unmeasured)")
    return head + "\n\n" + "\n".join(lines) + "\n\n" + caveat
