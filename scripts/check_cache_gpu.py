#!/usr/bin/env python
"""The hot-expert cache on CUDA: equivalence with the dense reference and speed, per placement.

    python scripts/check_cache_gpu.py [--preset tiny-qwen3-moe] [--dtype float32] [--prompt-len 96]
                                      [--tokens 32] [--placements gpu,cpu,layers:2,hot:4,...]
                                      [--vram-budget GiB] [--pp-bypass 32] [--pytest]

Builds the preset in memory (random weights) once; for each placement builds the executor through
experts/placement.build_executor, runs one greedy request (EOS off) with a warm-up, and reports: tokens equal
to the `gpu` placement's (prefix length), decode and prompt tok/s, hit rate, swaps, MiB moved, slots.
--pytest first runs `pytest -m gpu tests/experts` (the CUDA equivalence tests).
Prints a compact table; writes JSON to $OUT/check_cache_gpu.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotexperts.engine.generate import Generator  # noqa: E402
from hotexperts.engine.presets import build_in_memory  # noqa: E402
from hotexperts.engine.sampling import SamplingParams  # noqa: E402
from hotexperts.experts.placement import Placement, build_executor  # noqa: E402

DEFAULT = "gpu,cpu,layers:2,hot:0,hot:4,hot:16,cache:24slots:lru,cache:24slots:window-lfu,cache:24slots:auto"


def run_one(lm, spec: str, args, prompt: list[int]) -> dict:
    p = Placement.parse(spec, pp_bypass=args.pp_bypass, vram_budget=args.vram_budget,
                        rebalance_interval=args.interval)
    t0 = time.perf_counter()
    ex = build_executor(p, lm.store, lm.cfg, args.device, dtype=next(lm.model.parameters()).dtype)
    build_s = time.perf_counter() - t0
    gen = Generator(lm.model, ex, lm.cfg, args.device, len(prompt) + args.tokens + 8)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0)
    list(gen.generate(prompt, params))                                     # warm-up
    toks = list(gen.generate(prompt, params))
    st = ex.stats() if callable(getattr(ex, "stats", None)) else None
    tot = (st or {}).get("total", {})
    return {"placement": spec, "tokens": toks, "decode_tps": gen.last.gen_tps,
            "prompt_tps": gen.last.prompt_tps,
            "hit_rate": tot.get("hit_rate"), "swaps": tot.get("swaps"),
            "mib_moved": (tot.get("bytes_moved") or 0) / 2 ** 20, "slots": (st or {}).get("slots"),
            "build_s": build_s, "stats": st}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-qwen3-moe")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--placements", default=DEFAULT)
    ap.add_argument("--vram-budget", default=None)
    ap.add_argument("--pp-bypass", type=int, default=32)
    ap.add_argument("--interval", type=int, default=None)
    ap.add_argument("--pytest", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.vram_budget is not None and args.vram_budget != "auto":
        args.vram_budget = int(float(args.vram_budget) * 2 ** 30)
    if args.pytest:
        subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests/experts"], check=False)
    lm = build_in_memory(args.preset, dtype=args.dtype, device=args.device)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, lm.cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    rows, ref = [], None
    for spec in args.placements.split(","):
        try:
            r = run_one(lm, spec, args, prompt)
        except Exception as e:  # noqa: BLE001 - report and continue with the next placement
            rows.append({"placement": spec, "error": f"{type(e).__name__}: {e}"})
            print(f"{spec}: {type(e).__name__}: {e}", flush=True)
            continue
        ref = ref if ref is not None else r["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref, strict=False)) if a != b), len(ref))
        r["same_prefix"] = same
        rows.append(r)
        hr = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}"
        print(f"{spec:>28} same {same:>3}/{len(ref)}  decode {r['decode_tps']:8.1f} tok/s  "
              f"prompt {r['prompt_tps']:9.1f} tok/s  hit% {hr:>5}  swaps {r['swaps']}  "
              f"MiB {r['mib_moved']:.1f}  slots {r['slots']}", flush=True)
    out = os.environ.get("OUT")
    if out:
        for r in rows:
            r.pop("tokens", None)
        doc = {"preset": args.preset, "rows": rows}
        Path(out, "check_cache_gpu.json").write_text(json.dumps(doc, indent=1, default=str))
    return 0 if all("error" not in r and r["same_prefix"] == len(ref or []) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
