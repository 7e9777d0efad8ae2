"""H200 benchmark of the fused GPU MoE kernels (hotexperts/kernels/triton_moe.py).

Run from the repository root:  python scripts/bench_gpu_moe.py      (writes $OUT/gpu_moe.json if OUT is set)
                               python scripts/bench_gpu_moe.py --quant-sweep   (int4g32/int8 block sizes only)
1. correctness on CUDA: Triton decode/prefill vs the torch fallback (fp32 accumulation), ‖out−ref‖/‖ref‖,
   with slot_of holes and ids == -1; CUDA-graph capture of both paths.
2. timings per MoE layer (CUDA-graph replay over L layers with distinct weight buffers, so no L2 reuse):
   Qwen3-30B-A3B (128 slots, K=8, D=2048, I=768) and Mixtral (8 slots, K=2, D=4096, I=14336), T=1;
   the index_select+bmm baseline; the HBM floor (bytes of the distinct routed experts / 4.3 TB/s);
   a small block-size sweep; a T sweep (decode vs grouped path); prefill T=512 (Qwen shape).
Every section catches its own errors (e.g. a Triton compile failure), prints them and goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

DRY = os.environ.get("BENCH_DRY") == "1"      # CPU dry run of the script's logic (Triton interpreter, tiny)
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hotexperts.kernels import triton_moe as tm  # noqa: E402
from hotexperts.kernels.gpu_moe import torch_moe  # noqa: E402
from hotexperts.weights import QuantizedWeight  # noqa: E402

HBM = 4.3e12        # the H200 machine's measured HBM (../shared/MACHINE.md); an H100 SXM: 3.35e12 spec
DEV = "cpu" if DRY else "cuda"
DT = torch.float32 if DRY else torch.bfloat16   # the interpreter mishandles bf16 loads
SHAPES = {"qwen3-30b-a3b": dict(E=128, S=128, K=8, D=2048, I=768, L=8),
          "mixtral-8x7b": dict(E=8, S=8, K=2, D=4096, I=14336, L=4)}
if DRY:
    SHAPES = {"qwen3-30b-a3b": dict(E=16, S=16, K=4, D=64, I=32, L=2),
              "mixtral-8x7b": dict(E=4, S=4, K=2, D=64, I=64, L=2)}
RESULTS: dict = {"device": None, "correctness": [], "decode": [], "quant": [], "sweep": [], "tsweep": [],
                 "prefill": [], "quant_sweep": [], "errors": []}


def section(name):
    def wrap(fn):
        def run(*a, **kw):
            t0 = time.time()
            try:
                fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - report and continue
                msg = f"{name}: {type(e).__name__}: {e}"
                print("ERROR", msg[:2000])
                traceback.print_exc(limit=3)
                RESULTS["errors"].append(msg[:2000])
            print(f"[{name}: {time.time() - t0:.1f}s]", flush=True)
        return run
    return wrap


# ----------------------------------------------------------------------------------------------- helpers
def layers(E, S, D, I, L, **_):
    """L layers of slot buffers: w13 [S,2I,D], w2 [S,D,I] bf16, and slot_of [E] (random permutation)."""
    out = []
    for _ in range(L):
        w13 = torch.randn(S, 2 * I, D, device=DEV, dtype=DT) / D**0.5
        w2 = torch.randn(S, D, I, device=DEV, dtype=DT) / I**0.5
        slot_of = torch.randperm(E, device=DEV).to(torch.int32) % S      # E == S in SHAPES
        out.append((w13, w2, slot_of))
    return out


def routing(T, E, K, holes=0.0):
    ids = torch.stack([torch.randperm(E, device=DEV)[:K] for _ in range(T)])        # [T, K]
    if holes:
        ids[torch.rand(T, K, device=DEV) < holes] = -1
    w = torch.softmax(torch.randn(T, K, device=DEV), -1).to(DT)
    return ids, w


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-20))


def time_wall(fn):
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_graph(fn, iters=30):
    """ms per call of fn (all its kernels) by CUDA-graph replay, after warm-up on a side stream."""
    if DRY:
        return time_wall(fn)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters


def time_eager(fn, iters=10):
    if DRY:
        return time_wall(fn)
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters


def bmm_baseline(x, ids, w, w13, w2, slot_of):
    """index_select + bmm in bf16 (the MACHINE.md baseline), holes ignored (benchmark routing has none)."""
    T, K = ids.shape
    s = slot_of.long()[ids.reshape(-1)]
    gu = torch.bmm(w13.index_select(0, s), x.repeat_interleave(K, 0).unsqueeze(-1)).squeeze(-1)
    g, u = gu.chunk(2, -1)
    y = torch.bmm(w2.index_select(0, s), (torch.nn.functional.silu(g) * u).unsqueeze(-1)).squeeze(-1)
    return (y.view(T, K, -1) * w.unsqueeze(-1)).sum(1)


def quantize(w, fmt):
    """bf16 [S, N, Kin] -> QuantizedWeight (int8 per row, int4g32 min/max per 32 columns, int8g32 / int8g16
    symmetric per group, int8g16z: int8g16 with a zero, from int4g32 (a Q4_K_M down matrix))."""
    from hotexperts import quant as hq

    if fmt == "q4_k":                                        # GGUF Q4_K blocks (4.5 bits), in place
        return hq.quantize_q4_k(w)
    if fmt in ("int8g32", "int8g16"):
        return hq.quantize_int8g(w, int(fmt[5:]), torch.float32 if DRY else torch.float16)
    if fmt == "int8g16z":
        return hq.int8g_from_int4g32(quantize(w, "int4g32"), 16)
    if fmt == "int8":
        scale = w.float().abs().amax(-1).clamp(min=1e-8) / 127
        q = torch.round(w.float() / scale.unsqueeze(-1)).to(torch.int8)
        return QuantizedWeight("int8", q, scale.to(DT))
    g = w.float().unflatten(-1, (-1, 32))
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.uint8).flatten(-2)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)                       # low nibble = even column
    return QuantizedWeight("int4g32", packed, scale.to(DT), (lo + 8 * scale).to(DT))


def floor_us(ids, slot_of, D, I):
    n = int(torch.unique(slot_of[ids[ids >= 0]]).numel())
    return n * 3 * D * I * 2 / HBM * 1e6


# ---------------------------------------------------------------------------------------------- sections
@section("correctness")
def correctness():
    torch.manual_seed(0)
    for name, sh in SHAPES.items():
        w13, w2, _ = layers(**{**sh, "L": 1})[0]
        E, S = sh["E"] + 16, sh["S"]
        slot_of = torch.full((E,), -1, device=DEV, dtype=torch.int32)
        slot_of[torch.randperm(E, device=DEV)[:S]] = torch.randperm(S, device=DEV).to(torch.int32)
        for T in (1, 4, 64) if name.startswith("qwen") else (1, 3, 33):
            ids, w = routing(T, E, sh["K"], holes=0.1)
            x = torch.randn(T, sh["D"], device=DEV, dtype=DT)
            ref = torch_moe(x, ids, w, w13, w2, slot_of, mode="loop").float()
            for path, fn in (("decode", tm.moe_decode), ("prefill", tm.moe_prefill)):
                if path == "decode" and T * sh["K"] > 128:
                    continue
                err = rel(fn(x, ids, w, w13, w2, slot_of), ref)
                row = {"shape": name, "T": T, "path": path, "rel_err": err, "ok": err < 1e-2}
                RESULTS["correctness"].append(row)
                print(f"  {name:14s} T={T:3d} {path:8s} rel_err={err:.2e} {'OK' if err < 1e-2 else 'FAIL'}")
        # graph capture of the auto path at T=1 and T=64 (no host sync inside)
        for T in (1, 64):
            ids, w = routing(T, E, sh["K"], holes=0.1)
            x = torch.randn(T, sh["D"], device=DEV, dtype=DT)
            out = torch.empty(T, sh["D"], device=DEV, dtype=DT)
            time_graph(lambda: tm.moe_triton(x, ids, w, w13, w2, slot_of, out), iters=1)  # noqa: B023
            err = rel(out, torch_moe(x, ids, w, w13, w2, slot_of, mode="loop"))
            RESULTS["correctness"].append({"shape": name, "T": T, "path": "graph", "rel_err": err,
                                           "ok": err < 1e-2})
            print(f"  {name:14s} T={T:3d} graph    rel_err={err:.2e} {'OK' if err < 1e-2 else 'FAIL'}")
        w13 = w2 = None
        torch.cuda.empty_cache()


def _decode_layer_times(sh, ls, T, cfg=None, path="decode"):
    ids, w = routing(T, sh["E"], sh["K"])
    x = torch.randn(T, sh["D"], device=DEV, dtype=DT)
    outs = [torch.empty(T, sh["D"], device=DEV, dtype=DT) for _ in ls]
    fn = tm.moe_decode if path == "decode" else tm.moe_prefill

    def run():
        for (w13, w2, so), o in zip(ls, outs, strict=True):
            fn(x, ids, w, w13, w2, so, o, cfg=cfg)
    ms = time_graph(run)
    floor = sum(floor_us(ids, so, sh["D"], sh["I"]) for _, _, so in ls) / len(ls)
    return ms * 1e3 / len(ls), floor, (x, ids, w)


@section("decode")
def decode():
    for name, sh in SHAPES.items():
        ls = layers(**sh)
        us, floor, (x, ids, w) = _decode_layer_times(sh, ls, 1)
        base = time_graph(lambda: [bmm_baseline(x, ids, w, *lw) for lw in ls]) * 1e3 / len(ls)  # noqa: B023
        row = {"shape": name, "T": 1, "triton_us": us, "bmm_us": base, "floor_us": floor,
               "pct_of_hbm": 100 * floor / us, "cfg": tm.decode_config(1, sh["K"], sh["D"], sh["I"])}
        RESULTS["decode"].append(row)
        print(f"  {name:14s} T=1 triton {us:7.1f} us | index_select+bmm {base:7.1f} us | "
              f"HBM floor {floor:6.1f} us ({row['pct_of_hbm']:.0f}% of peak)")
        quant_decode(name, sh, ls, base)
        sweep(name, sh, ls)
        if name.startswith("qwen"):
            tsweep(sh, ls)
        ls = None
        torch.cuda.empty_cache()


QUANT_FORMATS = ("int8", "int4g32", "int8g32", "int8g16", "int8g16z", "q4_k")


def quant_decode(name, sh, ls, bf16_bmm_us, fmts=QUANT_FORMATS):
    """T=1 decode with quantized slots: correctness vs the torch fallback, time, and the byte floor."""
    for fmt in fmts:
        try:
            qls = [(quantize(w13, fmt), quantize(w2, fmt), so) for w13, w2, so in ls]
            ids, w = routing(1, sh["E"], sh["K"])
            x = torch.randn(1, sh["D"], device=DEV, dtype=DT)
            err = rel(tm.moe_decode(x, ids, w, *qls[0]), torch_moe(x, ids, w, *qls[0], mode="gather"))
            outs = [torch.empty(1, sh["D"], device=DEV, dtype=DT) for _ in qls]

            def run(x=x, ids=ids, w=w, qls=qls, outs=outs):
                for lw, o in zip(qls, outs, strict=True):
                    tm.moe_decode(x, ids, w, *lw, o)
            us = time_graph(run) * 1e3 / len(qls)
            per_expert = (qls[0][0].nbytes + qls[0][1].nbytes) / sh["S"]
            floor = sh["K"] * per_expert / HBM * 1e6
            RESULTS["quant"].append({"shape": name, "fmt": fmt, "rel_err_vs_torch": err, "triton_us": us,
                                     "floor_us": floor, "pct_of_hbm": 100 * floor / us})
            print(f"  {name:14s} T=1 {fmt:8s} {us:7.1f} us | floor {floor:6.1f} us ({100 * floor / us:.0f}%)"
                  f" | rel_err vs torch {err:.1e}")
            qls = outs = None
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"].append(f"quant {name} {fmt}: {e}"[:2000])
            print("ERROR quant", name, fmt, str(e)[:500])
    torch.cuda.empty_cache()


@section("quant sweep")
def quant_sweep(fmts=("int4g32",)):
    """Block sizes of the quantized decode GEMVs on the Qwen3-30B-A3B shape (T=1, K=8): the default
    config first, then a grid; prints the best three per format."""
    sh = SHAPES["qwen3-30b-a3b"]
    ls = layers(**sh)
    ids, w = routing(1, sh["E"], sh["K"])
    x = torch.randn(1, sh["D"], device=DEV, dtype=DT)
    grid = [None] + [dict(BN=bn, BK=bk, BD=bd, BI=bi, num_warps=4, stages=3)
                     for bn in (8, 16, 32) for bk in (128, 256) for bd, bi in ((8, 256), (16, 256))]
    grid += [dict(BN=16, BK=256, BD=8, BI=256, num_warps=8, stages=3), dict(BN=16, BK=256, BD=8, BI=256,
                                                                          num_warps=4, stages=5)]
    grid = grid[: 2 if DRY else None]
    for fmt in fmts:
        qls = [(quantize(w13, fmt), quantize(w2, fmt), so) for w13, w2, so in ls]
        outs = [torch.empty(1, sh["D"], device=DEV, dtype=DT) for _ in qls]
        for cfg in grid:
            def run(cfg=cfg, qls=qls, outs=outs):
                for lw, o in zip(qls, outs, strict=True):
                    tm.moe_decode(x, ids, w, *lw, o, cfg=cfg)
            try:
                us = time_graph(run) * 1e3 / len(qls)
                RESULTS["quant_sweep"].append({"fmt": fmt, "cfg": cfg or "default", "us": us})
            except Exception as e:  # noqa: BLE001
                RESULTS["quant_sweep"].append({"fmt": fmt, "cfg": cfg or "default", "error": str(e)[:300]})
        ok = [r for r in RESULTS["quant_sweep"] if r["fmt"] == fmt and "us" in r]
        ok.sort(key=lambda r: r["us"])
        default = next((r["us"] for r in ok if r["cfg"] == "default"), float("nan"))
        print(f"  {fmt}: default {default:.1f} us")
        for r in ok[:3]:
            print(f"    best: {r['us']:7.1f} us  {r['cfg']}")
        qls = outs = None
    torch.cuda.empty_cache()


def sweep(name, sh, ls):
    cfgs = [dict(BN=bn, BK=bk, BD=bd, BI=bi, num_warps=4, stages=st)
            for bn, bk in ((8, 256), (16, 256), (32, 128))
            for bd, bi in ((4, 256), (8, 512), (16, 256))
            for st in (1, 3)][: 2 if DRY else None]
    for cfg in cfgs:
        try:
            us, floor, _ = _decode_layer_times(sh, ls, 1, cfg)
            RESULTS["sweep"].append({"shape": name, "cfg": cfg, "us": us})
        except Exception as e:  # noqa: BLE001
            RESULTS["sweep"].append({"shape": name, "cfg": cfg, "error": str(e)[:300]})
    ok = sorted((r for r in RESULTS["sweep"] if r["shape"] == name and "us" in r), key=lambda r: r["us"])
    for r in ok[:3]:
        print(f"    sweep best: {r['us']:7.1f} us  {r['cfg']}")


def tsweep(sh, ls):
    for T in (1, 2) if DRY else (1, 2, 4, 8, 16, 32):
        row = {"T": T}
        for path in ("decode", "prefill"):
            try:
                row[path + "_us"] = _decode_layer_times(sh, ls, T, path=path)[0]
            except Exception as e:  # noqa: BLE001
                row[path + "_err"] = str(e)[:300]
        RESULTS["tsweep"].append(row)
        print(f"    T={T:3d} pairs={T * sh['K']:4d}  decode {row.get('decode_us', float('nan')):7.1f} us"
              f"  grouped {row.get('prefill_us', float('nan')):7.1f} us")


@section("prefill")
def prefill():
    sh = SHAPES["qwen3-30b-a3b"]
    ls = layers(**{**sh, "L": 4})
    T = 16 if DRY else 512
    ids, w = routing(T, sh["E"], sh["K"])
    x = torch.randn(T, sh["D"], device=DEV, dtype=DT)
    floor = 3 * sh["D"] * sh["I"] * 2 * sh["S"] / HBM * 1e6
    flops = 2 * T * sh["K"] * 3 * sh["D"] * sh["I"]
    base = time_eager(lambda: [torch_moe(x, ids, w, *lw, mode="loop") for lw in ls]) * 1e3 / len(ls)
    cfgs = [None] + [dict(BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=3)
                     for bm, bn, bk, nw in ((32, 64, 64, 4), (64, 64, 64, 4), (32, 128, 64, 4),
                                            (64, 128, 64, 8), (16, 64, 128, 4))][: 2 if DRY else None]
    for cfg in cfgs:
        try:
            us = time_graph(lambda: [tm.moe_prefill(x, ids, w, *lw, cfg=cfg) for lw in ls]) * 1e3 / len(ls)  # noqa: B023
            c = cfg or tm.prefill_config(T * sh["K"], sh["S"], sh["D"], sh["I"])
            row = {"T": T, "cfg": c, "default": cfg is None, "triton_us": us, "torch_loop_us": base,
                   "floor_us": floor, "tflops": flops / us / 1e6}
            RESULTS["prefill"].append(row)
            print(f"  qwen T={T} grouped {us:8.1f} us ({row['tflops']:.0f} TFLOP/s)"
                  f" | torch loop {base:8.1f} us | floor {floor:6.1f} us {'(default) ' * (cfg is None)}{c}")
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"].append(f"prefill {cfg}: {e}"[:2000])
            print("ERROR prefill", cfg, str(e)[:500])


def main():
    if not (DRY or torch.cuda.is_available()):
        print("needs CUDA")
        return 1
    import triton
    name = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    global HBM
    if "H100" in name:
        HBM = 3.35e12                        # spec (the floor's bandwidth: printed % are of this)
    RESULTS["device"] = (f"{name} torch {torch.__version__} triton {triton.__version__}, "
                         f"floor at {HBM / 1e12} TB/s")
    print(RESULTS["device"])
    t0 = time.time()
    if "--quant-decode" in sys.argv:         # only the T=1 quantized decode, Qwen3-30B-A3B shape [formats]
        i = sys.argv.index("--quant-decode")
        fmts = sys.argv[i + 1].split(",") if len(sys.argv) > i + 1 else QUANT_FORMATS
        sh = SHAPES["qwen3-30b-a3b"]
        quant_decode("qwen3-30b-a3b", sh, layers(**sh), None, fmts)
    elif "--quant-sweep" in sys.argv:          # only the quantized decode block-size sweep [formats]
        i = sys.argv.index("--quant-sweep")
        fmts = sys.argv[i + 1].split(",") if len(sys.argv) > i + 1 else ("int4g32",)
        quant_sweep(fmts)
    else:
        correctness()
        decode()
        prefill()
    print(f"total {time.time() - t0:.0f}s; errors: {len(RESULTS['errors'])}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_moe.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
