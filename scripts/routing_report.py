"""Markdown tables for docs/routing.md and docs/simulator-results.md from the committed learned traces.

    python scripts/routing_report.py [--traces data/traces] [--policies lru,decay,auto,window-lfu,belady]

Prints (1) training and per-layer statistics from <traces>/<model>-summary.json, (2) locality statistics
(trace/stats.summarize, decode tokens) of every learned trace beside the real traces of ../shared/traces
when that folder is present, (3) next-layer prediction recall, (4) held-out policy comparisons
(trace/heldout.compare: time split, shared warm start, test half scored) at 12.5% and 25% of the experts
per layer, each policy's hit rate and ÷ Belady.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hotexperts.trace import stats
from hotexperts.trace.format import RoutingTrace
from hotexperts.trace.heldout import compare
from hotexperts.trace.import_shared import find_shared_traces, load_shared

STAT_KEYS = ["model", "tokens", "experts", "top_k", "reuse_median", "repeat", "repeat_uniform", "lru@0.125",
             "lru@0.25", "lru@0.5", "top10_share", "static_cov"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="data/traces")
    ap.add_argument("--policies", default="lru,decay,auto,window-lfu,belady")
    args = ap.parse_args()
    root = Path(args.traces)
    summaries = {p.name.removesuffix("-summary.json"): json.loads(p.read_text())
                 for p in sorted(root.glob("*-summary.json"))}
    print(training_table(summaries), "\n")
    print(recall_table(summaries), "\n")
    traces = {p.stem: RoutingTrace.load(p) for p in sorted(root.glob("*.npz"))}
    print(locality_table(traces), "\n")
    print(policy_table(traces, args.policies.split(",")))


def training_table(summaries: dict) -> str:
    rows = ["| model | E | k | steps | train s | loss first → last | aux last | distinct experts per layer "
            "(decode, code / docs / legal / switch) |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        m = s["model"]
        spec, log = m["spec"], m["log"]
        distinct = " / ".join(",".join(str(d) for d in m["traces"][t]["stats"]["distinct_per_layer"])
                              for t in m["traces"])
        rows.append(f"| {name} | {spec['num_experts']} | {spec['top_k']} | {m['steps_run']} | "
                    f"{m['train_seconds']:.0f} | {log[0][1]:.2f} → {log[-1][1]:.2f} | {log[-1][2]:.2f} | "
                    f"{distinct} |")
    return "\n".join(rows)


def recall_table(summaries: dict) -> str:
    rows = ["| trace | recall of selections, k / k+2 guesses | of LRU misses at 12.5%, k / k+2 "
            "| at 25%, k / k+2 | previous token's set covers |", "|---|---|---|---|---|"]
    for name, s in summaries.items():
        k = s["model"]["spec"]["top_k"]
        for dom, t in s["model"]["traces"].items():
            r = t["recall"]
            a, b = r[f"0.125@{k}"], r[f"0.125@{k + 2}"]
            c, d = r[f"0.25@{k}"], r[f"0.25@{k + 2}"]
            rows.append(f"| {name}-{dom} | {a['selections']:.3f} / {b['selections']:.3f} | "
                        f"{a['misses']:.3f} / {b['misses']:.3f} | {c['misses']:.3f} / {d['misses']:.3f} | "
                        f"{a['prev_token']:.3f} |")
    return "\n".join(rows)


def locality_table(traces: dict) -> str:
    rows = []
    for name, t in traces.items():
        s = stats.summarize(t, fractions=(0.125, 0.25, 0.5))
        rows.append({**s, "model": name})
    if find_shared_traces() is not None:
        for name in ("mixtral-8x7b", "qwen3-30b-a3b", "gemma-4-26b-a4b", "gpt-oss-120b"):
            s = stats.summarize(load_shared(name), fractions=(0.125, 0.25, 0.5))
            rows.append({**s, "model": f"shared: {name}"})
    return stats.format_table(rows, STAT_KEYS)


def policy_table(traces: dict, policies: list[str]) -> str:
    rows = ["| trace | residency | " + " | ".join(policies) + " | best online ÷ Belady |",
            "|---|---|" + "---|" * (len(policies) + 1)]
    for name, t in traces.items():
        for frac in (0.125, 0.25):
            slots = max(t.top_k, round(frac * t.num_experts))
            res = {r.policy: r for r in compare(t, policies, slots=slots)}
            online = [r for p, r in res.items() if p != "belady"]
            best = max(online, key=lambda r: r.hit_rate)
            cells = " | ".join(f"{res[p].hit_rate:.3f}" for p in policies)
            rows.append(f"| {name} | {frac:g} ({slots}) | {cells} | {best.vs_belady:.3f} ({best.policy}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
