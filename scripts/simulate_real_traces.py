"""Run the policy simulator over every real routing trace and the project's own traces; publish the results.

    python scripts/simulate_real_traces.py [--doc docs/simulator-results.md] [--img docs/img]
        [--synthetic-tokens 2048] [--synthetic-layers 12] [--record-tokens 64] [--cache /tmp/hotexperts-sim]

Traces (never copied into the repo; recorded/synthetic ones are cached under --cache):
  the four real traces of ../shared/traces (trace/import_shared.py), a trace recorded live from
  preset:tiny-qwen3-moe (RouteRecorder; random weights), and a long synthetic trace of the calibrated
  qwen3-30b-a3b preset (trace/synthetic.py) on a subsample of its MoE layers.
For each: every policy at 12.5/25/37.5/50/75% of experts per layer (decode hit rate, ÷ Belady); a hit-rate
plot per trace and one per-layer heatmap into --img; predicted decode tok/s of the Qwen3-30B-A3B and
Mixtral-8x7B shapes on the rtx4090-7950x and h200 profiles at 16 and 24 GiB budgets. The markdown tables go
between the GENERATED markers of --doc (hand-written text outside them is kept). ~6-7 min on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hotexperts.bench.predict import real_plan  # noqa: E402
from hotexperts.trace import costmodel, profiles  # noqa: E402
from hotexperts.trace.format import RoutingTrace  # noqa: E402
from hotexperts.trace.import_shared import SHARED_TRACES, find_shared_traces, load_shared  # noqa: E402
from hotexperts.trace.simulate import ALL_POLICIES, _fill_belady, auto_cost_params, simulate  # noqa: E402

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.75)
BEGIN, END = "<!-- BEGIN GENERATED (scripts/simulate_real_traces.py) -->", "<!-- END GENERATED -->"
HW = ("rtx4090-7950x", "h200")
BUDGETS_GIB = (16, 24)
PROMPTS = ["Explain how a CPU cache works.", "Write a haiku about rain.", "List three uses of a hash map.",
           "Summarise the plot of Hamlet in two sentences."]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- traces ------------------------------------------------------------------------------------------
def recorded_trace(cache: Path, max_tokens: int) -> RoutingTrace:
    """Live routing of preset:tiny-qwen3-moe (random weights) via the RouteRecorder API, cached."""
    path = cache / f"tiny-qwen3-moe-{max_tokens}.npz"
    if path.exists():
        return RoutingTrace.load(path)
    from hotexperts.engine.engine import Engine
    from hotexperts.engine.sampling import SamplingParams
    from hotexperts.trace.record import encode_prompts, record

    engine = Engine.load("preset:tiny-qwen3-moe", dtype="float32", device="cpu", use_cuda_graph=False)
    ids = encode_prompts(engine.tokenizer, PROMPTS, raw=False)
    trace = record(engine, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                   meta=dict(model="preset:tiny-qwen3-moe", notes=["random weights, greedy"]))
    cache.mkdir(parents=True, exist_ok=True)
    trace.save(path)
    return trace


def synthetic_trace(tokens: int, layers: int) -> RoutingTrace:
    from hotexperts.trace.synthetic import generate, preset

    trace = generate(preset("qwen3-30b-a3b"), num_tokens=tokens, seed=0)
    keep = trace.moe_layers[:: max(1, trace.num_layers // layers)][:layers]
    return trace.select_layers(keep)


def all_traces(args) -> dict[str, RoutingTrace]:
    out = {}
    if find_shared_traces() is None:
        log("../shared/traces not found: real traces skipped")
    else:
        for name in SHARED_TRACES:
            out[name] = load_shared(name)
    out["tiny-qwen3-moe (recorded)"] = recorded_trace(Path(args.cache), args.record_tokens)
    out["synthetic qwen3-30b-a3b"] = synthetic_trace(args.synthetic_tokens, args.synthetic_layers)
    return out


def describe(name: str, t: RoutingTrace) -> str:
    dec = int((~t.is_prompt).sum())
    k = t.meta.get("native_top_k")
    kk = f"top-{t.top_k}" + (f" (native {k})" if k and k != t.top_k else "")
    return (f"| {name} | {t.meta.get('model')} | {t.num_layers} x {t.num_experts} | {kk} | "
            f"{t.num_tokens - dec} | {dec} | {len(np.unique(t.request))} |")


# ---- hit-rate sweeps ---------------------------------------------------------------------------------
def slot_counts(E: int) -> list[int]:
    return sorted({max(1, round(E * f)) for f in FRACTIONS})


def sweep_trace(trace: RoutingTrace) -> list:
    shape = costmodel.shape_for_trace(trace)
    auto = auto_cost_params(shape, profiles.get_profile("h200")) if shape else {}
    rows = []
    for k in slot_counts(trace.num_experts):
        row = [simulate(trace, p, slots=k, **(auto if p == "auto" else {})) for p in ALL_POLICIES]
        _fill_belady(row)
        rows += row
    return rows


def hit_table(name: str, trace: RoutingTrace, rows: list) -> str:
    head = "| slots/layer (share) | " + " | ".join(ALL_POLICIES) + " |"
    lines = [f"**{name}** — decode hit rate % (÷ Belady)", "", head, "|---" * (len(ALL_POLICIES) + 1) + "|"]
    for k in slot_counts(trace.num_experts):
        cells = [next(r for r in rows if r.slots == k and r.policy == p) for p in ALL_POLICIES]
        txt = [f"{100 * r.hit_rate:.1f} ({r.vs_belady:.2f})" for r in cells]
        lines.append(f"| {k} ({100 * k / trace.num_experts:.1f}%) | " + " | ".join(txt) + " |")
    return "\n".join(lines)


def plot_curves(name: str, trace: RoutingTrace, rows: list, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for p in ALL_POLICIES:
        pts = sorted((r.slots, r.hit_rate) for r in rows if r.policy == p)
        style = dict(ls="--", color="k") if p == "belady" else {}
        ax.plot([100 * s / trace.num_experts for s, _ in pts], [100 * h for _, h in pts], marker="o",
                ms=3, label=p + (" (in-sample)" if p == "static" else ""), **style)
    dec = int((~trace.is_prompt).sum())
    ax.set_title(f"{name}: {trace.num_layers}x{trace.num_experts}, top-{trace.top_k}, {dec} decode tokens",
                 fontsize=9)
    ax.set_xlabel("slots per layer (% of experts)")
    ax.set_ylabel("decode hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- predicted tok/s at a VRAM budget ---------------------------------------------------------------
def budget_rows(trace: RoutingTrace, shape_name: str) -> list[dict]:
    """Every (hw, budget, placement/policy): predicted decode tok/s of the native shape."""
    native = costmodel.SHAPES[shape_name]
    k_scale = native.top_k / trace.top_k                  # swaps of a reduced-top-k trace, scaled up
    layer_scale = trace.num_layers / native.num_moe_layers  # subsampled layers: scale the global budget
    out = []
    for gib in BUDGETS_GIB:
        plan = real_plan(native, gib)
        sims = _budget_sims(trace, plan, layer_scale, native)
        for hw_name in HW:
            hw = profiles.get_profile(hw_name)
            out += _fixed_rows(native, hw, plan)
            for (kind, pol, hwdep), r in sims.items():
                if hwdep not in (None, hw_name):
                    continue
                layer_hit = _expand(r.layer_hit_rate, native.num_moe_layers)
                cap = f"hot:{plan['hot_k']}" if kind == "hot" else f"cache:{plan['cache_slots']}"
                p = costmodel.predict(native, hw, cap, layer_hit=layer_hit,
                                      swaps_per_token=steady_swaps(trace, r) * k_scale / layer_scale)
                label = f"{kind} {pol}" + (" (in-sample)" if pol == "static" else "")
                out.append(_row(hw, plan, label, p, r.hit_rate))
    return out


def tuned_lines(trace: RoutingTrace, shape_name: str, gib: float) -> list[str]:
    """`hotexperts auto` (trace/auto.py choose) for the cache placement: fit on the first half, score on the
    second (warm start), per hardware profile."""
    from hotexperts.trace.auto import choose

    native = costmodel.SHAPES[shape_name]
    plan = real_plan(native, gib)
    k_scale, layer_scale = native.top_k / trace.top_k, trace.num_layers / native.num_moe_layers
    # the shape the trace covers (its layers and top-k): choose() ranks with the same per-layer balance
    scaled = replace(native, num_layers=trace.num_layers, num_moe_layers=trace.num_layers, top_k=trace.top_k,
                     head_params=int(native.head_params * layer_scale))
    lines = []
    for hw_name in HW:
        hw = profiles.get_profile(hw_name)
        c = choose(trace, budget=max(1, round(plan["cache_slots"] * layer_scale)), shape=scaled, hw=hw)
        r = c.result
        p = costmodel.predict(native, hw, f"cache:{plan['cache_slots']}",
                              layer_hit=_expand(r.layer_hit_rate, native.num_moe_layers),
                              swaps_per_token=r.swaps_per_token * k_scale / layer_scale)   # warm: no fill
        lru = next(t for t in c.table if t["policy"] == "lru")
        params = {k: v for k, v in c.params.items() if not k.endswith("_per_expert")}
        lines.append(f"- {hw_name}, {gib:g} GiB (cache:{plan['cache_slots']}): `{c.policy}` {params}: "
                     f"{100 * r.hit_rate:.1f}% hits, {p.decode_tps:.1f} tok/s [{dominant(p.decode_ms)}] "
                     f"on the held-out half = {c.score / lru['score']:.2f}x lru there "
                     f"({100 * lru['hit_rate']:.1f}% hits)")
    return lines


def steady_swaps(trace: RoutingTrace, r) -> float:
    """Swaps per decode token without the cold-start fill (loads into free slots, at most one per slot
    and distinct expert): what a long run pays; a short trace would otherwise carry the whole fill."""
    distinct = [len(np.unique(col[col >= 0])) for col in np.moveaxis(trace.ids, 1, 0)]   # [Lm]
    fills = sum(min(r.slots, d) for d in distinct) if r.slots is not None else min(r.budget, sum(distinct))
    return max(0, r.swaps - fills) / max(r.decode_tokens, 1)


def _budget_sims(trace, plan, layer_scale, native) -> dict:
    sims = {}
    budget = max(1, round(plan["cache_slots"] * layer_scale))
    for kind, cap in (("hot", dict(slots=max(1, plan["hot_k"]))), ("cache", dict(budget=budget))):
        for pol in ("lru", "window-lfu", "decay", "static", "belady"):
            sims[(kind, pol, None)] = simulate(trace, pol, **cap)
        for hw_name in HW:
            auto = auto_cost_params(native, profiles.get_profile(hw_name))
            sims[(kind, "auto", hw_name)] = simulate(trace, "auto", **cap, **auto)
    return sims


def _expand(layer_hit: list[float], n: int) -> list[float]:
    """Per-layer hit rates of a layer subsample, repeated to the native depth."""
    idx = np.minimum((np.arange(n) * len(layer_hit)) // n, len(layer_hit) - 1)
    return [float(layer_hit[i]) for i in idx]


def _fixed_rows(shape, hw, plan) -> list[dict]:
    n = plan["n_cpu_moe"]
    return [_row(hw, plan, "cpu-moe", costmodel.predict(shape, hw, "cpu-moe"), None),
            _row(hw, plan, "n-cpu-moe", costmodel.predict(shape, hw, f"n-cpu-moe:{n}"), None, f" N={n}")]


def dominant(terms: dict) -> str:
    """The term that sets the token time: `copy` whenever the copy engine is the bottleneck."""
    return "copy" if terms.get("copy", 0) > 0 else max(terms, key=terms.get)


def _row(hw, plan, label, pred, hit, note="") -> dict:
    dom = dominant(pred.decode_ms)
    return dict(hw=hw.name, gib=plan["budget_gib"], slots=plan["slots"], hot_k=plan["hot_k"],
                label=label, tps=pred.decode_tps, hit=hit, dominant=dom, note=note)


def budget_table(title: str, rows: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cols = [(hw, g) for hw in HW for g in BUDGETS_GIB]
    lines = [f"**{title}** — predicted decode tok/s (hit rate %)", "",
             "| placement | " + " | ".join(f"{hw} {g} GiB" for hw, g in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for lab in labels:
        cells = []
        for hw, g in cols:
            r = next(x for x in rows if x["hw"] == hw and x["gib"] == g and x["label"] == lab)
            hit = "" if r["hit"] is None else f" ({100 * r['hit']:.0f})"
            cells.append(f"{r['tps']:.1f}{hit}{r['note']} [{r['dominant']}]")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    plans = {(r["gib"], r["slots"], r["hot_k"]) for r in rows}
    lines.append("")
    lines.append("Slots at each budget: " + "; ".join(f"{g} GiB → {s} slots ({k}/layer for hot)"
                                                     for g, s, k in sorted(plans)) + ".")
    return "\n".join(lines)


# ---- document ----------------------------------------------------------------------------------------
def write_doc(doc: Path, body: str) -> None:
    text = doc.read_text() if doc.exists() else f"# Simulator results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "simulator-results.md"))
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--cache", default="/tmp/hotexperts-sim", help="recorded trace cache (not the repo)")
    ap.add_argument("--synthetic-tokens", type=int, default=2048)
    ap.add_argument("--synthetic-layers", type=int, default=12)
    ap.add_argument("--record-tokens", type=int, default=64)
    ap.add_argument("--tune-gib", type=float, default=16.0, help="run `auto` tuning at this budget (0: skip)")
    args = ap.parse_args(argv)
    t0 = time.time()
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    traces = all_traces(args)
    parts = ["### Traces", "", "| trace | model | MoE layers x experts | top-k | prompt tok | decode tok | "
             "requests |", "|---|---|---|---|---|---|---|"] + [describe(n, t) for n, t in traces.items()]
    parts += ["", "### Hit rate against slots (per-layer slots, cold start, unbounded swaps)", ""]
    sweeps = {}
    for name, trace in traces.items():
        log(f"sweep {name}")
        sweeps[name] = rows = sweep_trace(trace)
        slug = name.split(" ")[0] if "recorded" in name else name.replace(" ", "-")
        png = plot_curves(name, trace, rows, img / f"hit-{slug}.png")
        parts += [hit_table(name, trace, rows), "", f"![{name}](img/{png.name})", ""]
    if "qwen3-30b-a3b" in sweeps:
        from hotexperts.trace.plots import layer_heatmap

        sel = [r for r in sweeps["qwen3-30b-a3b"] if r.slots == 32]
        png = layer_heatmap(sel, traces["qwen3-30b-a3b"].moe_layers, img / "heatmap-qwen3-30b-a3b-32.png")
        parts += ["### Per-layer hit rate, qwen3-30b-a3b at 32 slots/layer (25%)", "",
                  f"![heatmap](img/{png.name})", ""]
    parts += ["### Predicted decode tok/s at a VRAM budget (cost model)", ""]
    for name, shape in (("qwen3-30b-a3b", "qwen3-30b-a3b"), ("synthetic qwen3-30b-a3b", "qwen3-30b-a3b"),
                        ("mixtral-8x7b", "mixtral-8x7b")):
        if name in traces:
            log(f"budgets {name}")
            parts += [budget_table(f"{name} trace → {shape} shape", budget_rows(traces[name], shape)), ""]
            if args.tune_gib:
                log(f"auto-tune {name}")
                parts += [f"`hotexperts auto` choice for {name} (grid of trace/auto.py):", ""]
                parts += tuned_lines(traces[name], shape, args.tune_gib) + [""]
    parts.append(f"_Generated in {time.time() - t0:.0f} s on this machine._")
    write_doc(Path(args.doc), "\n".join(parts))
    log(f"wrote {args.doc} and {img}/*.png in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
