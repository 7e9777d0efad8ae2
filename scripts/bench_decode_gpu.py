#!/usr/bin/env python
"""Batch-1 decode speed on one GPU, eager vs CUDA graph, with a breakdown of where a decode step's time goes.

    python scripts/bench_decode_gpu.py [--preset qwen3-30b-a3b] [--tokens 128] [--prompt-len 128]
                                       [--placement gpu_moe|gpu|...] [--skip-profile]

Builds the preset in memory on the GPU (random weights, engine/presets.build_in_memory), builds the executor
(default "gpu_moe": all experts on the GPU behind one kernels/gpu_moe call per layer; otherwise a Placement
spec through experts/placement.build_executor), then for eager and graphed decode runs a warm-up
request and a timed request of `--tokens` greedy tokens (EOS disabled). The breakdown comes from an eager
pass with CUDA events around every attention block, every MoE block (router + shared expert + executor)
and every executor call, plus the sampling step; a torch.profiler table of the top kernels follows.
Prints a compact table; writes JSON to $OUT/bench_decode_gpu.json when $OUT is set.
Target: >= 150 tok/s for qwen3-30b-a3b bf16 fully on an H200 with the graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotexperts.engine.generate import Generator  # noqa: E402
from hotexperts.engine.sampling import SamplingParams, sample_tensor  # noqa: E402
from hotexperts.models.layers import Attention  # noqa: E402
from hotexperts.models.transformer import MoEBlock  # noqa: E402


def build(args):
    from hotexperts.engine.presets import build_in_memory

    t0 = time.perf_counter()
    lm = build_in_memory(args.preset, dtype=torch.bfloat16, device=args.device, seed=0)
    cfg = dataclasses.replace(lm.cfg, eos_token_ids=())            # never stop early
    executor = make_executor(args.placement, lm.store, cfg, args.device)
    sync(args.device)
    mem = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    print(f"built {args.preset} in {time.perf_counter() - t0:.1f}s; executor {type(executor).__name__}, "
          f"graph_safe={getattr(executor, 'graph_safe', False)}; GPU memory {mem:.1f} GiB", flush=True)
    return lm.model, executor, cfg


class GpuMoeExecutor:
    """Every expert on the GPU, one fused kernels/gpu_moe.py call per layer (no host sync: graph-safe)."""

    graph_safe = True
    on_route = None

    def __init__(self, store, device="cuda"):
        from hotexperts.kernels.gpu_moe import gpu_moe

        self.gpu_moe = gpu_moe
        self.w13 = {l: store.layer(l).w13.to(device) for l in store.layers}      # [E, 2I, D]
        self.w2 = {l: store.layer(l).w2.to(device) for l in store.layers}        # [E, D, I]

    def __call__(self, layer, x, ids, weights):
        return self.gpu_moe(x, ids, weights, self.w13[layer], self.w2[layer])

    def end_step(self):
        pass


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_executor(placement: str, store, cfg, device: str):
    if placement == "gpu_moe":
        return GpuMoeExecutor(store, device)
    try:
        from hotexperts.experts.placement import Placement, build_executor
    except ModuleNotFoundError:
        from hotexperts.experts.reference import DenseExecutor

        print("experts/placement.py missing: DenseExecutor (slow, not graph-safe)")
        return DenseExecutor({l: store.layer(l) for l in store.layers}, device, torch.bfloat16)
    return build_executor(Placement.parse(placement), store, cfg, torch.device(device), dtype=torch.bfloat16)


def timed_decode(model, executor, cfg, args, use_graph: bool) -> dict:
    gen = Generator(model, executor, cfg, args.device, args.prompt_len + args.tokens + 8,
                    use_cuda_graph=use_graph)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    list(gen.generate(prompt, SamplingParams(max_tokens=8)))               # warm-up (and graph capture)
    sync(args.device)
    out = list(gen.generate(prompt, SamplingParams(max_tokens=args.tokens)))
    last = gen.last
    return {"graph": use_graph, "graphed": bool(gen.decode_step.graphed), "tokens": len(out),
            "prefill_tok_per_s": last.prompt_tps, "decode_tok_per_s": last.gen_tps,
            "ms_per_token": 1000 * last.decode_seconds / max(last.decode_steps, 1), "first_tokens": out[:8]}


class EventTimer:
    """CUDA events (perf_counter on the CPU) around module calls, summed per category after one sync."""

    def __init__(self, device: str):
        self.device = device
        self.pairs: dict[str, list] = defaultdict(list)

    def _mark(self):
        if self.device != "cuda":
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def start(self, cat: str):
        self.pairs[cat].append([self._mark(), None])

    def stop(self, cat: str):
        self.pairs[cat][-1][1] = self._mark()

    def totals_ms(self) -> dict[str, float]:
        sync(self.device)
        if self.device != "cuda":
            return {c: sum(1000 * (b - a) for a, b in ps) for c, ps in self.pairs.items()}
        return {c: sum(a.elapsed_time(b) for a, b in ps) for c, ps in self.pairs.items()}


def hook_modules(model, timer: EventTimer):
    handles = []
    cats = {m: "attention" for m in model.modules() if isinstance(m, Attention)}
    cats |= {m.gate: "router" for m in model.modules() if isinstance(m, MoEBlock)}   # the router linear
    for mod, cat in cats.items():
        if cat:
            handles.append(mod.register_forward_pre_hook(lambda m, a, c=cat: timer.start(c)))
            handles.append(mod.register_forward_hook(lambda m, a, o, c=cat: timer.stop(c)))
    return handles


class TimedExecutor:
    def __init__(self, inner, timer: EventTimer):
        self.inner, self.timer = inner, timer

    def __call__(self, layer, x, ids, weights):
        self.timer.start("experts")
        y = self.inner(layer, x, ids, weights)
        self.timer.stop("experts")
        return y

    def end_step(self):
        self.inner.end_step()


def breakdown(model, executor, cfg, args, steps: int = 16) -> dict:
    """Eager decode steps with CUDA events per category; ms per token."""
    timer = EventTimer(args.device)
    timed = TimedExecutor(executor, timer)
    gen = Generator(model, timed, cfg, args.device, args.prompt_len + steps + 8, use_cuda_graph=False)
    prompt = list(range(1, args.prompt_len + 1))
    gen.prefill(prompt)
    handles = hook_modules(model, timer)
    params, pos, tok = SamplingParams(), args.prompt_len, 1
    try:
        for i in range(steps + 2):
            if i == 2:                                     # drop two warm-up steps
                timer.pairs.clear()
                sync(args.device)
                t0 = time.perf_counter()
            timer.start("step")
            logits = gen.decode_one(tok, pos + i)
            timer.start("sampling")
            tok = sample_tensor(logits.float(), params)
            timer.stop("sampling")
            timer.stop("step")
        sync(args.device)
        wall = (time.perf_counter() - t0) * 1000 / steps
    finally:
        for h in handles:
            h.remove()
    ms = {c: v / steps for c, v in timer.totals_ms().items()}
    ms["other"] = ms["step"] - sum(ms.get(k, 0.0) for k in ("attention", "router", "experts", "sampling"))
    ms["wall_per_step"] = wall
    return ms


def profile_table(model, executor, cfg, args, steps: int = 4) -> str:
    gen = Generator(model, executor, cfg, args.device, args.prompt_len + steps + 8, use_cuda_graph=False)
    gen.prefill(list(range(1, args.prompt_len + 1)))
    acts = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(steps):
            sample_tensor(gen.decode_one(1, args.prompt_len + i).float(), SamplingParams())
        sync(args.device)
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--placement", default="gpu_moe",
                    help="gpu_moe (this script's fused all-GPU executor) or a Placement spec (gpu, ...)")
    ap.add_argument("--device", default="cuda", help="cpu = a smoke test of this script (tiny presets)")
    ap.add_argument("--skip-profile", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --preset tiny-qwen3-moe for a smoke test)")
        return 1
    model, executor, cfg = build(args)
    runs = [timed_decode(model, executor, cfg, args, g) for g in (False, True)]
    print(f"\n{'mode':<8}{'graphed':>8}{'decode tok/s':>14}{'ms/token':>10}{'prefill tok/s':>15}")
    for r in runs:
        print(f"{'graph' if r['graph'] else 'eager':<8}{str(r['graphed']):>8}{r['decode_tok_per_s']:>14.1f}"
              f"{r['ms_per_token']:>10.2f}{r['prefill_tok_per_s']:>15.1f}")
    same = runs[0]["first_tokens"] == runs[1]["first_tokens"]
    print(f"eager and graph first tokens identical: {same}")
    ms = breakdown(model, executor, cfg, args)
    print("\neager decode step breakdown (ms/token, CUDA events):")
    for k in ("step", "attention", "router", "experts", "sampling", "other",
              "wall_per_step"):
        print(f"  {k:<20}{ms.get(k, 0.0):8.3f}")
    table = "" if args.skip_profile else profile_table(model, executor, cfg, args)
    print(table)
    result = {"preset": args.preset, "placement": args.placement, "runs": runs, "breakdown_ms": ms,
              "eager_graph_identical": same, "profile": table, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_decode_gpu.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
