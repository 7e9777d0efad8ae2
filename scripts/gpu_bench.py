"""The GPU benchmark run for docs/benchmarks.md: one model built in memory, several routing sources and
budgets, every placement side by side (hotexperts.bench.harness), JSON + table to $OUT.

    python scripts/gpu_bench.py --preset qwen3-30b-a3b --quant int4 --budgets 16,24 \
        --sources synthetic:qwen3-30b-a3b,trace:.carry/traces/qwen.route.csv --tests pp512,tg128
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hotexperts.bench import report as rep
from hotexperts.bench.harness import NAMED, run_bench, tokens_needed
from hotexperts.bench.workload import parse_tests, routing_source
from hotexperts.engine.presets import build_in_memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--model", default=None, help="load this model (e.g. a GGUF file) instead of the preset")
    ap.add_argument("--quant", default="int4", choices=("none", "int8", "int4", "int8g"))
    ap.add_argument("--budgets", default="16,24")
    ap.add_argument("--sources", default="synthetic:qwen3-30b-a3b")
    ap.add_argument("--tests", default="pp512,pp4096,tg128,tg128@d4096")
    ap.add_argument("--fast-tests", default=None, help="tests for every source after the first")
    ap.add_argument("--extra", default="", help="more runs on the same model: 'SOURCE|TESTS|BUDGETS;...'")
    ap.add_argument("--placements", default=",".join(NAMED))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policy", default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--piecewise-graph", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the dense decode (see --compile)")
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    t0 = time.time()
    expert_dtype = {"none": None, "int8": "int8", "int4": "int4g32", "int8g": "int8g32"}[a.quant]
    if a.model:
        from hotexperts.bench.harness import expert_format
        from hotexperts.engine.engine import load_source

        lm, expert_dtype, a.quant = load_source(a.model, torch.bfloat16, device, 0), None, "none"
        print(f"loaded {a.model} ({expert_format(lm.store)}) in {time.time() - t0:.0f} s", flush=True)
    else:
        lm = build_in_memory(a.preset, dtype="bfloat16", device=device, seed=0, expert_dtype=expert_dtype)
        print(f"built {a.preset} in {time.time() - t0:.0f} s", flush=True)
    runs = [(src, a.tests if i == 0 or not a.fast_tests else a.fast_tests, a.budgets, "")
            for i, src in enumerate(a.sources.split(","))]
    runs += [(*item.split("|"), f"_extra{j}") for j, item in enumerate(filter(None, a.extra.split(";")))]
    for src, test_text, budget_text, suffix in runs:
        tests, budgets = parse_tests(test_text), [float(b) for b in budget_text.split(",")]
        kind, _, arg = src.partition(":")
        source = routing_source(kind, arg or None, lm.cfg, num_tokens=tokens_needed(tests, a.repeats))
        t1 = time.time()
        report = run_bench(lm, a.placements.split(","), budgets, tests, a.repeats, source,
                           device, quant="none" if expert_dtype else a.quant, policy=a.policy,
                           progress=lambda m: print("  " + m, flush=True), piecewise=a.piecewise_graph,
                           compile_decode=a.compile)
        report["command"] = "python scripts/gpu_bench.py " + " ".join(
            f"--{k} {v}" for k, v in vars(a).items())
        report["preset"] = a.model or a.preset
        report["expert_quant"] = a.quant
        report["seconds"] = time.time() - t1
        name = f"bench_{'model' if a.model else a.preset}_{kind}{a.tag}{suffix}"
        rep.save_json(report, out / f"{name}.json")
        print(rep.table(report), flush=True)
        print(json.dumps({"done": name, "seconds": round(report["seconds"])}), flush=True)


if __name__ == "__main__":
    main()
