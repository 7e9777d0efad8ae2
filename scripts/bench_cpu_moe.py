"""Benchmark the fused CPU MoE kernel at full model scale (default: Qwen3-30B-A3B, 48 layers x 128 experts).

For each weight format (int4g32, int8, int8g32, int8g16, int8g16z = with a zero, bf16), one at a time to
bound RAM: build every layer's experts (one random layer, cloned, so the model is far larger than L3), then
time, for the integer formats once with the int8-activation integer path (act "q8") and once with the exact
fp32 path (act "fp32"):
  decode:  each token routes 8 random experts per layer (new ids every token) through all layers
           -> ms/token, tok/s (MoE part only), effective GB/s of expert weights, % of DRAM read bandwidth;
           for q8 also without software prefetch (column "no-pf tok/s");
  prompt:  chunks of T=16 and T=64 tokens through all layers -> tok/s;
  fallback: the plain torch path (cpu_moe_torch) for a couple of tokens, for comparison.
Also: a DRAM read bandwidth (sum of a 4 GiB fp32 tensor), per-call overhead (tiny call: 1 token, 1 expert,
D = I = 64; empty call: no expert routed), and the error against a float64 reference. Prints a table;
writes JSON to $OUT/cpu_moe.json. Kernel settings go in as hotexperts.config.KernelOptions (--threads,
--isa); kt-kernel was compared once (run 1, docs/benchmarks.md history) and is no longer driven here.

    python scripts/bench_cpu_moe.py                       # the GPU machine's host (< 4 min)
    python scripts/bench_cpu_moe.py --layers 2 --experts 16 --tokens 4 --dram-gib 0.5   # smoke
"""

from __future__ import annotations

import argparse
import gc
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
from hotexperts.quant import dequantize  # noqa: E402
from hotexperts.weights import LayerExperts  # noqa: E402
from scripts.random_experts import clone_layer, random_layer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="decode tokens timed per format")
    p.add_argument("--formats", default="int4g32,int8,bf16")
    p.add_argument("--threads", type=int, default=0, help="0 = physical cores (KernelOptions' default)")
    p.add_argument("--isa", default="native", choices=("native", "avx2", "scalar"),
                   help="KernelOptions.cpu_isa: which build of the extension")
    p.add_argument("--dram-gib", type=float, default=4.0)
    return p.parse_args()


# ---------------------------------------------------------------- weights

def build_model(fmt: str, a: argparse.Namespace) -> list[LayerExperts]:
    base = random_layer(fmt, a.experts, a.dim, a.inter, torch.Generator().manual_seed(0))
    return [base] + [clone_layer(base) for _ in range(a.layers - 1)]


# ---------------------------------------------------------------- measurements

def dram_read_gbs(gib: float) -> float:
    buf = torch.ones(int(gib * 2**30) // 4)
    best = 0.0
    for _ in range(4):
        t = time.perf_counter()
        buf.sum()
        best = max(best, buf.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def routing(n: int, layers: int, E: int, K: int, T: int = 1):
    """ids [n, layers, T, K] distinct per token, weights [n, layers, T, K]."""
    ids = torch.rand(n, layers, T, E).argsort(dim=-1)[..., :K].contiguous()
    w = torch.rand(n, layers, T, K)
    return ids, w / w.sum(-1, keepdim=True)


def time_pass(fn, layers: list, x, ids, w, out) -> float:
    """Seconds for all tokens through all layers, fn(x, ids, w, layer, out)."""
    t = time.perf_counter()
    for i in range(ids.shape[0]):
        for li, layer in enumerate(layers):
            fn(x, ids[i, li], w[i, li], layer, out)
    return time.perf_counter() - t


def with_act(opts: KernelOptions, act_quant: bool, prefetch: int = 2):
    """cpu_moe with a fixed activation path and prefetch distance."""
    o = replace(opts, act_quant=act_quant, prefetch_rows=prefetch)

    def fn(x, ids, w, layer, out):
        return cm.cpu_moe(x, ids, w, layer, out, options=o)

    return fn


def decode(fn, layers, a, n: int, expert_nbytes: int | None = None) -> dict:
    x, out = torch.randn(1, a.dim).bfloat16(), torch.empty(1, a.dim, dtype=torch.bfloat16)
    ids, w = routing(n + 1, len(layers), a.experts, a.top_k)
    time_pass(fn, layers, x, ids[:1], w[:1], out)                      # warm-up
    dt = time_pass(fn, layers, x, ids[1:], w[1:], out) / n
    nb = layers[0].expert_nbytes if expert_nbytes is None else expert_nbytes
    gb = len(layers) * a.top_k * nb / 1e9
    return {"ms_per_token": dt * 1e3, "tok_s": 1 / dt, "gb_s": gb / dt, "gb_per_token": gb}



def prompt(fn, layers, a, T: int) -> dict:
    x, out = torch.randn(T, a.dim).bfloat16(), torch.empty(T, a.dim, dtype=torch.bfloat16)
    ids, w = routing(2, len(layers), a.experts, a.top_k, T)
    time_pass(fn, layers, x, ids[:1], w[:1], out)
    dt = time_pass(fn, layers, x, ids[1:], w[1:], out)
    return {"T": T, "ms_per_chunk": dt * 1e3, "tok_s": T / dt}


def call_overhead_us(opts: KernelOptions, layer: LayerExperts | None, n: int = 2000) -> float:
    """Median µs of a tiny call (E=8, D=I=64, 1 token, 1 expert) or of an empty call on `layer`."""
    if layer is None:
        layer = LayerExperts(torch.randn(8, 128, 64), torch.randn(8, 64, 64))
        ids = torch.tensor([[3]])
    else:
        ids = torch.full((1, 8), -1)
    D = layer.w2.shape[1]
    x, w, out = torch.randn(1, D), torch.rand(1, ids.shape[1]), torch.empty(1, D)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        cm.cpu_moe(x, ids, w, layer, out, options=opts)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e6


def max_rel_error(opts: KernelOptions, fmt: str, act_quant: bool) -> float:
    """Kernel vs float64 reference on a small layer, T=7, some -1 holes."""
    layer = random_layer(fmt, 8, 256, 128, torch.Generator().manual_seed(1))
    x = torch.randn(7, 256)
    ids, w = routing(1, 1, 8, 4, 7)
    ids, w = ids[0, 0], w[0, 0]
    ids[0, 1] = ids[3, 0] = -1
    ref = cm.cpu_moe_torch(x.double(), ids, w.double(), LayerExperts(dequantize(layer.w13, torch.float64),
                                                                    dequantize(layer.w2, torch.float64)))
    got = cm.cpu_moe(x, ids, w, layer, act_quant=act_quant, options=opts).double()
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------- main

def bench_format(fmt: str, a, dram: float, opts: KernelOptions) -> list[dict]:
    """One row per activation path: q8 (integer path; int formats with an integer dot only), fp32."""
    t = time.perf_counter()
    layers = build_model(fmt, a)
    built = time.perf_counter() - t
    acts = [True, False] if fmt.startswith("int") and cm.cpu_moe_int_dot(opts.cpu_isa) != "none" else [False]
    rows = []
    for aq in acts:
        fn = with_act(opts, aq)
        r = {"format": fmt, "act": "q8" if aq else "fp32", "build_s": built,
             "max_rel_err": max_rel_error(opts, fmt, aq)}
        r["decode"] = decode(fn, layers, a, a.tokens)
        r["decode"]["pct_dram"] = 100 * r["decode"]["gb_s"] / dram
        if aq:
            r["decode_no_prefetch"] = decode(with_act(opts, aq, prefetch=0), layers, a, max(4, a.tokens // 2))
        r["empty_call_us"] = call_overhead_us(replace(opts, act_quant=aq), layers[0], 500)
        r["prompt"] = [prompt(fn, layers, a, T) for T in (16, 64)]
        rows.append(r)
        print(json.dumps(r))
    rows[-1]["torch_fallback_decode"] = decode(cm.cpu_moe_torch, layers, a, 2)
    del layers
    gc.collect()
    return rows


def table(results: list[dict], dram: float) -> str:
    lines = [f"DRAM read {dram:.1f} GB/s",
             "format   | act  | ms/tok | tok/s | GB/s  | %DRAM | no-pf tok/s | empty us | fallback tok/s "
             "| T=16 tok/s | T=64 tok/s | rel.err"]
    for r in results:
        d = r["decode"]
        nopf = f"{r['decode_no_prefetch']['tok_s']:11.1f}" if "decode_no_prefetch" in r else f"{'-':>11s}"
        fb = f"{r['torch_fallback_decode']['tok_s']:14.2f}" if "torch_fallback_decode" in r else f"{'-':>14s}"
        lines.append(f"{r['format']:8s} | {r['act']:4s} | {d['ms_per_token']:6.2f} | {d['tok_s']:5.1f} | "
                     f"{d['gb_s']:5.1f} | {d['pct_dram']:5.1f} | {nopf} | {r['empty_call_us']:8.1f} | {fb} | "
                     f"{r['prompt'][0]['tok_s']:10.1f} | {r['prompt'][1]['tok_s']:10.1f} | "
                     f"{r['max_rel_err']:.1e}")
    return "\n".join(lines)


def main() -> None:
    a = parse()
    start = time.perf_counter()
    opts = KernelOptions(cpu_threads=a.threads or None, cpu_isa=a.isa)
    threads = opts.threads()
    torch.set_num_threads(threads)
    backend = cm.cpu_moe_backend(opts.cpu_isa)
    meta = {"backend": backend, "int_dot": cm.cpu_moe_int_dot(opts.cpu_isa),
            "ext_load_s": time.perf_counter() - start, "threads": threads, "isa": opts.cpu_isa,
            "torch": torch.__version__, "shape": vars(a)}
    print(f"backend {backend}, integer dot {meta['int_dot']} (load {meta['ext_load_s']:.1f}s), "
          f"threads {threads}")
    dram = dram_read_gbs(a.dram_gib)
    meta.update(dram_read_gbs=dram, tiny_call_us=call_overhead_us(opts, None))
    print(f"DRAM read {dram:.1f} GB/s; tiny call {meta['tiny_call_us']:.1f} µs")
    results = []
    for fmt in a.formats.split(","):
        results += bench_format(fmt, a, dram, opts)
    meta["total_s"] = time.perf_counter() - start
    save({"meta": meta, "results": results})
    print(table(results, dram))
    print(f"total {meta['total_s']:.0f}s")


def save(out: dict) -> None:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cpu_moe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
