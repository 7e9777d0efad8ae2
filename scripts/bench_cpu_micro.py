"""Micro-benchmark of the fused CPU MoE kernel on a small box (the full-scale bench is bench_cpu_moe.py).

Qwen3-30B-A3B expert shape (D=2048, I=768), one format at a time, weights random, GB/s = expert weight bytes
(incl. scales/zeros) read per second of wall time:
  hot:      1 thread (default), ONE layer of --hot-experts experts, all of them routed for one token, the
            same call repeated: weights stay in L2/L3, so this is the kernel's compute throughput per core;
  dram:     --threads threads, --gib GiB of layers of 128 experts, 8 fresh random experts per call, cycling
            through the layers: far beyond L3, the DRAM-bound decode case; each call is followed by a torch
            .sum() over as many bytes of another --ref-gib buffer, timed apart ("read_gb_s"): the streaming
            read under the same interference, and "pct_of_read" = kernel GB/s / read GB/s;
  prompt:   T=16 and T=64 chunks on the dram weights (tok/s; weight-uses/s = GB/s x tokens per expert);
  overhead: median µs of a tiny call (1 token, 1 expert, D=I=64) and of an empty call (all ids -1).

    python scripts/bench_cpu_micro.py                          # all modes, int4g32 and int8, act q8
    python scripts/bench_cpu_micro.py --modes hot --formats int4g32 --hot-experts 8
    python scripts/bench_cpu_micro.py --act fp32               # the exact fp32 path instead
    python scripts/bench_cpu_micro.py --formats int4g32,mxfp4,iq4_nl,iq4_xs --dim 2880 --inter 2880   # LUT4
Prints one JSON line per measurement (and writes them to $OUT/cpu_micro.json when $OUT is set). Kernel
settings (threads, prefetch distance, integer path) go in as hotexperts.config.KernelOptions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hotexperts.config import KernelOptions  # noqa: E402
from hotexperts.kernels import cpu_moe as cm  # noqa: E402
from hotexperts.weights import LayerExperts  # noqa: E402
from scripts.random_experts import clone_layer, random_layer  # noqa: E402

D, I, TOP_K = 2048, 768, 8


def timed(fn, n: int, reps: int = 7) -> float:
    """Best over reps of the mean seconds per fn() call (n calls per rep, after a warm-up): the box is a
    shared VM, so the fastest repetition is the least disturbed one."""
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n)
    return min(out)


def options(a, threads: int) -> KernelOptions:
    return replace(a.options, cpu_threads=threads)


def hot(fmt: str, a) -> dict:
    o = options(a, a.hot_threads)
    L = random_layer(fmt, a.hot_experts, a.hot_dim, a.hot_inter, torch.Generator().manual_seed(0))
    x, out = torch.randn(1, a.hot_dim).bfloat16(), torch.empty(1, a.hot_dim, dtype=torch.bfloat16)
    ids, w = torch.arange(a.hot_experts)[None], torch.rand(1, a.hot_experts)
    dt = timed(lambda: cm.cpu_moe(x, ids, w, L, out, options=o), a.hot_calls)
    nb = a.hot_experts * L.expert_nbytes
    return {"mode": "hot", "format": fmt, "act": a.act, "prefetch": o.prefetch_rows, "threads": a.hot_threads,
            "experts": a.hot_experts, "D": a.hot_dim, "I": a.hot_inter, "mb": nb / 1e6,
            "us_per_call": dt * 1e6, "gb_s": nb / dt / 1e9}


def dram_layers(fmt: str, a) -> list[LayerExperts]:
    base = random_layer(fmt, 128, D, I, torch.Generator().manual_seed(0))
    n = max(2, round(a.gib * 2**30 / (128 * base.expert_nbytes)))
    return [base] + [clone_layer(base) for _ in range(n - 1)]


def stream(layers, fmt: str, a, T: int, ref: torch.Tensor | None = None) -> dict:
    """T=1: decode calls; T>1: prompt chunks. With ref (a big fp32 tensor), each call is followed by a
    .sum() of as many bytes of ref as the call's experts hold, timed separately: a streaming read under the
    same interference as the kernel (this box's memory bandwidth moves with other tenants' load)."""
    o = options(a, a.threads)
    torch.set_num_threads(a.threads)
    n = a.dram_calls if T == 1 else max(len(layers), a.dram_calls // 8)
    ids = torch.rand(n + 1, T, 128).argsort(-1)[..., :TOP_K].contiguous()
    w = torch.rand(n + 1, T, TOP_K)
    x, out = torch.randn(T, D).bfloat16(), torch.empty(T, D, dtype=torch.bfloat16)
    ne = [len(torch.unique(ids[i])) for i in range(n)]          # distinct experts per call
    nb = layers[0].expert_nbytes
    cm.cpu_moe(x, ids[n], w[n], layers[0], out, options=o)
    t_k = t_r = 0.0
    pos = 0
    for i in range(n):
        t = time.perf_counter()
        cm.cpu_moe(x, ids[i], w[i], layers[i % len(layers)], out, options=o)
        t_k += time.perf_counter() - t
        if ref is not None:
            m = ne[i] * nb // 4
            if pos + m > ref.numel():
                pos = 0
            t = time.perf_counter()
            ref[pos:pos + m].sum()
            t_r += time.perf_counter() - t
            pos += m
    gbs = sum(ne) * nb / t_k / 1e9
    r = {"mode": "dram" if T == 1 else "prompt", "format": fmt, "act": a.act, "prefetch": o.prefetch_rows,
         "threads": a.threads, "T": T, "gib": len(layers) * 128 * nb / 2**30, "us_per_call": t_k / n * 1e6,
         "tok_s_per_layer": T * n / t_k, "gb_s": gbs}
    if ref is not None:
        r["read_gb_s"] = sum(ne) * nb / t_r / 1e9
        r["pct_of_read"] = 100 * gbs / r["read_gb_s"]
    return r


def overhead(a) -> dict:
    o = options(a, a.threads)
    L = LayerExperts(torch.randn(8, 128, 64), torch.randn(8, 64, 64))
    x, out, w = torch.randn(1, 64), torch.empty(1, 64), torch.rand(1, 1)
    one, none = torch.tensor([[3]]), torch.tensor([[-1]])
    tiny = timed(lambda: cm.cpu_moe(x, one, w, L, out, options=o), 2000, 5)
    empty = timed(lambda: cm.cpu_moe(x, none, w, L, out, options=o), 2000, 5)
    return {"mode": "overhead", "threads": a.threads, "tiny_us": tiny * 1e6, "empty_us": empty * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="hot,dram,prompt,overhead")
    p.add_argument("--formats", default="int4g32,int8")
    p.add_argument("--act", choices=("q8", "fp32"), default="q8")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="dram/prompt/overhead threads")
    p.add_argument("--hot-threads", type=int, default=1)
    p.add_argument("--hot-experts", type=int, default=4)
    p.add_argument("--hot-calls", type=int, default=200)
    p.add_argument("--hot-dim", type=int, default=D, help="hot: D (512, I 256: in L2)")
    p.add_argument("--hot-inter", type=int, default=I)
    p.add_argument("--gib", type=float, default=4.0, help="weights of the dram mode")
    p.add_argument("--dram-calls", type=int, default=400)
    p.add_argument("--ref-gib", type=float, default=2.0, help="dram: interleaved read reference (0 = off)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="KernelOptions.prefetch_rows (default: the library's)")
    a = p.parse_args()
    a.options = KernelOptions(act_quant=a.act == "q8")
    if a.prefetch is not None:
        a.options = replace(a.options, prefetch_rows=a.prefetch)
    modes = a.modes.split(",")
    rows = []

    def emit(r):
        rows.append(r)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)

    print(f"# backend {cm.cpu_moe_backend()}, int dot {cm.cpu_moe_int_dot()}", flush=True)
    ref = torch.ones(int(a.ref_gib * 2**30) // 4) if "dram" in modes and a.ref_gib > 0 else None
    for fmt in a.formats.split(","):
        if "hot" in modes:
            emit(hot(fmt, a))
        if "dram" in modes or "prompt" in modes:
            layers = dram_layers(fmt, a)
            if "dram" in modes:
                emit(stream(layers, fmt, a, 1, ref))
            if "prompt" in modes:
                for T in (16, 64):
                    emit(stream(layers, fmt, a, T))
            del layers
    if "overhead" in modes:
        emit(overhead(a))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cpu_micro.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
