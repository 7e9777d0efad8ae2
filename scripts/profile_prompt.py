"""Where a prompt batch's time goes, per placement (GPU runs; issue 3's prompt target): one model built in
memory, each placement warmed up as the benchmark does, pp timed, then one pp under torch.profiler. Writes
$OUT/profile.txt (per placement: kernel and host tables) and prints a one-line summary per placement.
--stage-copy / --gpu-moe go to the executor as hotexperts.config.KernelOptions (`hotexperts bench
--stage-copy/--gpu-moe-backend` does the same without the profiler).

    python scripts/profile_prompt.py --preset qwen3-30b-a3b --quant int4 --budget 16 \
        --placements gpu,n-cpu-moe,cache --tokens 512 [--stage-copy memcpy|gather|auto]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hotexperts.bench.harness import Bench, resolve, warm_up  # noqa: E402
from hotexperts.bench.workload import BenchTest, routing_source  # noqa: E402
from hotexperts.config import GPU_MOE_BACKENDS, STAGE_COPY_MODES, KernelOptions  # noqa: E402
from hotexperts.engine.presets import build_in_memory  # noqa: E402
from hotexperts.experts.budget import GiB  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--quant", default="int4", choices=("none", "int8", "int4"))
    ap.add_argument("--budget", type=float, default=16)
    ap.add_argument("--placements", default="gpu,n-cpu-moe,cache")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--routing", default=None, help="synthetic routing preset (default: --preset)")
    ap.add_argument("--stage-copy", default="auto", choices=STAGE_COPY_MODES)
    ap.add_argument("--gpu-moe", default="auto", choices=GPU_MOE_BACKENDS)
    a = ap.parse_args()
    opts = KernelOptions(stage_copy=a.stage_copy, gpu_moe=a.gpu_moe)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    lm = build_in_memory(a.preset, dtype="bfloat16", device=dev, seed=0,
                         expert_dtype={"none": None, "int8": "int8", "int4": "int4g32"}[a.quant])
    ctx = a.tokens + 256
    source = routing_source("synthetic", a.routing or a.preset, lm.cfg, num_tokens=64 * a.tokens)
    bench = Bench(lm, dev, ctx, source, options=opts)
    test = BenchTest(f"pp{a.tokens}", "pp", a.tokens)
    for name in a.placements.split(","):
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        engine = bench.engine(resolve(name, int(a.budget * GiB), "none", None))
        warm_up(bench, engine)
        runs = [bench.run_test(engine, test) for _ in range(a.repeats)]
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            bench.run_test(engine, test)
            wall = time.perf_counter() - t0
        ka = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ka)
        text = [f"{name} ({opts}): pp{a.tokens} runs {[round(r, 1) for r in runs]} tok/s; profiled run "
                f"{wall * 1e3:.1f} ms wall, {gpu_us / 1e3:.1f} ms of device time (kernels + copies)"]
        text.append(ka.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
        text.append(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        with open(out / "profile.txt", "a") as f:
            f.write("\n\n".join(text) + "\n\n")
        print(text[0], flush=True)
        engine.close()
        engine = None


if __name__ == "__main__":
    main()
