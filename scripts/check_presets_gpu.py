"""GPU-machine check of presets and loading at real scale (run on the H200 box; CPU works for tiny ones).

    python scripts/check_presets_gpu.py [--presets qwen3-30b-a3b,olmoe-1b-7b] [--write olmoe-1b-7b]

For each preset: build_in_memory on cuda (seconds, GiB of experts), pin() time and result, and
routing_diversity over 256 random tokens (experts used per layer, largest share of one expert).
With --write: write_hf_dir to a temp dir, then load_model it (GB/s). Prints a table; JSON to $OUT.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time

import torch

from hotexperts.engine.load import load_model
from hotexperts.engine.presets import build_in_memory, routing_diversity, write_hf_dir


def timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def check_build(name: str, device: str) -> dict:
    lm, t_build = timed(lambda: build_in_memory(name, "bfloat16", device))
    _, t_pin = timed(lm.store.pin)
    div, t_route = timed(lambda: routing_diversity(lm, 256))
    used = [u for u, _ in div.values()]
    share = [s for _, s in div.values()]
    row = dict(preset=name, build_s=round(t_build, 1), store_gib=round(lm.store.nbytes / 2 ** 30, 2),
               pin_s=round(t_pin, 1), pinned=lm.store.pinned, route_s=round(t_route, 1),
               experts=lm.cfg.num_experts, min_used=min(used), max_top_share=round(max(share), 3),
               vocab=lm.tokenizer.vocab_size)
    return row


def check_write_load(name: str, device: str) -> dict:
    d = tempfile.mkdtemp(prefix="hx-")
    try:
        _, t_write = timed(lambda: write_hf_dir(name, d, device=device))
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        lm, t_load = timed(lambda: load_model(d, "bfloat16", device, progress=False))
        return dict(preset=name, write_s=round(t_write, 1), load_s=round(t_load, 1),
                    gib=round(size / 2 ** 30, 2), load_gbps=round(size / 1e9 / t_load, 2),
                    files=len(os.listdir(d)), layers=len(lm.store.layers))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="qwen3-30b-a3b,olmoe-1b-7b")
    ap.add_argument("--write", default="olmoe-1b-7b", help="comma list for write+load ('' to skip)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for n in filter(None, args.presets.split(",")):
        rows.append(check_build(n, device))       # the model is freed when check_build returns
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    wrows = [check_write_load(n, device) for n in args.write.split(",") if n]
    for r in rows + wrows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "presets_check.json"), "w") as f:
            json.dump({"device": device, "build": rows, "write_load": wrows}, f, indent=2)


if __name__ == "__main__":
    main()
