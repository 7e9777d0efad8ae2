"""Bench report output: a terminal/markdown table, JSON, and PNGs (tok/s vs VRAM budget; hit heatmap).

    table(report) -> str           one row per (budget, placement): median [min-max] tok/s per test,
                                   peak VRAM, hit rate, ratios against layer offload and all-CPU (same run)
    save_json(report, path)
    plots(report, out_dir) -> [paths]
"""

from __future__ import annotations

import json
from pathlib import Path


def _cell(t: dict | None) -> str:
    if not t:
        return "-"
    return f"{t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}]"


def _ratio(r: dict, base: dict | None, test: str) -> str:
    if not base or test not in r["tests"] or test not in base["tests"]:
        return "-"
    return f"{r['tests'][test]['median'] / base['tests'][test]['median']:.2f}x"


def _peaks(r: dict) -> str:
    if r["peak_vram_gib"] is None:
        return "-"
    proc = r.get("peak_process_gib")
    return f"{r['peak_vram_gib']:.2f}" + ("" if proc is None else f" / {proc:.2f}")


def _baseline(results: list[dict], budget, label: str) -> dict | None:
    return next((r for r in results if r["label"] == label and r["budget_gib"] == budget and not r["error"]),
                None)


def table(report: dict) -> str:
    tests = report["tests"]
    gen = next((t for t in tests if t.startswith("tg")), None)
    head = ["budget GiB", "placement", *tests, "peak VRAM GiB (torch / process)", "hit rate", "CPU ms/tok",
            "host ms/tok", "decode"]
    if gen:
        head += [f"{gen} / n-cpu-moe", f"{gen} / cpu-moe"]
    rows = [head, ["---"] * len(head)]
    for r in report["results"]:
        b = r["budget_gib"]
        row = ["-" if b is None else f"{b:g}", r["placement"] if r["label"] == r["placement"]
               else f"{r['label']} ({r['placement']})"]
        if r["error"]:
            rows.append(row + [f"failed: {r['error']}"] + [""] * (len(head) - 3))
            continue
        row += [_cell(r["tests"].get(t)) for t in tests]
        row += [_peaks(r),
                "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}",
                "-" if r.get("cpu_ms_per_token") is None else f"{r['cpu_ms_per_token']:.2f}",
                "-" if r.get("host_ms_per_token") is None else f"{r['host_ms_per_token']:.2f}",
                r.get("decode_mode") or "-"]
        if gen:
            row += [_ratio(r, _baseline(report["results"], b, "n-cpu-moe"), gen),
                    _ratio(r, _baseline(report["results"], b, "cpu-moe"), gen)]
        rows.append(row)
    lines = ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    d = report.get("distinct_experts")
    extra = f"; distinct experts per layer {d['min']}-{d['max']} of {d['of']}" if d else ""
    wraps = max((r.get("trace_wraps", 0) for r in report["results"]), default=0)
    if wraps:
        extra += f"; the routing replay wrapped around {wraps}x (a trace shorter than the workload)"
    fmt = report.get("expert_format") or report["expert_quant"]        # older reports: the --expert-quant
    meta = (f"device: {report['device']} | routing: {report['routing']}{extra} | expert format: "
            f"{fmt} | tok/s median [min-max] of {report['repeats']} runs")
    return meta + "\n\n" + "\n".join(lines) + _plans(report["results"])


def _plans(results: list[dict]) -> str:
    """Each placement's solved plan, its prompt staging and where its VRAM goes (GiB: context, dense, kv,
    workspace, staging, slots), and what the device measured, under the table."""
    out = []
    for r in results:
        if r.get("plan") is None:
            continue
        out.append(f"- {r['label']}: {r['plan']}{_vram_text(r)}")
    return "\n\nplans (experts/solve.py):\n" + "\n".join(out) if out else ""


def _vram_text(r: dict) -> str:
    vram = r.get("vram_plan_gib") or {}
    text = f"; {r['staging']}" if r.get("staging") else ""
    if r.get("prefill_chunk"):
        text += f"; prompt chunk {r['prefill_chunk']}"
    if r.get("dequant_chunk"):
        text += f"; dequantize chunk {r['dequant_chunk']} experts"
    text += "".join(f"; {note}" for note in r.get("plan_notes") or ())
    if vram:
        total = vram.get("total")
        parts = " + ".join(f"{k} {v:.2f}" for k, v in vram.items() if k != "total")
        used = sum(v for k, v in vram.items() if k != "total")
        head = f"{total:.2f}" if total is not None else f"(no budget) {used:.2f}"
        text += f"; VRAM GiB {head} = {parts}"
    measured = [(name, r.get(key)) for name, key in (("process peak", "peak_process_gib"),
                                                    ("context after", "context_after_gib"),
                                                    ("allocator slack", "allocator_slack_gib"))]
    if any(v is not None for _, v in measured):
        text += "; measured GiB: " + ", ".join(f"{n} {v:.2f}" for n, v in measured if v is not None)
    return text


def save_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=float))
    return path


def plots(report: dict, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for test in report["tests"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(r["label"] for r in report["results"]):
            pts = sorted((r["budget_gib"], r["tests"][test]["median"]) for r in report["results"]
                         if r["label"] == label and test in r["tests"] and r["budget_gib"] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ref = [r for r in report["results"] if r["label"] == label and r["budget_gib"] is None
                   and test in r["tests"]]
            if ref:
                ax.axhline(ref[0]["tests"][test]["median"], ls="--", c="gray", label=f"{label} (no budget)")
        ax.set(xlabel="VRAM budget (GiB)", ylabel=f"{test} tok/s", title=f"{test}: {report['model']}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(out / f"bench_{test.replace('@', '_')}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    rows = [r for r in report["results"] if r.get("layer_hit")]
    if rows:
        grid = np.array([r["layer_hit"] for r in rows])
        fig, ax = plt.subplots(figsize=(max(6, grid.shape[1] * 0.15), 0.5 * len(rows) + 1.5))
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(rows)), [f"{r['label']} @ {r['budget_gib']:g} GiB" if r["budget_gib"]
                                         else r["label"] for r in rows], fontsize=7)
        ax.set_xlabel("MoE layer")
        fig.colorbar(im, label="hit rate")
        paths.append(out / "bench_layer_hits.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths
